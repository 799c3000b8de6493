"""Validation and preparation of the sampler's conditioning inputs (embeddings, labels, latents).

Kept apart from the loop so every user-facing check lives in one place and says what was wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastdiff._checks import check_int
from fastdiff.backends.base import ModelRunner
from fastdiff.errors import InvalidInput
from fastdiff.models.folded_guidance import folded_guidance_cond

#: how many offending values an error message lists (a 10-million-label batch must not become the message).
SHOWN_VALUES = 10


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
    if 0 in t.shape:
        raise InvalidInput(f"{name} has shape {tuple(t.shape)}: the batch, token and width sizes must all be >= 1")
    if runner.cross_attention_dim is not None and t.shape[-1] != runner.cross_attention_dim:
        raise InvalidInput(
            f"{name} has width D={t.shape[-1]} but the model's cross_attention_dim is {runner.cross_attention_dim}; "
            "use embeddings from the text encoder that matches this model"
        )
    if t.device != runner.device:
        raise InvalidInput(f"{name} is on {t.device} but the model runs on {runner.device}; move it with .to()")
    if t.dtype != runner.dtype:
        raise InvalidInput(f"{name} has dtype {t.dtype} but the model runs in {runner.dtype}; cast it with .to()")


def preview(values) -> str:
    """The first :data:`SHOWN_VALUES` of ``values`` for an error message, with how many more there are."""
    values = list(values)
    more = len(values) - SHOWN_VALUES
    return str(values[:SHOWN_VALUES]) + (f" and {more} more" if more > 0 else "")


def check_class_labels(class_labels) -> torch.Tensor:
    """``class_labels`` (an integer, a list of integers or a 1-D integer tensor / array) as a (B,) int64 tensor.

    Refuses what ``torch.as_tensor(...).long()`` would coerce silently: floats (3.7 would sample a 3), bools
    (True would sample a 1) and nested lists (flattened into more images than asked for)."""
    kinds = "an integer, a list of integers or a 1-D integer tensor"
    if isinstance(class_labels, (list, tuple)):
        values = [check_int(f"class_labels[{i}]", v, hint=f"class_labels must be {kinds}")
                  for i, v in enumerate(class_labels)]
        labels = torch.tensor(values, dtype=torch.long)
    elif isinstance(class_labels, (torch.Tensor, np.ndarray)):
        labels = torch.as_tensor(class_labels)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise InvalidInput(f"class_labels must hold integers, got a tensor of dtype {labels.dtype}; round or "
                               "convert them explicitly (e.g. .long()) if that is what you mean")
        if labels.dim() > 1:
            raise InvalidInput(f"class_labels must be 1-D (one label per image), got shape {tuple(labels.shape)}")
        labels = labels.reshape(-1).long()
    else:
        labels = torch.tensor([check_int("class_labels", class_labels, hint=f"pass {kinds}")], dtype=torch.long)
    if labels.numel() == 0:
        raise InvalidInput("class_labels is empty; pass at least one label")
    return labels


def check_generator(generator, batch: int) -> None:
    """``generator`` is None, a ``torch.Generator`` or a list of ``batch`` of them (one per image)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise InvalidInput(f"generator list holds {preview(bad)}; every item must be a torch.Generator")
        if len(generator) != batch:
            raise InvalidInput(f"generator is a list of {len(generator)} generators but {batch} images are drawn; "
                               "pass one generator, or one per image")
        return
    raise InvalidInput(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of "
                       f"them, got {type(generator).__name__}")


#: the most images one prompt (or label) may ask for in one call: checked before the conditioning is repeated, so a
#: typo (10**9) is an error, not gigabytes of repeated embeddings; the latent cells of the whole call have their own
#: cap (:data:`fastdiff.unet_sampler.MAX_LATENT_CELLS`)
MAX_IMAGES_PER_PROMPT = 4096


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
    """Build the (2B or B)-batch conditioning. ``label_model`` is a LabelConditionedUNet (or None).

    A network with folded guidance (``runner.time_cond_proj_dim``) gets no CFG batch: the scale goes in as
    ``timestep_cond`` (:mod:`fastdiff.models.folded_guidance`), one call per step."""
    cond = _prepare_conditioning(runner, label_model, guidance_scale, encoder_hidden_states,
                                 negative_encoder_hidden_states, class_labels, num_images_per_prompt, latents)
    if runner.time_cond_proj_dim is not None:
        cond.model_kwargs["timestep_cond"] = folded_guidance_cond(guidance_scale, cond.batch,
                                                                  runner.time_cond_proj_dim, runner.device,
                                                                  runner.dtype)
    return cond


def _prepare_conditioning(runner, label_model, guidance_scale, encoder_hidden_states, negative_encoder_hidden_states,
                          class_labels, num_images_per_prompt, latents) -> Conditioning:
    n = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1, maximum=MAX_IMAGES_PER_PROMPT)
    labels = None if class_labels is None else check_class_labels(class_labels)
    if label_model is not None and labels is not None and encoder_hidden_states is not None:
        # Embeddings win in the branch below, so the labels would be dropped without a word.
        raise InvalidInput("a label-conditioned model was given both class_labels and encoder_hidden_states; pass "
                           "one of them (labels are turned into embeddings by the model)")
    conditional = runner.cross_attention_dim is not None or runner.needs_class_labels
    cfg = conditional and guidance_scale > 1.0 and runner.time_cond_proj_dim is None

    if label_model is not None and encoder_hidden_states is None:
        if labels is None:
            labels = torch.arange(label_model.num_classes)
        else:
            bad = labels[(labels < 0) | (labels >= label_model.num_classes)]
            if bad.numel():
                raise InvalidInput(
                    f"class_labels must be integers in [0, {label_model.num_classes - 1}], got {preview(bad.tolist())} "
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
