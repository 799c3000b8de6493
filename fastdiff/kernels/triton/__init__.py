"""Triton kernels and their launchers.

Nothing is imported here on purpose: ``import fastdiff`` must not import triton (slow, and absent on some
machines). The op registry (:mod:`fastdiff.ops.registry`) imports a module below only when a call runs on the
``triton`` backend.

- :mod:`~fastdiff.kernels.triton.step` -- the generic fused sampler step (``launch`` has the signature of
  :func:`fastdiff.ops.step.step_reference`).
- :mod:`~fastdiff.kernels.triton.attention`, :mod:`~fastdiff.kernels.triton.groupnorm`,
  :mod:`~fastdiff.kernels.triton.geglu` -- the model ops.
- :mod:`~fastdiff.kernels.triton.twin` -- kernels that follow TRITON_INTERPRET at launch, and the offline compile
  used by the GPU-less compile tests.
"""
