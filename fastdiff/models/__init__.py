"""Models that ship inside fastdiff (``"digits"``, ``"digits-onestep"``) and label conditioning."""

from fastdiff.models.conditioning import LabelConditionedUNet
from fastdiff.models.registry import EMBEDDED, available_models, load, read_config, save

__all__ = ["LabelConditionedUNet", "EMBEDDED", "available_models", "load", "read_config", "save"]
