"""Validation and preparation of the sampler's conditioning inputs (embeddings, labels, latents).

Kept apart from the loop so every user-facing check lives in one place and says what was wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastdiff.backends.base import ModelRunner
from fastdiff.errors import InvalidInput


@dataclass
class Conditioning:
    """Model inputs other than the sample, already batched for CFG (unconditional half first)."""

    batch: int  # B: images produced
    cfg: bool
    encoder_hidden_states: torch.Tensor | None  # (2B or B, L, D)
    class_labels: torch.Tensor | None  # (2B or B,) for UNets with a class embedding
    # Further model keyword arguments, already batched like the model input (e.g. SDXL's
    # ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}`` or LCM's ``timestep_cond``).
    model_kwargs: dict = field(default_factory=dict)


def _check_embeddings(name: str, t: torch.Tensor, runner: ModelRunner) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidInput(f"{name} must be a torch.Tensor of shape (B, L, D), got {type(t).__name__}")
    if t.dim() != 3:
        raise InvalidInput(f"{name} must have shape (B, L, D) (batch, tokens, width), got {tuple(t.shape)}")
    if runner.cross_attention_dim is not None and t.shape[-1] != runner.cross_attention_dim:
        raise InvalidInput(
            f"{name} has width D={t.shape[-1]} but the model's cross_attention_dim is {runner.cross_attention_dim}; "
            "use embeddings from the text encoder that matches this model"
        )
    if t.device != runner.device:
        raise InvalidInput(f"{name} is on {t.device} but the model runs on {runner.device}; move it with .to()")
    if t.dtype != runner.dtype:
        raise InvalidInput(f"{name} has dtype {t.dtype} but the model runs in {runner.dtype}; cast it with .to()")


def prepare_conditioning(
    runner: ModelRunner,
    label_model,
    guidance_scale: float,
    encoder_hidden_states: torch.Tensor | None,
    negative_encoder_hidden_states: torch.Tensor | None,
    class_labels,
    num_images_per_prompt: int,
    latents: torch.Tensor | None,
) -> Conditioning:
    """Build the (2B or B)-batch conditioning. ``label_model`` is a LabelConditionedUNet (or None)."""
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise InvalidInput(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    n = num_images_per_prompt
    labels = None
    if class_labels is not None:
        labels = torch.as_tensor(class_labels).reshape(-1).long()
        if labels.numel() == 0:
            raise InvalidInput("class_labels is empty; pass at least one label")
    conditional = runner.cross_attention_dim is not None or runner.needs_class_labels
    cfg = conditional and guidance_scale > 1.0

    if label_model is not None and encoder_hidden_states is None:
        if labels is None:
            labels = torch.arange(label_model.num_classes)
        elif bool(((labels < 0) | (labels >= label_model.num_classes)).any()):
            raise InvalidInput(
                f"class_labels must be integers in [0, {label_model.num_classes - 1}], got {labels.tolist()} "
                f"(label {label_model.null_label} is the null label, used internally for guidance)"
            )
        labels = labels.repeat_interleave(n).to(runner.device)
        cond = label_model.encode_labels(labels).to(runner.dtype)
        uncond = label_model.encode_labels(torch.full_like(labels, label_model.null_label)).to(runner.dtype)
        ehs = torch.cat([uncond, cond]) if cfg else cond
        return Conditioning(labels.shape[0], cfg, ehs, None)

    if runner.cross_attention_dim is not None:
        if encoder_hidden_states is None:
            raise InvalidInput(
                "this model is conditioned through cross-attention: pass encoder_hidden_states (B, L, D) "
                f"with D={runner.cross_attention_dim} (e.g. your text encoder's output)"
            )
        _check_embeddings("encoder_hidden_states", encoder_hidden_states, runner)
        cond = encoder_hidden_states.repeat_interleave(n, dim=0)
        if negative_encoder_hidden_states is None:
            uncond = torch.zeros_like(cond)
        else:
            _check_embeddings("negative_encoder_hidden_states", negative_encoder_hidden_states, runner)
            if negative_encoder_hidden_states.shape != encoder_hidden_states.shape:
                raise InvalidInput(
                    f"negative_encoder_hidden_states has shape {tuple(negative_encoder_hidden_states.shape)} but "
                    f"encoder_hidden_states has {tuple(encoder_hidden_states.shape)}; they must match"
                )
            uncond = negative_encoder_hidden_states.repeat_interleave(n, dim=0)
        batch = cond.shape[0]
        ehs = torch.cat([uncond, cond]) if cfg else cond
    else:
        ehs, batch = None, None

    cl = None
    if runner.needs_class_labels:
        if labels is None:
            raise InvalidInput("this UNet has a class embedding: pass class_labels (B,) integers")
        labels = labels.repeat_interleave(n).to(runner.device)
        if batch is not None and labels.shape[0] != batch:
            raise InvalidInput(f"class_labels gives {labels.shape[0]} images but the embeddings give {batch}")
        batch = labels.shape[0]
        cl = torch.cat([labels, labels]) if cfg else labels
    elif labels is not None and label_model is None:
        raise InvalidInput("class_labels were given but this model has no class conditioning; drop them")

    if batch is None:
        batch = (latents.shape[0] if latents is not None else n)
    return Conditioning(batch, cfg, ehs, cl)


def check_latents(latents: torch.Tensor, shape: tuple, runner: ModelRunner) -> None:
    if not isinstance(latents, torch.Tensor):
        raise InvalidInput(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise InvalidInput(
            f"latents must have shape {tuple(shape)} (batch, model in_channels, height, width), got "
            f"{tuple(latents.shape)}"
        )
    if latents.device != runner.device:
        raise InvalidInput(f"latents are on {latents.device} but the model runs on {runner.device}; move them")
    if latents.dtype != runner.dtype:
        raise InvalidInput(f"latents have dtype {latents.dtype} but the model runs in {runner.dtype}; cast them")
