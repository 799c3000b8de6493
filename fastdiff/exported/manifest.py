"""The manifest of an exported text-to-image pipeline (``python -m fastdiff.export shapes --format onnx``).

``manifest.json`` sits next to the component graphs and says what they are and how to check them::

    {"format": "fastdiff.onnx_pipeline", "version": 1, "model": "shapes", "opset": 18, "precision": "fp32",
     "files": [{"name": "unet.onnx", "sha256": "...", "bytes": 1234}, ...],      # every file, .data included
     "components": {"unet": {"file": "unet.onnx", "inputs": [...], "outputs": [...], "dims": {...},
                             "parity": [{"label": "opt", "max_abs": ..., "max_rel": ..., "tol": ..., ...}]},
                    "text_encoder": {...}, "vae_decoder": {...}},
     "scheduler": {...}, "defaults": {...}, "tokenizer": {...}, "vae": {...}, "versions": {...}, "timings": {...}}

:func:`read_manifest` reads it and checks every listed file against its recorded sha256, so a loader never runs a
truncated, replaced or half-updated set of graphs (an export publishes the manifest last).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastdiff._atomic import sha256_file
from fastdiff.errors import ModelConfigError, ModelNotFound
from fastdiff.exported.specs import DimRange, TensorSpec

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fastdiff.onnx_pipeline"
MANIFEST_VERSION = 1
#: the graphs of a text-to-image export, by component name
COMPONENTS = ("unet", "text_encoder", "vae_decoder")


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """``{"name", "sha256", "bytes"}`` of one exported file (``name`` relative to the export folder)."""
    p = Path(path)
    return {"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of the export in ``folder``; with ``verify`` every file it lists must exist with its recorded
    sha256. Raises :class:`~fastdiff.errors.ModelNotFound` for a missing manifest or a missing / changed file and
    :class:`~fastdiff.errors.ModelConfigError` for a manifest fastdiff did not write."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST_NAME
    hint = f"re-export with `python -m fastdiff.export MODEL --format onnx --out {folder}`"
    if not path.is_file():
        raise ModelNotFound(f"{folder} holds no {MANIFEST_NAME}: not a text-to-image ONNX export; {hint}")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"cannot read {path}: {e}; {hint}") from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ModelConfigError(f"{path} is not a fastdiff pipeline manifest (format {MANIFEST_FORMAT!r}); {hint}")
    if m.get("version") != MANIFEST_VERSION:
        raise ModelConfigError(f"{path} has manifest version {m.get('version')!r}; this fastdiff reads version "
                               f"{MANIFEST_VERSION}; {hint}")
    files, components = m.get("files"), m.get("components")
    if not isinstance(files, list) or not isinstance(components, dict):
        raise ModelConfigError(f"{path} lacks its 'files' list or 'components' table; {hint}")
    listed = set()
    for f in files:
        name = f.get("name") if isinstance(f, dict) else None
        # a plain file name: a manifest must not point a loader outside its folder
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
                or not isinstance(f.get("sha256"), str):
            raise ModelConfigError(f"{path}: file entry {f!r} needs a plain file name and a sha256; {hint}")
        listed.add(name)
    for comp in COMPONENTS:
        entry = components.get(comp)
        if not isinstance(entry, dict) or entry.get("file") not in listed:
            raise ModelConfigError(f"{path}: component {comp!r} is missing or names a file the manifest does not "
                                   f"list; {hint}")
        try:  # the signature a runner sizes its inputs from
            specs = [TensorSpec.from_dict(d) for d in entry["inputs"] + entry["outputs"]]
            dims = {k: DimRange(k, *v) for k, v in entry["dims"].items()}
            ok = all(isinstance(d, int) or d in dims for s in specs for d in s.dims)
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ModelConfigError(f"{path}: component {comp!r} has a malformed signature (inputs / outputs / dims); "
                                   f"{hint}")
    if verify:
        for f in files:
            p = folder / f["name"]
            if not p.is_file():
                raise ModelNotFound(f"{p} is listed in {MANIFEST_NAME} but missing; {hint}")
            have = sha256_file(p)
            if have != f["sha256"]:
                raise ModelNotFound(f"{p} has sha256 {have[:16]}..., not the {f['sha256'][:16]}... its manifest "
                                    f"records: damaged, replaced or from another export; {hint}")
    return m
