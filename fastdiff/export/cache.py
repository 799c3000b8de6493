"""The on-the-fly export cache: a torch model run with ``backend="onnxruntime"`` / ``"tensorrt"`` is exported once
into ``$FASTDIFF_CACHE_DIR`` (or ``~/.cache/fastdiff``), keyed by its config, weights and the export settings, and
reused on later calls; TensorRT engines built from those files (or from any exported ONNX file) go through the engine
cache of :mod:`fastdiff.export.tensorrt`.

These are the entry points the model runners (:mod:`fastdiff.backends`) call to get a file; everything else of the
exporter stays behind them, and the export package never imports the runners.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from fastdiff._atomic import atomic_write_text
from fastdiff.errors import BackendUnavailable, ExportError
from fastdiff.export._files import cache_root, onnx_digest
from fastdiff.export.api import export_onnx, export_tensorrt, resolve_profile
from fastdiff.export.profiles import ExportProfile
from fastdiff.export.source import ModelSource, unet_facts
from fastdiff.exported.specs import DimRange

#: opset of on-the-fly exports (their dimension ranges are wide: onnxruntime serves any size; TensorRT engines
#: use a profile)
ON_THE_FLY_OPSET = 18


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def on_the_fly_profile(facts: dict[str, Any]) -> ExportProfile:
    """Wide ranges for on-the-fly exports: batch 1..1024, sizes from the down-sampling factor to 16x the trained
    size (onnxruntime serves any size; these bounds only guide the tracer), tokens 1..1024 (opt 77)."""
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
    """Export ``unet`` to ONNX once per (config, weights digest, dtype, versions) into the cache; return the path.

    Each entry's digest is recorded (``model.onnx.sha256``, written atomically after a successful, parity-checked
    export) and checked on every load; an entry that fails the check (truncated, modified, never finished) is
    rebuilt once with a :class:`CacheEntryRebuilt` warning naming it and what was wrong."""
    import fastdiff

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
    record = _checksum_path(path)
    if path.is_file() or record.exists():
        problem = _entry_problem(path)
        if problem is None:
            return path
        # rebuilt once, in place: the export below publishes atomically and its record is written last, so a
        # crash during the rebuild leaves an entry without a record, which the next call rebuilds again
        warnings.warn(f"the cached ONNX export {path} is unusable ({problem}); rebuilding it", CacheEntryRebuilt,
                      stacklevel=2)
        record.unlink(missing_ok=True)
    cpu = unet if next(unet.parameters()).device.type == "cpu" else None
    if cpu is None:
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
    # the file passed the exporter's parity check: record its digest so a later load can tell it is still that file
    atomic_write_text(record, onnx_digest(path) + "  " + path.name + "\n")
    return path


class CacheEntryRebuilt(UserWarning):
    """A cached on-the-fly export failed its check on load and was rebuilt (the message says which and why)."""


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _entry_problem(path: Path) -> str | None:
    """Why the cached export ``path`` cannot be trusted, or None when its digest (the ONNX file and its external
    data) is the one recorded after its export. A digest and not a parity run: it catches truncation and any
    change of a weight for the cost of reading the file once: 4-18 ms for the digits model's 5 MiB file on a loaded
    2-core CPU, against about a minute for the export it replaces."""
    record = _checksum_path(path)
    if not path.is_file():
        return "the ONNX file is missing"
    if not record.is_file():
        return "no checksum record: its export was interrupted, or it was made by an older fastdiff"
    try:
        want = record.read_text().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return f"its checksum record {record.name} is unreadable"
    have = onnx_digest(path)
    if have != want:
        return (f"its sha256 {have[:16]}... is not the recorded {want[:16]}...: the file was truncated or "
                "modified after the export")
    return None


def cached_engine(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, profile: str | ExportProfile | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  **requests: str | int | None) -> Path:
    """The TensorRT engine of an exported ONNX file for ``profile`` (default: the profile stored in the file)
    narrowed by ``requests`` (``batch="1:2:4"``...), from the engine cache or built into it, written to
    ``out_dir``; returns the engine file's path. No parity check (the runner is about to run it)."""
    report = export_tensorrt(onnx_path, out_dir, profile=profile, cache_dir=cache_dir, parity=False,
                             progress=progress, **requests)
    return Path(report.files[-1][0])


def cached_torch_engine(unet: torch.nn.Module, dtype: torch.dtype | None = None,
                        profile: str | ExportProfile | None = None, cache_dir: str | os.PathLike | None = None,
                        progress: bool = True, **requests: str | int | None) -> Path:
    """``unet`` exported to ONNX (fp32, cached: :func:`cached_onnx_export`), then its engine for ``profile``
    (default: the model family's profile, or one derived from its config; fp16 when ``dtype`` is float16), narrowed
    by ``requests``; returns the engine file's path (beside the cached ONNX file)."""
    onnx_path = cached_onnx_export(unet, torch.float32, cache_dir, progress)
    prof = resolve_profile(unet_facts(unet), profile, precision="fp16" if dtype == torch.float16 else None,
                           **requests)
    return cached_engine(onnx_path, onnx_path.parent, prof, cache_dir, progress)
