"""Kernel launchers, laid out by backend: ``cpp/`` (C++ / OpenMP through ``fastdiff._C_cpu``), ``cuda/`` (CUDA C++
through ``fastdiff._C_cuda``) and ``triton/``, one module per op (``step``, ``groupnorm``, ``attention``,
``geglu``). :mod:`fastdiff.kernels.compiled_args` packs the calls of the two compiled modules.

Launchers are imported only when a call runs on that backend (the step's by :mod:`fastdiff.ops.dispatch`, the
model ops' by their op modules). A step launcher has the signature of :func:`fastdiff.ops.reference.step_reference`; the
GroupNorm launchers share the Triton GroupNorm's."""
