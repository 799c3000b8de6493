"""Model-backend registry: ``make_runner(model, backend, device, dtype)`` for ``"torch"``, ``"onnxruntime"``,
``"tensorrt"`` and for exported files (``.onnx`` -> onnxruntime, ``.engine`` / ``.plan`` -> TensorRT).

A backend asked for by name that cannot run raises :class:`~fastdiff.errors.BackendUnavailable` listing every
reason (GUIDE section 3). A torch model given with ``backend="onnxruntime"`` / ``"tensorrt"`` is exported on the fly
into the cache (``$FASTDIFF_CACHE_DIR`` or ``~/.cache/fastdiff``), keyed by its config, weights and the export
settings, and reused on later calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastdiff.backends.base import ModelRunner, TorchRunner
from fastdiff.errors import BackendUnavailable, ExportError, InvalidInput, ModelNotFound, UnknownBackend
from fastdiff.models.label_unet import is_label_model

MODEL_BACKENDS = ("torch", "onnxruntime", "tensorrt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
#: dimension ranges of on-the-fly exports (wide: onnxruntime serves any size; TensorRT engines use a profile)
ON_THE_FLY_OPSET = 18


def model_backend_reasons(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """Model backend -> reasons it cannot run on ``device`` (empty list: available). Used by ``fastdiff info``."""
    from fastdiff.backends.onnxruntime import onnxruntime_reasons
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
        from fastdiff.backends.onnxruntime import onnxruntime_reasons

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


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def on_the_fly_profile(facts: dict[str, Any]):
    """Wide ranges for on-the-fly exports: batch 1..1024, sizes from the down-sampling factor to 16x the trained
    size (onnxruntime serves any size; these bounds only guide the tracer), tokens 1..1024 (opt 77)."""
    from fastdiff.export.profiles import DimRange, ExportProfile

    s = int(facts.get("sample_size") or 64)
    d = int(facts.get("down_factor", 1))
    hi = max(16 * s, 256) // d * d
    opt = max(d, s // d * d)
    dims = {"batch": DimRange("batch", 1, 2, 1024), "height": DimRange("height", d, opt, hi, d),
            "width": DimRange("width", d, opt, hi, d)}
    if facts.get("cross_attention_dim"):
        t = facts.get("tokens")
        dims["tokens"] = DimRange("tokens", t, t, t) if t else DimRange("tokens", 1, 77, 1024)
    return ExportProfile(name="on-the-fly", family=facts.get("family", "custom"), dims=dims,
                         opset=ON_THE_FLY_OPSET, source="(on-the-fly export)")


def cached_onnx_export(unet: torch.nn.Module, dtype: torch.dtype, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> Path:
    """Export ``unet`` to ONNX once per (config, weights, dtype, versions) into the cache; return the path."""
    import fastdiff
    from fastdiff.export._files import cache_root
    from fastdiff.export.api import export_onnx
    from fastdiff.export.source import ModelSource, unet_facts

    if dtype not in (torch.float32, torch.float16):
        raise BackendUnavailable("onnxruntime", [f"dtype {dtype} is not supported (float32, float16)"])
    precision = "fp16" if dtype == torch.float16 else "fp32"
    facts = unet_facts(unet)
    profile = on_the_fly_profile(facts)
    key_src = json.dumps({"class": type(unet).__name__, "config": {k: str(v) for k, v in dict(unet.config).items()},
                          "weights": weights_digest(unet), "precision": precision, "profile": profile.to_json(),
                          "fastdiff": fastdiff.__version__, "torch": torch.__version__}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "onnx"
    path = folder / key / "model.onnx"
    if path.is_file():
        return path
    cpu = unet if next(unet.parameters()).device.type == "cpu" else None
    if cpu is None:
        import copy

        cpu = copy.deepcopy(unet).to("cpu")
    source = ModelSource(name=getattr(unet, "name", type(unet).__name__), unet=cpu.eval(), facts=facts,
                         origin="torch module (on-the-fly export)")
    try:
        export_onnx(source, path.parent, profile=profile, precision=precision, progress=progress)
    except ExportError as e:
        fixes = getattr(e, "suggested_dims", None)
        if not fixes:
            raise
        # the wide on-the-fly ranges are arbitrary: take torch.export's narrower suggestion and try once more
        export_onnx(source, path.parent, profile=profile.narrowed(**fixes), precision=precision, progress=progress)
    return path
