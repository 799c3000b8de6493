"""Models that ship inside fastdiff: label-conditioned UNets (``"digits"``, ``"digits-onestep"``,
``"digits-coalescer"``; :func:`load`) and text-to-image pipelines (``"shapes"``; :func:`load_pipeline`)."""

from fastdiff.models.label_unet import LabelConditionedUNet, is_label_model
from fastdiff.models.registry import EMBEDDED, EMBEDDED_PIPELINES, available_models, load, read_config, save
from fastdiff.models.text_to_image import is_pipeline_model, is_pipeline_name, load_pipeline

__all__ = ["LabelConditionedUNet", "is_label_model", "EMBEDDED", "EMBEDDED_PIPELINES", "available_models",
           "is_pipeline_model", "is_pipeline_name", "load", "load_pipeline", "read_config", "save"]
