"""Kernel launchers, laid out by backend: ``cpp/`` (C++ / OpenMP through ``fastdiff._C_cpu``), ``cuda/`` (CUDA C++
through ``fastdiff._C_cuda``) and ``triton/``, one module per op (``step``, ``groupnorm``, ``attention``,
``geglu``). :mod:`fastdiff.kernels.compiled_args` packs the calls of the two compiled modules.

Launchers are named in the op registry (:mod:`fastdiff.ops.registry`) as "module:function" and imported only when
a call runs on that backend. A step launcher has the signature of :func:`fastdiff.ops.step.step_reference`; the
GroupNorm launchers share the Triton GroupNorm's."""
