"""Kernel launchers behind the fused-step backends: ``cpu_step`` (C++ / OpenMP), ``cuda_step`` (CUDA) and
``triton`` (Triton). Each exposes ``launch(...)`` with the signature of :func:`fastdiff.ops.reference.step_reference`
and is imported lazily by :mod:`fastdiff.ops.dispatch`."""
