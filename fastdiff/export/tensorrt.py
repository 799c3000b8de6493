"""TensorRT engines: build from an exported ONNX file with an optimization profile taken from an export profile,
fp16, a persistent timing cache, and an engine cache keyed by (ONNX digest, TensorRT version, GPU, profile,
precision, builder settings).

Engine files are a small container around TensorRT's serialized plan::

    b"FDTRTENG" | u32 header length | sha256(header) (32 bytes) | header JSON | plan bytes

The header records the TensorRT version, GPU name and compute capability, ONNX digest, shapes, the plan's size
and sha256, and the exported graph's fastdiff metadata (signature, dimension ranges, label table), so a corrupt
file or one built for another TensorRT version / GPU is recognised before TensorRT sees it: a cached engine is
rebuilt, an engine file given explicitly is refused with a message that says how to rebuild it. Bare ``.plan``
files (no header) are accepted; TensorRT itself then checks them.

Written against the TensorRT 10 Python API (``build_serialized_network``, ``set_memory_pool_limit``, timing cache,
``IProgressMonitor``, ``execute_async_v3``); TensorRT 8.6+ also works for the builder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastdiff._atomic import atomic_write_bytes
from fastdiff.errors import BackendUnavailable, ExportError, InvalidInput
from fastdiff.export._files import cache_root, onnx_digest
from fastdiff.export.profiles import DimRange
from fastdiff.export.signature import TensorSpec

log = logging.getLogger("fastdiff")

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


def engine_cache_key(onnx_sha: str, trt_version: str, gpu: dict[str, str] | None, shapes: dict[str, Any],
                     precision: str, builder: dict[str, Any] | None = None) -> str:
    """The engine cache key: sha256 over everything an engine depends on (ONNX digest, TensorRT version, GPU name
    and compute capability, optimization-profile shapes, precision, builder settings)."""
    if gpu is None:
        raise BackendUnavailable("tensorrt", ["no CUDA GPU is visible; TensorRT engines are built for a GPU"])
    src = json.dumps({"onnx": onnx_sha, "trt": trt_version, "gpu": gpu, "shapes": shapes, "precision": precision,
                      "builder": builder or {}, "format": ENGINE_FORMAT}, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:40]


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


def engine_shapes(inputs: list[TensorSpec], dims: dict[str, DimRange]) -> dict[str, list[list[int]]]:
    """The optimization profile: input name -> [min, opt, max] shapes from the dimension ranges."""
    out = {}
    for spec in inputs:
        shapes = []
        for which in ("min", "opt", "max"):
            sizes = {k: getattr(r, which) for k, r in dims.items()}
            try:
                shapes.append(list(spec.shape(sizes)))
            except KeyError as e:
                raise InvalidInput(f"input {spec.name!r} {spec.describe()} uses dimension {e.args[0]!r}, which the "
                                   "profile does not define") from e
        out[spec.name] = shapes
    return out


def check_within(requested: dict[str, DimRange], exported: dict[str, DimRange], where: str,
                 unit_scale: int = 1) -> None:
    """Every requested range must lie inside the range the ONNX graph was exported for (before any build)."""
    for name, req in requested.items():
        have = exported.get(name)
        if have is None:
            continue
        for v in (req.min, req.opt, req.max):
            have.check(v, where, unit_scale)


def _make_progress_monitor(trt):
    """A ``trt.IProgressMonitor`` driving tqdm bars per build phase (TensorRT >= 10), or None."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm.auto import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT {phase_name}", leave=False,
                                          position=len(self._bars))

        def step_complete(self, phase_name, step):
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step - bar.n + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()


def build_plan(onnx_path: Path, shapes: dict[str, list[list[int]]], precision: str, *, workspace_mb: int = 4096,
               optimization_level: int | None = None, timing_cache: Path | None = None, progress: bool = True,
               trt=None) -> bytes:
    """Parse the ONNX file and build a serialized TensorRT plan with one optimization profile (``shapes``).
    ``precision="fp16"`` sets ``BuilderFlag.FP16`` (the graph stays fp32-typed and TensorRT picks fp16 kernels where
    it can, as NVIDIA's diffusion demo does); the timing cache at ``timing_cache`` is read and updated."""
    trt = trt or import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ExportError(f"the ONNX input {name!r} has no shapes in the optimization profile "
                              f"({sorted(shapes)})")
        lo, opt, hi = (tuple(s) for s in shapes[name])
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if progress:
        monitor = _make_progress_monitor(trt)
        if monitor is not None:
            config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see TensorRT's log above); try a "
                          "narrower profile (--batch / --height / --width) or more workspace")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


@dataclass
class EngineResult:
    path: Path
    meta: EngineMeta
    built: bool
    notes: list[str] = field(default_factory=list)


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


def get_engine(onnx_path: Path, shapes: dict[str, list[list[int]]], precision: str, *, profile: dict | None = None,
               graph_metadata: dict[str, str] | None = None, cache_dir: Path | None = None,
               builder_settings: dict[str, Any] | None = None, progress: bool = True,
               trt_version: str | None = None, gpu: dict[str, str] | None = None,
               build: Callable[..., bytes] | None = None) -> EngineResult:
    """The engine for (ONNX, shapes, precision) from the cache, or built and cached. A cached engine that is
    corrupt or was built for another TensorRT / GPU is rebuilt (with a note). ``build`` / ``trt_version`` /
    ``gpu`` default to the real TensorRT and GPU (tests inject stand-ins)."""
    if build is None:
        trt = import_trt()
        trt_version = trt_version or str(trt.__version__)

        def build(onnx, shp, prec, **kw):
            return build_plan(onnx, shp, prec, trt=trt, **kw)
    gpu = gpu if gpu is not None else gpu_identity()
    settings = dict(builder_settings or {})
    digest = onnx_digest(onnx_path)
    key = engine_cache_key(digest, str(trt_version), gpu, shapes, precision, settings)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / "engines" / f"{key}.engine"
    notes: list[str] = []
    if path.is_file():
        try:
            meta, _ = unpack_engine(path.read_bytes(), str(path))
            problems = compatibility_problems(meta, str(trt_version), gpu) if meta else ["no fastdiff header"]
        except EngineCorrupt as e:
            problems = [str(e)]
        if not problems:
            return EngineResult(path, meta, built=False)
        notes.append(f"cached engine {path.name} was unusable ({'; '.join(problems)}); rebuilt it")
        log.warning(notes[-1])
    timing = root / "timing" / f"trt{trt_version}-{gpu['name'].replace(' ', '_')}-{gpu['capability']}.cache"
    timing.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = build(onnx_path, shapes, precision, workspace_mb=settings.get("workspace_mb", 4096),
                 optimization_level=settings.get("builder_optimization_level"), timing_cache=timing,
                 progress=progress)
    meta = EngineMeta(trt_version=str(trt_version), gpu=gpu, onnx_digest=digest, precision=precision, shapes=shapes,
                      profile=dict(profile or {}), graph_metadata=dict(graph_metadata or {}),
                      onnx_path=str(onnx_path), build_seconds=time.perf_counter() - start,
                      created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_bytes(path, pack_engine(plan, meta))
    return EngineResult(path, meta, built=True, notes=notes)
