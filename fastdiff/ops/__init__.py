"""Public ops. ``fused_step`` is the generic sampler step (CFG + scheduler update) on any backend."""

from fastdiff.ops.dispatch import BACKENDS, availability, resolve
from fastdiff.ops.step import fused_step

__all__ = ["fused_step", "resolve", "availability", "BACKENDS"]
