"""The export entry points behind ``python -m fastdiff.export``: :func:`export_onnx` and :func:`resolve_profile`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastdiff._atomic import atomic_write_text, check_writable
from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.export.profiles import ExportProfile, auto_profile, infer_family, load_profile
from fastdiff.export.report import ExportReport
from fastdiff.export.source import ModelSource, resolve_model
from fastdiff.exported.metadata import GraphInfo, onnx_file_metadata
from fastdiff.exported.specs import DimRange


def resolve_profile(facts: dict[str, Any], profile: str | ExportProfile | None = None, *,
                    precision: str | None = None, opset: int | None = None,
                    **requests: DimRange | str | int | None) -> ExportProfile:
    """The profile an export uses: the one named (or the family's, inferred from the model, or one derived from
    the model's config), checked against the model, with heights / widths rounded to the model's down-sampling
    factor, tokens fixed for label-conditioned models, then narrowed by ``requests`` (``batch="1:2:4"``, ...).

    Raises :class:`~fastdiff.errors.InvalidInput` when a request leaves the profile's range (naming the dimension
    and the range) or the model does not match the profile."""
    if isinstance(profile, ExportProfile):
        p = profile
    elif profile is None:
        family = infer_family(facts)
        p = load_profile(family) if family else auto_profile(facts)
    else:
        p = load_profile(profile)
    p.check_model(facts)
    dims = dict(p.dims)
    for name in ("height", "width"):
        dims[name] = p.dim(name).with_multiple(int(facts.get("down_factor", 1)))
    if not facts.get("cross_attention_dim"):
        dims.pop("tokens", None)
    elif "tokens" not in dims:
        t = int(facts.get("tokens") or 77)
        dims["tokens"] = DimRange("tokens", t, t, t)
    p = replace(p, dims=dims)
    if facts.get("tokens") and requests.get("tokens") is None and "tokens" in dims:
        requests["tokens"] = int(facts["tokens"])  # a label embedding has a fixed number of tokens
    return p.narrowed(**requests).with_overrides(precision, opset)


def export_onnx(model: Any, out_dir: str | Path, *, profile: str | ExportProfile | None = None,
                precision: str | None = None, opset: int | None = None, batch: str | int | None = None,
                height: str | int | None = None, width: str | int | None = None, tokens: str | int | None = None,
                sampler: Any = None, steps: int | None = None, guidance_scale: float | None = None,
                filename: str | None = None, external_data: str = "auto", parity: bool = True,
                parity_tol: float | None = None, progress: bool = True) -> ExportReport:
    """Export a model to ONNX: the UNet call, or with ``sampler=`` (``"onestep"``, ``"lcm4"``, a Scheduler) the
    whole unrolled sampling loop. Writes ``out_dir/model.onnx`` (or ``sampler_<spec>.onnx``) and a
    ``<file>.report.json``, every file atomically; returns the :class:`ExportReport`.

    Args:
        model: embedded name, fastdiff / diffusers model folder, LabelConditionedUNet or diffusers UNet.
        profile: profile name / path / object; None infers the family's or derives one from the model.
        precision, opset: override the profile's ("fp32" / "fp16"; opset >= 18).
        batch, height, width, tokens: narrow the profile (``4``, ``"1:8"``, ``"1:2:8"``), model-input units.
        external_data: "auto" (over ~2 GB of weights), "always" or "never".
        parity: compare onnxruntime with PyTorch on random inputs and fail over ``parity_tol``.
    """
    from fastdiff.export.onnx import export_graph, unet_graph

    out_dir = check_writable(out_dir, "dir", what="the output folder")  # before a trace of seconds to minutes
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    prof = resolve_profile(source.facts, profile, precision=precision, opset=opset, batch=batch, height=height,
                           width=width, tokens=tokens)
    if sampler is None:
        graph = unet_graph(source, prof)
        filename = filename or "model.onnx"
    else:
        from fastdiff.export.unrolled import sampler_graph

        graph, plan = sampler_graph(source, prof, sampler, steps, guidance_scale)
        filename = filename or f"sampler_{plan.scheduler}{plan.num_steps}.onnx"
    report = ExportReport(model=source.name, format="onnx", profile=prof.name)
    export_graph(graph, out_dir, filename, external_data=external_data, parity=parity, parity_tol=parity_tol,
                 progress=progress, report=report)
    atomic_write_text(out_dir / (filename + ".report.json"), report.to_json())
    return report


def export_tensorrt(model: Any, out_dir: str | Path, *, profile: str | ExportProfile | None = None,
                    precision: str | None = None, opset: int | None = None, batch: str | int | None = None,
                    height: str | int | None = None, width: str | int | None = None, tokens: str | int | None = None,
                    sampler: Any = None,
                    steps: int | None = None, guidance_scale: float | None = None,
                    cache_dir: str | Path | None = None, parity: bool = True, parity_tol: float | None = None,
                    external_data: str = "auto", progress: bool = True) -> ExportReport:
    """Build a TensorRT engine (``out_dir/model.engine``) from a model (exported to ONNX first, in fp32: TensorRT
    runs fp16 kernels with ``BuilderFlag.FP16``) or from an existing fastdiff ``.onnx`` file. Shapes come from the
    export profile narrowed by ``batch`` / ``height`` / ``width`` / ``tokens``; every range is checked before any
    export or build. Engines are cached (see :func:`fastdiff.export.tensorrt.get_engine`)."""
    from fastdiff.export import tensorrt as ftrt
    from fastdiff.export._files import publish, staging_dir

    out_dir = check_writable(out_dir, "dir", what="the output folder")  # before an export or engine build
    requests = {"batch": batch, "height": height, "width": width, "tokens": tokens}
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        onnx_path = Path(model)
        if not onnx_path.is_file():
            raise InvalidInput(f"no ONNX file at {str(onnx_path)!r}")
        meta = onnx_file_metadata(onnx_path)
        info = GraphInfo.from_metadata(meta)
        if profile is None:
            if "fastdiff.profile" not in meta:
                raise InvalidInput(f"{onnx_path} has no fastdiff export profile in its metadata; pass --profile")
            prof = ExportProfile.from_dict(json.loads(meta["fastdiff.profile"]), source=str(onnx_path))
        else:
            prof = profile if isinstance(profile, ExportProfile) else load_profile(profile)
        prof = prof.narrowed(**requests).with_overrides(precision)
        used = {d for s in info.inputs for d in s.dims if isinstance(d, str)}
        prof = replace(prof, dims={k: v for k, v in prof.dims.items() if k in used})
        ftrt.check_within(prof.dims, info.dims, f"the ONNX file {onnx_path.name} (exported range)",
                          prof.latent_scale)
        report = ExportReport(model=info.model or onnx_path.stem, format="tensorrt", kind=info.kind,
                              profile=prof.name, precision=prof.precision)
        ftrt.import_trt()
        gpu = ftrt.gpu_identity()
        if gpu is None:
            raise BackendUnavailable("tensorrt", ["no CUDA GPU is visible; TensorRT engines are built for a GPU"])
    else:
        source = model if isinstance(model, ModelSource) else resolve_model(model)
        prof = resolve_profile(source.facts, profile, precision=precision, opset=opset, **requests)
        ftrt.import_trt()  # fail before a long ONNX export when TensorRT cannot build anyway
        if ftrt.gpu_identity() is None:
            raise BackendUnavailable("tensorrt", ["no CUDA GPU is visible; TensorRT engines are built for a GPU"])
        onnx_report = export_onnx(source, out_dir, profile=replace(prof, precision="fp32"), sampler=sampler,
                                  steps=steps, guidance_scale=guidance_scale, external_data=external_data,
                                  parity=parity, parity_tol=parity_tol, progress=progress)
        onnx_path = Path(onnx_report.files[-1][0])
        meta = onnx_file_metadata(onnx_path)
        info = GraphInfo.from_metadata(meta)
        report = ExportReport(model=source.name, format="tensorrt", kind=info.kind, profile=prof.name,
                              precision=prof.precision, opset=onnx_report.opset, files=list(onnx_report.files),
                              parity=list(onnx_report.parity), timings=dict(onnx_report.timings))
    shapes = ftrt.engine_shapes(info.inputs, prof.dims)
    settings = {k: prof.tensorrt[k] for k in ("workspace_mb", "builder_optimization_level") if k in prof.tensorrt}
    fmeta = {k: v for k, v in meta.items() if k.startswith("fastdiff.")}
    fmeta["fastdiff.dims"] = json.dumps({k: v.as_list() for k, v in prof.dims.items()})
    result = ftrt.get_engine(onnx_path, shapes, prof.precision, profile=prof.to_dict(), graph_metadata=fmeta,
                             cache_dir=Path(cache_dir) if cache_dir else None, builder_settings=settings,
                             progress=progress)
    report.notes += result.notes + ([] if result.built else [f"engine from the cache ({result.path})"])
    report.build_time = result.meta.build_seconds if result.built else None
    with staging_dir(out_dir) as stage:
        staged = stage / (onnx_path.stem + ".engine")
        staged.write_bytes(result.path.read_bytes())
        for p in publish([staged], out_dir):
            report.add_file(p)
    if parity:
        report.parity += ftrt.engine_parity(Path(report.files[-1][0]), onnx_path, prof, parity_tol)
    atomic_write_text(out_dir / (onnx_path.stem + ".engine.report.json"), report.to_json())
    return report
