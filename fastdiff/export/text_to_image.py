"""ONNX export of a text-to-image pipeline's components (the ``shapes`` teacher, its one-step student
``shapes-onestep``): ``python -m fastdiff.export shapes --format onnx [--out DIR]`` (or a folder written by
``train shapes`` / ``train shapes-onestep``).

Three graphs, each with a dynamic batch (the *model* batch: 2 x images under classifier-free guidance), each traced,
validated and parity-checked against PyTorch with onnxruntime on random inputs by the one UNet export path
(:func:`fastdiff.export.onnx.export_graph`)::

    unet.onnx          sample (batch, 4, 16, 16), timestep (batch,) float32, encoder_hidden_states (batch, 24, D)
                       -> out_sample (batch, 4, 16, 16)
    text_encoder.onnx  input_ids (batch, 24) int64 -> last_hidden_state (batch, 24, D)
    vae_decoder.onnx   latents (batch, 4, 16, 16), as the sampling loop ends with them
                       -> image (batch, 3, 64, 64) in [0, 1]: vae.decode(latents / scaling_factor) / 2 + 0.5, clamped

plus ``manifest.json`` (:mod:`fastdiff.exported.manifest`: files, sha256, opset, parity numbers, scheduler, defaults,
and a student's ``limits``: the runner refuses more steps than it was trained for).
Every graph is staged first; nothing reaches ``--out`` unless all three pass their parity check, and the manifest
is published last, so a loader that verifies it never runs a half-updated set. Sizes come from the ``shapes``
export profile (``export/shapes.toml``); ``--batch`` narrows it, ``--precision fp16`` exports all three in fp16.
:class:`fastdiff.backends.onnx_pipeline.OnnxTextToImage` samples the exported folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdiff._atomic import atomic_write_text, check_writable
from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.export.api import resolve_profile
from fastdiff.export.onnx import GraphExport, base_metadata, export_graph, model_copy, unet_graph
from fastdiff.export.profiles import ExportProfile
from fastdiff.export.report import ExportReport
from fastdiff.export.source import ModelSource, unet_facts
from fastdiff.exported.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, file_entry
from fastdiff.exported.specs import TensorSpec

#: the export profile of the shipped pipeline (export/shapes.toml)
PROFILE = "shapes"
#: component -> file name in the export folder
FILES = {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx"}


def is_pipeline_export(model: Any) -> bool:
    """Whether ``model`` is a text-to-image pipeline this module exports: an embedded pipeline's name
    (``"shapes"``) or a folder written by ``python -m fastdiff train shapes`` (``unet/config.json`` carrying
    fastdiff's ``_fastdiff`` training record, and ``text_encoder/``). Other diffusers pipeline folders (Stable
    Diffusion's) keep exporting their UNet alone."""
    from fastdiff.models.text_to_image import is_pipeline_model, is_pipeline_name

    if is_pipeline_name(model):
        return True
    try:  # OSError: a name no file system takes (too long, ...) is not a pipeline either
        if not is_pipeline_model(model):
            return False
        cfg = json.loads((Path(model).expanduser() / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "_fastdiff" in cfg


class TextEncoderGraph(torch.nn.Module):
    """``input_ids -> last_hidden_state``: what ``StableDiffusionPipeline.encode_prompt`` takes from the encoder
    (no attention mask: CLIP text models are called without one there)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, *args: torch.Tensor) -> torch.Tensor:  # export_graph traces a flat ``*args`` signature
        (input_ids,) = args
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """``latents -> image in [0, 1]``: the pipeline's ``vae.decode(latents / scaling_factor)`` and the image
    processor's denormalisation (``x / 2 + 0.5``, clamped), so the graph's output is the ``output_type="np"``
    image in NCHW order."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:  # export_graph traces a flat ``*args`` signature
        (latents,) = args
        image = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


def _component_graph(kind: str, module: torch.nn.Module, wrapper: type, source: ModelSource,
                     profile: ExportProfile, inputs: list[TensorSpec], outputs: list[TensorSpec],
                     config: dict[str, Any], ranges: dict[str, tuple[float, float]] | None = None) -> GraphExport:
    """A :class:`GraphExport` of a non-UNet component: ``wrapper(module)`` in the export precision, compared with
    its float32 copy, carrying the same ``fastdiff.*`` metadata as the UNet's with this component's own config."""
    precision = profile.precision
    graph = wrapper(model_copy(module, precision))
    ref_module = wrapper(model_copy(module, "fp32"))

    def reference(args: list[torch.Tensor]) -> torch.Tensor:
        return ref_module(*[a.float() if a.is_floating_point() else a for a in args])

    dims = {k: v for k, v in profile.dims.items() if any(k in s.dims for s in inputs)}
    meta = base_metadata(kind, source, profile, inputs, outputs, precision)
    meta["fastdiff.model_config"] = json.dumps(config)
    return GraphExport(source.name, kind, graph, reference, inputs, outputs, dims, precision, profile.opset, meta,
                       dict(ranges or {}))


def _io_dtype(profile: ExportProfile) -> str:
    return "float16" if profile.precision == "fp16" else "float32"


def text_encoder_graph(pipe, source: ModelSource, profile: ExportProfile) -> GraphExport:
    te = pipe.text_encoder
    tokens = int(profile.dim("tokens").max)
    width = int(te.config.hidden_size)
    dt = _io_dtype(profile)
    inputs = [TensorSpec("input_ids", "int64", ("batch", "tokens"))]
    outputs = [TensorSpec("last_hidden_state", dt, ("batch", "tokens", width))]
    vocab = int(te.config.vocab_size)
    config = {"class": type(te).__name__, "hidden_size": width, "vocab_size": vocab, "tokens": tokens,
              "max_position_embeddings": int(te.config.max_position_embeddings)}
    return _component_graph("text_encoder", te, TextEncoderGraph, source, profile, inputs, outputs, config,
                            {"input_ids": (0, vocab)})


def vae_decoder_graph(pipe, source: ModelSource, profile: ExportProfile) -> GraphExport:
    vae = pipe.vae
    channels = int(vae.config.latent_channels)
    scale = int(pipe.vae_scale_factor)  # 4 for shapes: 16x16 latents -> 64x64 images
    height, width = int(profile.dim("height").max), int(profile.dim("width").max)
    dt = _io_dtype(profile)
    inputs = [TensorSpec("latents", dt, ("batch", channels, "height", "width"))]
    outputs = [TensorSpec("image", dt, ("batch", int(vae.config.out_channels), height * scale, width * scale))]
    config = {"class": type(vae).__name__, "latent_channels": channels, "scaling_factor":
              float(vae.config.scaling_factor), "vae_scale_factor": scale, "out_channels": int(vae.config.out_channels)}
    return _component_graph("vae_decoder", vae, VaeDecoderGraph, source, profile, inputs, outputs, config)


@dataclass
class PipelineExport:
    """What :func:`export_pipeline_onnx` wrote: the manifest and one :class:`ExportReport` per component."""

    out_dir: Path
    manifest: Path
    reports: dict[str, ExportReport] = field(default_factory=dict)

    def summary(self) -> str:
        return "\n".join([r.summary() for r in self.reports.values()] + [f"manifest {self.manifest}"])


def _load(model: Any):
    """(pipeline, name, origin) for a pipeline name or folder; :class:`ModelNotFound` for anything else."""
    from fastdiff.models.registry import EMBEDDED_PIPELINES
    from fastdiff.models.text_to_image import load_pipeline

    if not isinstance(model, (str, os.PathLike)):
        raise InvalidInput(f"cannot export a {type(model).__name__} as a text-to-image pipeline; pass a pipeline "
                           f"name ({', '.join(EMBEDDED_PIPELINES)}) or a folder written by `train shapes`")
    s = os.fspath(model)
    if s in EMBEDDED_PIPELINES:
        name, origin, path = s, f"embedded pipeline {s!r}", s
    elif is_pipeline_export(s):
        path = Path(s).expanduser()
        name, origin = path.resolve().name, str(path)
    else:
        raise ModelNotFound(f"{s!r} is not a text-to-image pipeline: pass {', '.join(map(repr, EMBEDDED_PIPELINES))} "
                            "or a folder written by `python -m fastdiff train shapes` (unet/ with its training "
                            "record, text_encoder/, scheduler/)")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar over 20 tensors: noise before ours
    try:
        return load_pipeline(path), name, origin
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _source(pipe, name: str, origin: str) -> ModelSource:
    facts = {**unet_facts(pipe.unet), "family": PROFILE}
    sched = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
    defaults = dict(getattr(pipe, "fastdiff_defaults", {}) or {})
    return ModelSource(name=name, unet=pipe.unet.eval(), scheduler_config=sched, defaults=defaults, facts=facts,
                       origin=origin)


def export_pipeline_onnx(model: Any, out_dir: str | os.PathLike, *, profile: str | ExportProfile | None = None,
                         precision: str | None = None, opset: int | None = None, batch: str | int | None = None,
                         height: str | int | None = None, width: str | int | None = None,
                         tokens: str | int | None = None, external_data: str = "auto", parity: bool = True,
                         parity_tol: float | None = None, progress: bool = True) -> PipelineExport:
    """Export a text-to-image pipeline's UNet, text encoder and VAE decoder to ONNX in ``out_dir`` with
    ``manifest.json`` (see the module doc); returns the :class:`PipelineExport`.

    Args:
        model: ``"shapes"`` or a folder written by ``python -m fastdiff train shapes``.
        profile: default the ``shapes`` profile (batch 1..64, latents 16x16, 24 tokens).
        precision, opset, batch, height, width, tokens, external_data, parity, parity_tol: as
            :func:`fastdiff.export.export_onnx`; the parity check runs on every graph.
    """
    from fastdiff.export._files import publish, staging_dir

    out_dir = check_writable(out_dir, "dir", what="the output folder")  # before three traces of seconds each
    pipe, name, origin = _load(model)
    source = _source(pipe, name, origin)
    prof = resolve_profile(source.facts, profile or PROFILE, precision=precision, opset=opset, batch=batch,
                           height=height, width=width, tokens=tokens)
    max_tokens = int(pipe.tokenizer.model_max_length)
    if not prof.dim("tokens").static or prof.dim("tokens").max != max_tokens:
        raise InvalidInput(f"the pipeline's tokenizer pads every prompt to {max_tokens} tokens; the profile's tokens "
                           f"range {prof.dim('tokens').describe()} must be exactly {max_tokens}")
    if not (prof.dim("height").static and prof.dim("width").static):
        raise InvalidInput(f"the pipeline's graphs are exported at one latent size; profile {prof.name!r} has height "
                           f"{prof.dim('height').describe()}, width {prof.dim('width').describe()}: make them static "
                           "(--height N --width N)")
    # in the pipeline's order; the small text encoder first, so a failing setting fails in seconds
    graphs = {"text_encoder": text_encoder_graph(pipe, source, prof), "unet": unet_graph(source, prof),
              "vae_decoder": vae_decoder_graph(pipe, source, prof)}
    result = PipelineExport(out_dir=out_dir, manifest=out_dir / MANIFEST_NAME)
    with staging_dir(out_dir) as stage:
        for comp, g in graphs.items():  # each graph published into the stage only once its parity holds
            report = ExportReport(model=f"{name}/{comp}", format="onnx", kind=comp, profile=prof.name)
            result.reports[comp] = export_graph(g, stage, FILES[comp], external_data=external_data, parity=parity,
                                                parity_tol=parity_tol, progress=progress, report=report)
        staged = [Path(p) for r in result.reports.values() for p, _ in r.files]  # each .data before its .onnx
        manifest = _manifest(source, prof, pipe, graphs, result.reports, staged)
        atomic_write_text(stage / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        published = publish(staged + [stage / MANIFEST_NAME], out_dir)
    names = {p.name for p in published}
    for f in FILES.values():
        stale = out_dir / (f + ".data")
        if stale.name not in names and stale.exists():
            stale.unlink()  # an earlier export's external weights; the manifest does not list them
    for r in result.reports.values():
        r.files = [(str(out_dir / Path(p).name), size) for p, size in r.files]
    return result


def _manifest(source: ModelSource, prof: ExportProfile, pipe, graphs: dict[str, GraphExport],
              reports: dict[str, ExportReport], staged: list[Path]) -> dict[str, Any]:
    from fastdiff.export.onnx import versions_metadata

    components = {}
    for comp, g in graphs.items():
        r = reports[comp]
        components[comp] = {
            "file": FILES[comp], "inputs": [s.to_dict() for s in g.inputs],
            "outputs": [s.to_dict() for s in g.outputs], "dims": {k: v.as_list() for k, v in g.dims.items()},
            "parity": [vars(p) for p in r.parity], "timings_s": {k: round(v, 3) for k, v in r.timings.items()}}
    tok = pipe.tokenizer
    limits = dict(getattr(pipe, "fastdiff_limits", None) or {})  # a distilled student's (shapes-onestep: 1 step)
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": source.name, "origin": source.origin,
        "precision": prof.precision, "opset": prof.opset, "profile": prof.to_dict(),
        "files": [file_entry(p) for p in staged], "components": components,
        "scheduler": source.scheduler_config, "defaults": source.defaults,
        "tokenizer": {"name": PROFILE, "model_max_length": int(tok.model_max_length), "vocab_size": len(tok)},
        "vae": {"scaling_factor": float(pipe.vae.config.scaling_factor), "scale_factor": int(pipe.vae_scale_factor)},
        "versions": versions_metadata(), **({"limits": limits} if limits else {}),
    }
