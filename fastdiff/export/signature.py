"""ONNX graph signatures: the named inputs / outputs of a UNet graph, the module that is traced with that flat
signature, and the concrete sizes, random inputs and ``torch.export`` dynamic shapes derived from a signature and
its dimension ranges (the spec and range types themselves are the file format's: :mod:`fastdiff.exported.specs`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastdiff.exported.specs import DimRange, TensorSpec

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def unet_signature(facts: dict[str, Any], precision: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and output of a UNet graph::

        sample (batch, C, height, width), timestep (batch,) float32,
        [encoder_hidden_states (batch, tokens, D)], [class_labels (batch,) int64],
        [text_embeds (batch, 1280), time_ids (batch, 6)]  (SDXL), [timestep_cond (batch, Dc)]  (LCM)
        -> out_sample (batch, C_out, height, width)
    """
    dt = "float16" if precision == "fp16" else "float32"
    inputs = [TensorSpec("sample", dt, ("batch", facts["in_channels"], "height", "width")),
              TensorSpec("timestep", "float32", ("batch",))]
    if facts.get("cross_attention_dim"):
        inputs.append(TensorSpec("encoder_hidden_states", dt, ("batch", "tokens", facts["cross_attention_dim"])))
    if facts.get("class_embeddings"):
        inputs.append(TensorSpec("class_labels", "int64", ("batch",)))
    if facts.get("addition_embed_type") == "text_time":
        inputs += [TensorSpec("text_embeds", dt, ("batch", facts["text_embeds_dim"])),
                   TensorSpec("time_ids", dt, ("batch", facts["time_ids_dim"]))]
    if facts.get("time_cond_proj_dim"):
        inputs.append(TensorSpec("timestep_cond", dt, ("batch", facts["time_cond_proj_dim"])))
    outputs = [TensorSpec("out_sample", dt, ("batch", facts["out_channels"], "height", "width"))]
    return inputs, outputs


class UNetGraph(torch.nn.Module):
    """The exported UNet call with a flat positional signature (the names of :func:`unet_signature`)."""

    def __init__(self, unet: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.unet = unet
        self.input_names = list(input_names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kw = dict(zip(self.input_names, args, strict=True))
        return run_unet(self.unet, kw.pop("sample"), kw.pop("timestep"), kw)


def run_unet(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, kw: dict) -> torch.Tensor:
    """Call a diffusers UNet with graph-style keyword inputs (``text_embeds`` / ``time_ids`` are SDXL's
    ``added_cond_kwargs``)."""
    extra = {}
    for k in ("encoder_hidden_states", "class_labels", "timestep_cond"):
        if k in kw:
            extra[k] = kw[k]
    if "text_embeds" in kw:
        extra["added_cond_kwargs"] = {"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"]}
    return unet(sample, timestep, return_dict=False, **extra)[0]


def example_sizes(dims: dict[str, DimRange], which: str = "example") -> dict[str, int]:
    """Concrete sizes per dimension. ``"example"``: what ``torch.export`` traces with (a dynamic dimension must not
    be traced at size 1, which would specialise it); ``"opt"``; ``"odd"``: another point of the range (min batch,
    min height, opt width) to catch shape bugs the opt point hides."""
    out = {}
    for name, r in dims.items():
        if which == "odd":
            out[name] = {"batch": r.min, "height": r.min}.get(name, r.opt)
        elif which == "example" and not r.static and r.opt < 2:
            out[name] = next(v for v in range(2, r.max + 1) if r.contains(v))
        else:
            out[name] = r.opt
    return out


def random_inputs(specs: list[TensorSpec], sizes: dict[str, int], generator: torch.Generator,
                  extra_ranges: dict[str, tuple[float, float]] | None = None) -> list[torch.Tensor]:
    """Random inputs for a signature: normal floats, timesteps uniform in [0, 1000), int64 labels in
    ``extra_ranges["class_labels"]`` (default [0, 10))."""
    ranges = {"timestep": (0.0, 999.0), "class_labels": (0, 10), "time_ids": (0.0, 1024.0),
              "guidance_scale": (1.0, 8.0), **(extra_ranges or {})}
    out = []
    for s in specs:
        shape = s.shape(sizes)
        if s.dtype == "int64":
            lo, hi = ranges.get(s.name, (0, 10))
            out.append(torch.randint(int(lo), int(hi), shape, generator=generator))
        elif s.name in ranges:
            lo, hi = ranges[s.name]
            out.append((torch.rand(shape, generator=generator) * (hi - lo) + lo).to(s.torch_dtype))
        else:
            out.append(torch.randn(shape, generator=generator).to(s.torch_dtype))
    return out


def export_dims(dims: dict[str, DimRange], used: set[str]) -> dict[str, Any]:
    """``torch.export`` dimension objects per dynamic profile dimension: ``Dim(name)`` or ``m * Dim(name_k)`` for
    a dimension that must be a multiple of ``m`` (UNet heights and widths)."""
    out: dict[str, Any] = {}
    for name in used:
        r = dims.get(name)
        if r is None or r.static:
            continue
        if r.multiple > 1:
            base = torch.export.Dim(f"{name}_div{r.multiple}", min=math.ceil(r.min / r.multiple),
                                    max=r.max // r.multiple)
            out[name] = r.multiple * base
        else:
            out[name] = torch.export.Dim(name, min=r.min, max=r.max)
    return out


def dynamic_shapes(specs: list[TensorSpec], dims: dict[str, DimRange]) -> tuple[dict[int, Any], ...]:
    used = {d for s in specs for d in s.dims if isinstance(d, str)}
    objs = export_dims(dims, used)
    return tuple({axis: objs[d] for axis, d in enumerate(s.dims) if isinstance(d, str) and d in objs}
                 for s in specs)
