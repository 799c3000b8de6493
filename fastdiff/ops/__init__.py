"""Public ops. ``fused_step`` is the generic sampler step (CFG + scheduler update) on any backend; the model ops are
in :mod:`fastdiff.ops.attention`, :mod:`fastdiff.ops.groupnorm` and :mod:`fastdiff.ops.geglu`, and every op's
backends in the one table of :mod:`fastdiff.ops.registry`."""

from fastdiff.ops.registry import BACKENDS, availability, resolve
from fastdiff.ops.step import fused_step

__all__ = ["fused_step", "resolve", "availability", "BACKENDS"]
