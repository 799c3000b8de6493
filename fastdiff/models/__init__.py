"""Models that ship inside fastdiff (``"digits"``, ``"digits-onestep"``) and label conditioning."""

from fastdiff.models.label_unet import LabelConditionedUNet, is_label_model
from fastdiff.models.registry import EMBEDDED, available_models, load, read_config, save

__all__ = ["LabelConditionedUNet", "is_label_model", "EMBEDDED", "available_models", "load", "read_config", "save"]
