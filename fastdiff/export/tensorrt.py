"""TensorRT engines: build from an exported ONNX file with an optimization profile taken from an export profile,
fp16, a persistent timing cache, and an engine cache keyed by (ONNX digest, TensorRT version, GPU, profile,
precision, builder settings); then check the engine against onnxruntime (:func:`engine_parity`).

Engines are written in fastdiff's engine container (:mod:`fastdiff.exported.engine`: an ``FDTRTENG`` header that
records the TensorRT version, GPU, ONNX digest, shapes and the graph's fastdiff metadata, then the plan). A cached
engine that is corrupt or was built for another TensorRT version / GPU is rebuilt; an engine file given explicitly
is refused by :func:`fastdiff.exported.engine.load_engine_file` with a message that says how to rebuild it.

Written against the TensorRT 10 Python API (``build_serialized_network``, ``set_memory_pool_limit``, timing cache,
``IProgressMonitor``); TensorRT 8.6+ also works for the builder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdiff._atomic import atomic_write_bytes
from fastdiff.errors import BackendUnavailable, ExportError, InvalidInput
from fastdiff.export._files import cache_root, onnx_digest
from fastdiff.export.onnx import PARITY_TOL
from fastdiff.export.profiles import ExportProfile
from fastdiff.export.report import ParityResult
from fastdiff.export.signature import example_sizes, random_inputs
from fastdiff.exported.engine import (
    ENGINE_FORMAT,
    EngineCorrupt,
    EngineMeta,
    compatibility_problems,
    gpu_identity,
    import_trt,
    pack_engine,
    unpack_engine,
)
from fastdiff.exported.metadata import read_graph_info
from fastdiff.exported.session import EngineSession, make_session
from fastdiff.exported.specs import DimRange, TensorSpec

log = logging.getLogger("fastdiff")


def engine_cache_key(onnx_sha: str, trt_version: str, gpu: dict[str, str] | None, shapes: dict[str, Any],
                     precision: str, builder: dict[str, Any] | None = None) -> str:
    """The engine cache key: sha256 over everything an engine depends on (ONNX digest, TensorRT version, GPU name
    and compute capability, optimization-profile shapes, precision, builder settings)."""
    if gpu is None:
        raise BackendUnavailable("tensorrt", ["no CUDA GPU is visible; TensorRT engines are built for a GPU"])
    src = json.dumps({"onnx": onnx_sha, "trt": trt_version, "gpu": gpu, "shapes": shapes, "precision": precision,
                      "builder": builder or {}, "format": ENGINE_FORMAT}, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:40]



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


def engine_parity(engine_path: Path, onnx_path: Path, profile: ExportProfile, tol: float | None = None
                  ) -> list[ParityResult]:
    """TensorRT against onnxruntime (same ONNX, CPU) on random inputs at the profile's opt point."""
    tol = PARITY_TOL[profile.precision] if tol is None else tol
    sess = make_session(onnx_path, torch.device("cpu"))
    info = read_graph_info(sess)
    sizes = example_sizes(profile.dims, "opt")
    args = random_inputs(info.inputs, sizes, torch.Generator().manual_seed(0))
    feeds = {s.name: a.numpy() for s, a in zip(info.inputs, args, strict=True)}
    ref = torch.from_numpy(sess.run(None, feeds)[0]).double()
    engine = EngineSession(engine_path)
    got = engine.run({s.name: a.to(engine.device) for s, a in zip(info.inputs, args, strict=True)})
    torch.cuda.synchronize(engine.device)
    err = (got.double().cpu() - ref).abs()
    max_abs = float(err.max())
    max_rel = max_abs / max(float(ref.abs().max()), 1e-30)
    return [ParityResult("trt", {k: v for k, v in sizes.items() if not profile.dims[k].static}, max_abs, max_rel,
                         tol, max_rel <= tol)]
