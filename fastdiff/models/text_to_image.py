"""Text-to-image pipelines that ship inside the package (``"shapes"``, ``"shapes-onestep"``), by name or by
folder: which models are pipelines, and loading them as diffusers ``StableDiffusionPipeline`` objects. Above both
the label-model registry and the ``shapes`` modules (which import the registry), so neither imports the other
through it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.errors import ModelNotFound
from fastdiff.models.registry import EMBEDDED, EMBEDDED_PIPELINES, WEIGHTS_DIR
from fastdiff.models.shapes import pipeline as shapes_pipeline


def is_pipeline_name(model) -> bool:
    """True for the name of an embedded text-to-image pipeline (``"shapes"``)."""
    return isinstance(model, str) and model in EMBEDDED_PIPELINES


def is_pipeline_model(model) -> bool:
    """True for an embedded pipeline's name or a folder holding a text-to-image pipeline (``unet/`` and
    ``text_encoder/``, as ``python -m fastdiff train shapes`` writes)."""
    if is_pipeline_name(model):
        return True
    if not isinstance(model, (str, os.PathLike)):
        return False
    p = Path(model).expanduser()
    try:
        return (p / "unet" / "config.json").is_file() and (p / "text_encoder").is_dir()
    except OSError:  # a name longer than the file system allows is no folder
        return False


def load_pipeline(name_or_path: str | os.PathLike = "shapes", device=None, dtype=None):
    """An embedded text-to-image pipeline by name (``"shapes"``), or a folder written by ``python -m fastdiff
    train shapes``, as a ``diffusers.StableDiffusionPipeline`` on ``device`` in ``dtype`` (default CPU, float32).
    Raises :class:`ModelNotFound` for anything else."""
    s = os.fspath(name_or_path)
    if s in EMBEDDED_PIPELINES:
        # "shapes": PIPELINE_DIR (looked up at call time: tests point it elsewhere); others: their weights folder
        path = shapes_pipeline.PIPELINE_DIR if s == "shapes" else WEIGHTS_DIR / s
    elif s in EMBEDDED:
        raise ModelNotFound(f"{s!r} is a label-conditioned model, not a text-to-image pipeline: load it with "
                            f"fastdiff.models.load({s!r}); pipelines: {', '.join(map(repr, EMBEDDED_PIPELINES))}")
    else:
        path = Path(s).expanduser()
        try:
            is_dir = path.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            raise ModelNotFound(f"unknown pipeline {s[:200]!r}: not an embedded pipeline "
                                f"({', '.join(map(repr, EMBEDDED_PIPELINES))}) nor an existing folder")
    return shapes_pipeline.load_pipeline(path, dtype=dtype or torch.float32, device=device or "cpu")
