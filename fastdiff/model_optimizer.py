"""``fastdiff.optimize(unet)``: swap a diffusers UNet's attention, GroupNorm(+SiLU) and GEGLU for the fused ops.

What is replaced (module identity, parameters and ``state_dict`` are untouched; everything is undone by
:func:`restore`):

- every ``Attention`` whose processor is diffusers' ``AttnProcessor2_0`` (or the classic ``AttnProcessor``) gets a
  :class:`FastAttnProcessor` -- the same projections, with :func:`fastdiff.ops.attention.attention` in place of
  SDPA (calls with an attention mask go to the original processor);
- every ``ResnetBlock2D`` with SiLU gets a forward that runs ``norm1 -> SiLU`` and ``+ temb -> norm2 -> SiLU`` as
  one fused GroupNorm each (:func:`fastdiff.ops.groupnorm.group_norm` with ``silu`` and ``add``);
- the UNet's ``conv_norm_out -> conv_act`` (SiLU) becomes one fused GroupNorm+SiLU (``conv_act`` an identity);
- every other ``nn.GroupNorm`` (e.g. ``Transformer2DModel.norm``) runs the fused GroupNorm;
- every ``GEGLU`` runs its projection, then :func:`fastdiff.ops.geglu.geglu` (split + GELU x gate in one pass).

Forwards are replaced per instance (``module.forward = ...``), never on the class, so other models are not
affected; ``copy.deepcopy`` of an optimized model gives an optimized copy (``restore`` before pickling a whole
module object; ``state_dict`` is unaffected either way). With ``backend="auto"`` the ops run Triton on CUDA and
the PyTorch reference elsewhere, where an optimized UNet computes exactly what the original does. Layers not
covered stay as they are; the returned :class:`OptimizeReport` lists them, and one log line summarises.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.ops.attention import attention
from fastdiff.ops.geglu import geglu
from fastdiff.ops.groupnorm import group_norm
from fastdiff.ops.registry import OP_KERNELS, check_backend_name, environment_reasons

log = logging.getLogger("fastdiff")

_STATE = "_fastdiff_optimized"  # attribute on the UNet: its undo entries (kind, module, previous)


@dataclass
class OptimizeReport:
    """What :func:`optimize` did. ``replaced``: count per kind; ``skipped``: (module name, reason) per layer left
    as it was."""

    backend: str
    replaced: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        done = ", ".join(f"{n} {k}" for k, n in self.replaced.items()) or "nothing"
        line = f"fastdiff.optimize(backend={self.backend!r}): replaced {done}"
        if self.skipped:
            reasons = Counter(reason for _, reason in self.skipped)
            line += f"; left {len(self.skipped)} layers as they are (" + "; ".join(
                f"{n} x {r}" for r, n in reasons.most_common()) + ")"
        return line

    __str__ = summary


class FastAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with :func:`fastdiff.ops.attention.attention` in place of SDPA.

    The Triton path returns (B, H, L, D) stored as (B, L, H, D), so the reshape to (B, L, H·D) before ``to_out``
    is a view. Calls this processor does not cover (an attention mask, extra positional args, the deprecated
    ``scale``) go to the original processor, kept in ``self.original``."""

    def __init__(self, original, backend: str = "auto"):
        self.original = original
        self.backend = backend
        # The classic AttnProcessor scales by attn.scale; AttnProcessor2_0 lets SDPA use 1/sqrt(head_dim).
        self.use_module_scale = type(original).__name__ == "AttnProcessor"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None or args or kwargs.get("scale") is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, L, H·D) -> (B, H, L, D) views; the kernel takes the strides as they are.
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scale = attn.scale if self.use_module_scale else None
        hidden_states = attention(query, key, value, scale=scale, backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _resnet_forward(block, backend: str, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
    """diffusers' ``ResnetBlock2D.forward`` with GroupNorm -> SiLU fused, and the time embedding added inside the
    second GroupNorm (its statistics are those of ``h + temb``, as in the original)."""
    if args or kwargs.get("scale") is not None or (block.time_emb_proj is None and temb is not None):
        # The deprecated `scale` (let the original warn), or a raw temb added unprojected: the original forward.
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    n1, n2 = block.norm1, block.norm2
    hidden_states = group_norm(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, silu=True, backend=backend)
    if block.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails with large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = block.upsample(input_tensor)
        hidden_states = block.upsample(hidden_states)
    elif block.downsample is not None:
        input_tensor = block.downsample(input_tensor)
        hidden_states = block.downsample(hidden_states)
    hidden_states = block.conv1(hidden_states)
    if block.time_emb_proj is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        temb = block.time_emb_proj(temb)  # (N, C_out); diffusers adds it as temb[:, :, None, None]
    if block.time_embedding_norm == "default":
        hidden_states = group_norm(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, silu=True, add=temb,
                                   backend=backend)
    else:  # "scale_shift" (checked in optimize)
        if temb is None:
            raise ValueError(" `temb` should not be None when `time_embedding_norm` is scale_shift")
        time_scale, time_shift = torch.chunk(temb[:, :, None, None], 2, dim=1)
        hidden_states = group_norm(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, backend=backend)
        hidden_states = block.nonlinearity(hidden_states * (1 + time_scale) + time_shift)
    hidden_states = block.dropout(hidden_states)
    hidden_states = block.conv2(hidden_states)
    if block.conv_shortcut is not None:
        if block.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = block.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / block.output_scale_factor


def _group_norm_forward(norm: nn.GroupNorm, backend: str, silu: bool, x: torch.Tensor) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu, backend=backend)


def _identity_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _geglu_forward(module, backend: str, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs.get("scale") is not None:
        return type(module).forward(module, hidden_states, *args, **kwargs)
    return geglu(module.proj(hidden_states), backend=backend)


class _Forward:
    """A replacement ``forward``: ``fn(module, backend, *args)``, bound to its module with ``types.MethodType`` so
    that ``copy.deepcopy`` of an optimized model rebinds it to the copy (a closure would keep the original)."""

    def __init__(self, fn: Callable, *bound):
        self.fn, self.bound = fn, bound

    def __call__(self, module, *args, **kwargs):
        return self.fn(module, *self.bound, *args, **kwargs)


class _Patcher:
    """Applies instance-level replacements and records how to undo each, as data -- (kind, module, previous) --
    so a deep copy of the model copies its undo list consistently with its modules."""

    def __init__(self, backend: str):
        self.backend = backend
        self.undo: list[tuple] = []
        self.report = OptimizeReport(backend)

    def count(self, kind: str) -> None:
        self.report.replaced[kind] = self.report.replaced.get(kind, 0) + 1

    def skip(self, name: str, reason: str) -> None:
        self.report.skipped.append((name or "<root>", reason))

    def set_forward(self, module: nn.Module, fn: Callable, *bound) -> None:
        self.undo.append(("forward", module, module.__dict__.get("forward")))
        module.forward = types.MethodType(_Forward(fn, *bound), module)

    def set_processor(self, attn, processor) -> None:
        self.undo.append(("processor", attn, attn.processor))
        attn.set_processor(processor)


def _undo(kind: str, module: nn.Module, previous) -> None:
    if kind == "processor":
        module.set_processor(previous)
    elif previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def _hooked(module: nn.Module) -> bool:
    """accelerate hooks (offloading) wrap ``forward`` per instance: replacing it would bypass them."""
    return hasattr(module, "_hf_hook") or "forward" in module.__dict__


def _patch_attention(p: _Patcher, name: str, attn) -> None:
    proc = attn.processor
    kind = type(proc).__name__
    if kind not in ("AttnProcessor2_0", "AttnProcessor"):
        p.skip(name, f"attention processor {kind} (only AttnProcessor2_0 / AttnProcessor are replaced)")
        return
    p.set_processor(attn, FastAttnProcessor(proc, p.backend))
    p.count("attention")


def _patch_resnet(p: _Patcher, name: str, block, covered: set) -> None:
    reasons = []
    if not isinstance(block.nonlinearity, nn.SiLU):
        reasons.append(f"ResnetBlock2D with {type(block.nonlinearity).__name__} (only SiLU is fused)")
    if type(block.norm1) is not nn.GroupNorm or type(block.norm2) is not nn.GroupNorm:
        reasons.append("ResnetBlock2D whose norms are not nn.GroupNorm")
    if block.time_embedding_norm not in ("default", "scale_shift"):
        reasons.append(f"ResnetBlock2D with time_embedding_norm={block.time_embedding_norm!r}")
    if _hooked(block):
        reasons.append("ResnetBlock2D whose forward is already wrapped (accelerate hook?)")
    if reasons:
        p.skip(name, reasons[0])  # its GroupNorms still get the plain fused forward
        return
    p.set_forward(block, _resnet_forward, p.backend)
    covered.update((id(block.norm1), id(block.norm2)))
    p.count("ResnetBlock2D (GroupNorm+SiLU x2)")


def _patch_unet_out(p: _Patcher, unet, covered: set) -> None:
    norm, act = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    if type(norm) is nn.GroupNorm and isinstance(act, nn.SiLU) and not _hooked(norm) and not _hooked(act):
        p.set_forward(norm, _group_norm_forward, p.backend, True)
        p.set_forward(act, _identity_forward)  # the SiLU now runs inside conv_norm_out
        covered.add(id(norm))
        p.count("output GroupNorm+SiLU")


def _check_backend(unet: nn.Module, backend: str) -> None:
    check_backend_name(backend)
    if backend not in ("auto", "torch"):  # a named kernel backend: it must be able to run on the UNet's device
        param = next(unet.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        reasons = environment_reasons(backend, device)
        if reasons:
            raise BackendUnavailable(backend, reasons, hint="Use optimize(unet, backend='auto').")


def optimize(unet: nn.Module, backend: str = "auto") -> OptimizeReport:
    """Swap ``unet``'s attention processors, GroupNorm(+SiLU) and GEGLU for fastdiff's fused ops, in place.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any ``nn.Module`` holding diffusers ``Attention``,
            ``ResnetBlock2D``, ``nn.GroupNorm`` and ``GEGLU`` modules works).
        backend: ``"auto"`` (Triton on CUDA tensors it supports, else the PyTorch reference), ``"triton"``,
            ``"torch"``, or ``"cuda"`` / ``"cpp"`` (the CUDA C++ / C++ GroupNorm kernels: only the GroupNorm(+SiLU)
            layers are replaced, attention and GEGLU stay as they are and are reported). Read at every call, so a
            model moved between devices keeps working under ``"auto"``.

    Returns an :class:`OptimizeReport` (also logged as one line). Optimizing an optimized model first restores
    it. Undo with :func:`restore`. Works under ``torch.no_grad()`` / ``torch.inference_mode()``, inside CUDA
    graphs and under ``torch.compile`` (the Triton kernels are ``torch.library`` custom ops).
    """
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if not isinstance(unet, nn.Module):
        raise InvalidInput(f"optimize() takes a torch.nn.Module (a diffusers UNet), got {type(unet).__name__}")
    _check_backend(unet, backend)
    restore(unet)
    p = _Patcher(backend)
    covered: set = set()
    modules = list(unet.named_modules())
    # A named kernel backend that some ops lack (OP_KERNELS): their layers stay as they are, and are reported.
    lacking = {op for op, kernels in OP_KERNELS.items() if backend not in ("auto", "torch", *kernels)}
    fused = ", ".join(op for op in OP_KERNELS if op not in lacking)
    for name, m in modules:
        op = "attention" if isinstance(m, Attention) else "geglu" if isinstance(m, GEGLU) else None
        if op in lacking:
            p.skip(name, f"{type(m).__name__} has no {backend} kernel (backend={backend!r} fuses only {fused})")
        elif isinstance(m, Attention):
            _patch_attention(p, name, m)
        elif type(m) is ResnetBlock2D:
            _patch_resnet(p, name, m, covered)
        elif type(m).__name__.startswith("ResnetBlock"):
            p.skip(name, f"{type(m).__name__} (only ResnetBlock2D is fused; its GroupNorms are still replaced)")
        elif type(m) is GEGLU:
            if _hooked(m):
                p.skip(name, "GEGLU whose forward is already wrapped (accelerate hook?)")
            else:
                p.set_forward(m, _geglu_forward, p.backend)
                p.count("GEGLU")
        elif type(m).__name__ in ("GELU", "ApproximateGELU", "SwiGLU", "LinearActivation"):
            p.skip(name, f"feed-forward activation {type(m).__name__} (only GEGLU is fused)")
    _patch_unet_out(p, unet, covered)
    for name, m in modules:
        if isinstance(m, nn.GroupNorm) and id(m) not in covered:
            if type(m) is not nn.GroupNorm or _hooked(m):
                p.skip(name, f"{type(m).__name__} (a subclass or wrapped GroupNorm)")
                continue
            p.set_forward(m, _group_norm_forward, p.backend, False)
            p.count("GroupNorm")
    object.__setattr__(unet, _STATE, p.undo)  # a plain attribute, outside nn.Module's bookkeeping
    log.info("%s", p.report.summary())
    return p.report


def is_optimized(unet: nn.Module) -> bool:
    return bool(getattr(unet, _STATE, None))


def restore(unet: nn.Module) -> bool:
    """Undo :func:`optimize`: the original processors and forwards come back (the same objects). Returns whether
    there was anything to undo."""
    undo = unet.__dict__.pop(_STATE, None)
    if not undo:
        return False
    for entry in reversed(undo):
        _undo(*entry)
    return True

