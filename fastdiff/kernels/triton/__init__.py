"""Triton kernels and their launchers (GUIDE section 2).

Nothing is imported here on purpose: ``import fastdiff`` must not import triton (slow, and absent on some
machines). The dispatch layer imports ``fastdiff.kernels.triton.step`` only when the ``triton`` backend runs.

- :mod:`fastdiff.kernels.triton.step` -- the generic fused sampler step (``launch`` has the signature of
  :func:`fastdiff.ops.reference.step_reference`).
"""
