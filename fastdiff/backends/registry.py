"""Model-backend registry: ``make_runner(model, backend, device, dtype)`` for ``"torch"``, ``"onnxruntime"``,
``"tensorrt"`` and for exported files (``.onnx`` -> onnxruntime, ``.engine`` / ``.plan`` -> TensorRT).

A backend asked for by name that cannot run raises :class:`~fastdiff.errors.BackendUnavailable` listing every
reason. A torch model given with ``backend="onnxruntime"`` / ``"tensorrt"`` is exported on the fly into the cache
(``$FASTDIFF_CACHE_DIR`` or ``~/.cache/fastdiff``; see :mod:`fastdiff.export.cache`), keyed by its config, weights
and the export settings, and reused on later calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastdiff.backends.base import ModelRunner, TorchRunner
from fastdiff.errors import BackendUnavailable, InvalidInput, ModelNotFound, UnknownBackend
from fastdiff.exported.session import onnxruntime_reasons
from fastdiff.models.label_unet import is_label_model

MODEL_BACKENDS = ("torch", "onnxruntime", "tensorrt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


def model_backend_reasons(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """Model backend -> reasons it cannot run on ``device`` (empty list: available). Used by ``fastdiff info``."""
    from fastdiff.backends.tensorrt import tensorrt_reasons

    return {"onnxruntime": onnxruntime_reasons(device), "tensorrt": tensorrt_reasons(device)}


def make_runner(model: Any, backend: str = "torch", device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, **options: Any) -> ModelRunner:
    """A :class:`ModelRunner` for ``model`` on ``backend``.

    Args:
        model: a diffusers UNet / LabelConditionedUNet (``torch`` runs it eagerly; ``onnxruntime`` / ``tensorrt``
            export it on the fly), a path to an ``.onnx`` file (onnxruntime, or TensorRT with
            ``backend="tensorrt"``) or to a TensorRT engine (``.engine`` / ``.plan``), or a ModelRunner (returned).
        backend: ``"torch"`` (also ``"auto"``: for a path, the backend its suffix implies), ``"onnxruntime"``,
            ``"tensorrt"``.
        options: passed to the runner (``providers``, ``threads``, ``cache_dir``, ``profile``...).
    """
    if isinstance(model, ModelRunner):
        return model
    if backend not in MODEL_BACKENDS + ("auto",):
        raise UnknownBackend(f"unknown model backend {backend!r}; choose one of: {', '.join(MODEL_BACKENDS)}")
    if isinstance(model, (str, os.PathLike)):
        return _runner_for_path(Path(model), backend, device, dtype, options)
    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(f"cannot run a {type(model).__name__}: pass a diffusers UNet, a LabelConditionedUNet, an "
                           "exported .onnx / .engine path or a ModelRunner")
    unet = model.unet if is_label_model(model) else model
    p = next(unet.parameters())
    dev = torch.device(device) if device is not None else p.device
    if backend in ("torch", "auto"):
        if dev != p.device or (dtype is not None and dtype != p.dtype):
            model.to(device=dev, dtype=dtype)
        return TorchRunner(unet)
    _require(backend, dev, dtype or p.dtype)
    if backend == "onnxruntime":
        from fastdiff.backends.onnxruntime import OnnxRunner

        runner = OnnxRunner.from_torch(unet, device=dev, dtype=dtype, **options)
    else:
        from fastdiff.backends.tensorrt import TensorRTRunner

        runner = TensorRTRunner.from_torch(unet, device=dev, dtype=dtype, **options)
    if is_label_model(model):
        runner.label_model = model
    return runner


def _require(backend: str, device: torch.device, dtype: torch.dtype | None) -> None:
    if backend == "onnxruntime":
        reasons = onnxruntime_reasons(device, dtype)
    else:
        from fastdiff.backends.tensorrt import tensorrt_reasons

        reasons = tensorrt_reasons(device, dtype)
    if reasons:
        raise BackendUnavailable(backend, reasons)


def _runner_for_path(path: Path, backend: str, device, dtype, options: dict) -> ModelRunner:
    if not path.is_file():
        raise ModelNotFound(f"no exported model at {str(path)!r}; write one with python -m fastdiff.export")
    suffix = path.suffix.lower()
    dev = torch.device(device) if device is not None else None
    if suffix in ONNX_SUFFIXES:
        if backend == "tensorrt":
            from fastdiff.backends.tensorrt import TensorRTRunner

            _require("tensorrt", dev or torch.device("cuda"), dtype)
            return TensorRTRunner.from_onnx(path, device=dev, **options)
        _require("onnxruntime", dev or torch.device("cpu"), dtype)
        from fastdiff.backends.onnxruntime import OnnxRunner

        return OnnxRunner(path, device=dev, dtype=dtype, **options)
    if suffix in ENGINE_SUFFIXES:
        if backend == "onnxruntime":
            raise InvalidInput(f"{path.name} is a TensorRT engine; it runs with backend='tensorrt' (or 'auto'), "
                               "not onnxruntime; pass the .onnx file it was built from for onnxruntime")
        _require("tensorrt", dev or torch.device("cuda"), dtype)
        from fastdiff.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(path, device=dev, **options)
    raise InvalidInput(f"cannot tell the format of {path.name!r}: expected "
                       f"{', '.join(ONNX_SUFFIXES + ENGINE_SUFFIXES)}")
