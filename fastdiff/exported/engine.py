"""The TensorRT engine file: a small container around TensorRT's serialized plan::

    b"FDTRTENG" | u32 header length | sha256(header) (32 bytes) | header JSON | plan bytes

The header (:class:`EngineMeta`) records the TensorRT version, GPU name and compute capability, ONNX digest, shapes,
the plan's size and sha256, and the exported graph's fastdiff metadata (signature, dimension ranges, label table), so
a corrupt file or one built for another TensorRT version / GPU is recognised before TensorRT sees it. Bare ``.plan``
files (no header) are accepted; TensorRT itself then checks them. The engine builder
(:mod:`fastdiff.export.tensorrt`) writes these files, :func:`load_engine_file` reads one given explicitly.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastdiff.errors import BackendUnavailable, ExportError, InvalidInput

ENGINE_MAGIC = b"FDTRTENG"
ENGINE_FORMAT = 1
_HEADER_LEN = struct.Struct("<I")


class EngineCorrupt(ExportError):
    """An engine file is truncated, damaged or not an engine at all."""


class EngineMismatch(ExportError):
    """An engine was built for another TensorRT version or another GPU."""


def import_trt():
    """The ``tensorrt`` module, or :class:`BackendUnavailable` saying why it cannot be imported."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable("tensorrt", [f"the tensorrt Python package is not importable ({e})"],
                                 hint="Install TensorRT (pip install tensorrt, on a machine with an NVIDIA GPU) or "
                                      "use backend='onnxruntime'.") from e
    if not hasattr(trt, "Builder"):
        raise BackendUnavailable("tensorrt", [f"the installed tensorrt ({getattr(trt, '__version__', '?')}) has no "
                                              "builder (tensorrt-lean / -dispatch runtime only?)"],
                                 hint="Install the full tensorrt package to build engines.")
    return trt


def gpu_identity(device: Any = None) -> dict[str, str] | None:
    """``{"name", "capability"}`` of the CUDA device (engines are specific to both), or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}


@dataclass
class EngineMeta:
    """The header of a fastdiff engine file."""

    trt_version: str
    gpu: dict[str, str]
    onnx_digest: str
    precision: str
    shapes: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes
    profile: dict[str, Any] = field(default_factory=dict)
    graph_metadata: dict[str, str] = field(default_factory=dict)  # the ONNX file's fastdiff.* metadata_props
    onnx_path: str = ""
    plan_size: int = 0
    plan_sha256: str = ""
    build_seconds: float = 0.0
    created: str = ""
    format: int = ENGINE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineMeta:
        d = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def pack_engine(plan: bytes, meta: EngineMeta) -> bytes:
    """The engine file bytes (see module docstring); fills ``meta.plan_size`` / ``plan_sha256``."""
    meta.plan_size = len(plan)
    meta.plan_sha256 = hashlib.sha256(plan).hexdigest()
    header = meta.to_json().encode()
    return ENGINE_MAGIC + _HEADER_LEN.pack(len(header)) + hashlib.sha256(header).digest() + header + plan


def unpack_engine(data: bytes, source: str = "engine") -> tuple[EngineMeta | None, bytes]:
    """(header or None for a bare TensorRT plan, plan bytes); :class:`EngineCorrupt` when damaged."""
    if not data.startswith(ENGINE_MAGIC):
        if len(data) < 64:
            raise EngineCorrupt(f"{source} is {len(data)} bytes: too short to be a TensorRT engine")
        return None, data  # a bare plan from trtexec or elsewhere; TensorRT validates it on deserialization
    start = len(ENGINE_MAGIC) + _HEADER_LEN.size + 32
    if len(data) < start:
        raise EngineCorrupt(f"{source} is truncated inside its header")
    (n,) = _HEADER_LEN.unpack_from(data, len(ENGINE_MAGIC))
    header = data[start:start + n]
    if len(header) != n or hashlib.sha256(header).digest() != data[start - 32:start]:
        raise EngineCorrupt(f"{source} has a damaged or truncated header")
    try:
        meta = EngineMeta.from_json(header.decode())
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise EngineCorrupt(f"{source} has an unreadable header ({e})") from e
    plan = data[start + n:]
    if len(plan) != meta.plan_size:
        raise EngineCorrupt(f"{source} is truncated or padded: the plan is {len(plan)} bytes, its header says "
                            f"{meta.plan_size}")
    if hashlib.sha256(plan).hexdigest() != meta.plan_sha256:
        raise EngineCorrupt(f"{source} is damaged: the plan's sha256 does not match its header")
    return meta, plan


def compatibility_problems(meta: EngineMeta, trt_version: str, gpu: dict[str, str] | None) -> list[str]:
    """Why an engine built as ``meta`` says cannot run with this TensorRT on this GPU (empty: it can)."""
    problems = []
    if meta.format != ENGINE_FORMAT:
        problems.append(f"engine container format {meta.format}, this fastdiff reads {ENGINE_FORMAT}")
    if meta.trt_version != trt_version:
        problems.append(f"built with TensorRT {meta.trt_version}, this is TensorRT {trt_version}")
    if gpu is None:
        problems.append("no CUDA GPU is visible")
    elif meta.gpu != gpu:
        problems.append(f"built for {meta.gpu.get('name')} (compute capability {meta.gpu.get('capability')}), this "
                        f"GPU is {gpu['name']} (compute capability {gpu['capability']})")
    return problems


def load_engine_file(path: Path, trt_version: str, gpu: dict[str, str] | None) -> tuple[EngineMeta | None, bytes]:
    """Read and check an engine file given explicitly: :class:`EngineCorrupt` / :class:`EngineMismatch` (never
    rebuilt, since the user chose this file) with a message that says how to rebuild it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read engine file {str(path)!r}: {e}") from e
    try:
        meta, plan = unpack_engine(data, str(path))
    except EngineCorrupt as e:
        raise EngineCorrupt(f"{e}. Rebuild it: python -m fastdiff.export MODEL.onnx --format tensorrt --out DIR") \
            from e
    if meta is not None:
        problems = compatibility_problems(meta, trt_version, gpu)
        if problems:
            src = meta.onnx_path or "MODEL.onnx"
            raise EngineMismatch(f"engine {path} cannot run here: " + "; ".join(problems) + ". TensorRT engines are "
                                 "specific to the TensorRT version and the GPU; rebuild it on this machine: "
                                 f"python -m fastdiff.export {src} --format tensorrt --out DIR")
    return meta, plan

