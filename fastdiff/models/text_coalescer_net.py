"""Text-conditioned coalescers: ``(R, DE) -> (distance, direction)`` on a text-to-image model's latent space.

The label coalescer (:mod:`fastdiff.models.coalescer_net`) learns its own label embedding; here the condition is
``DE``, the caption's pooled text embedding from the ``shapes`` pipeline's frozen text encoder (64-d), fed to the
same :class:`~fastdiff.models.coalescer_net.CoalescerNet` as its condition input (``cross_attention_dim`` = 64).
The null condition of classifier-free guidance is the empty prompt's embedding, stored with the weights
(``null_embedding``), so guidance is the label coalescer's: ``t_u + g (t_c - t_u)`` on the predicted targets.

A model folder: ``config.json`` (``format: fastdiff.text_coalescer``, the net's sizes, sampling defaults, the sha256
of the text encoder and VAE whose spaces it learned, training metadata with ``wall_s``) and ``model.safetensors``
(fp16). Loading checks the weights' sha256 recorded in the config and that the shipped text encoder / VAE are the
ones it learned (another VAE would decode its latents wrongly).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fastdiff._atomic import atomic_write_bytes, sha256_file
from fastdiff.errors import ModelConfigError, ModelNotFound
from fastdiff.models.coalescer_net import CoalescerConfig, CoalescerNet, scheduler_config
from fastdiff.models.registry import WEIGHTS_DIR

FORMAT = "fastdiff.text_coalescer"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
#: embedded text coalescers, by name -> description (weights in ``models/weights/<name>``): none ships today
EMBEDDED_TEXT_COALESCERS: dict[str, str] = {}
#: text coalescers trained here that do not ship, by name -> why (a clear error instead of "unknown model")
NOT_SHIPPED: dict[str, str] = {
    "shapes-coalescer": "trained on 2026-11-26 it scored 35.1 % / 0.0 % of one- / two-object prompts fully correct "
                        "on the shapes judge (shapes-onestep: 96.6 % / 97.6 % at the same speed), so it did not earn "
                        "its 12.7 MB in the package",
}


class TextCoalescerModel(nn.Module):
    """A :class:`CoalescerNet` conditioned on text embeddings (``(N, E)`` floats), with the null embedding."""

    def __init__(self, net: CoalescerNet, null_embedding: torch.Tensor, name: str = "text-coalescer"):
        super().__init__()
        self.unet = net
        self.register_buffer("null_embedding", null_embedding.detach().float().reshape(-1).clone())
        if self.null_embedding.numel() != net.config.cross_attention_dim:
            raise ModelConfigError(f"null embedding of width {self.null_embedding.numel()}, the net takes "
                                   f"{net.config.cross_attention_dim}")
        self.name = name
        self.scheduler_config = scheduler_config(net.config.num_steps, net.config.prior_scale)
        self.defaults = {"scheduler": "coalescer", "num_inference_steps": 1, "guidance_scale": 1.0}
        self.model_config: dict = {}

    def heads(self, x: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distance (N,), direction (N, C, H, W))`` at points ``x`` for condition embeddings ``(N, E)``."""
        return self.unet.heads(x, embeddings.to(x.dtype))

    def null_condition(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The empty prompt's embedding for each row of ``embeddings`` (guidance's unconditional branch)."""
        return self.null_embedding.to(embeddings.dtype).expand(embeddings.shape[0], -1)

    def forward(self, sample: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The point one step jumps to from ``sample``."""
        return self.unet(sample, None, embeddings.to(sample.dtype))[0]


def build(config: CoalescerConfig, null_embedding: torch.Tensor, name: str) -> TextCoalescerModel:
    return TextCoalescerModel(CoalescerNet(config), null_embedding, name=name)


def save_text_coalescer(model: TextCoalescerModel, directory: str | os.PathLike, *, metadata: dict | None = None,
                        defaults: dict | None = None, encoders: dict | None = None,
                        dtype: torch.dtype = torch.float16) -> Path:
    """Write a model folder (weights first, then the config recording their sha256), each file atomically.
    ``encoders``: the sha256 of the text encoder and VAE the model learned (``text_encoder_sha256``,
    ``vae_sha256``)."""
    from safetensors.torch import save as st_save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    state["null_embedding"] = model.null_embedding.detach().float().contiguous()  # kept exact: it is an input
    atomic_write_bytes(d / WEIGHTS_NAME, st_save(state, metadata={"format": FORMAT}))
    cfg = {"format": FORMAT, "name": model.name, "net": asdict(model.unet.config),
           "scheduler": dict(model.scheduler_config),
           "defaults": dict(defaults if defaults is not None else model.defaults),
           "encoders": dict(encoders or {}), "weights_sha256": sha256_file(d / WEIGHTS_NAME),
           "metadata": dict(metadata or {})}
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return d


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The folder of an embedded text coalescer's name or of a model folder; :class:`ModelNotFound` otherwise."""
    s = os.fspath(name_or_path)
    if s in NOT_SHIPPED:
        raise ModelNotFound(f"{s!r} is not shipped: {NOT_SHIPPED[s]}; train one with `python -m fastdiff distill "
                            "coalescer-index --model shapes --out IDX` and `... coalescer-train --model shapes --index "
                            "IDX --out DIR`, then pass DIR")
    d = WEIGHTS_DIR / s if s in EMBEDDED_TEXT_COALESCERS else Path(s).expanduser()
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        hint = ("reinstall fastdiff or rebuild it with `python -m fastdiff distill coalescer-index --model shapes` "
                "and `... coalescer-train --model shapes`")
        raise ModelNotFound(f"{s[:200]!r} is not a text coalescer: no {CONFIG_NAME} + {WEIGHTS_NAME} in {d}; "
                            f"embedded: {', '.join(EMBEDDED_TEXT_COALESCERS) or 'none'}; {hint}")
    return d


def is_text_coalescer(model) -> bool:
    """True for an embedded text coalescer's name, a folder holding one, or a loaded one."""
    if isinstance(model, TextCoalescerModel):
        return True
    if not isinstance(model, (str, os.PathLike)):
        return False
    if os.fspath(model) in EMBEDDED_TEXT_COALESCERS or os.fspath(model) in NOT_SHIPPED:
        return True
    try:
        cfg = Path(model).expanduser() / CONFIG_NAME
        return cfg.is_file() and json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_text_coalescer(name_or_path: str | os.PathLike, device=None) -> TextCoalescerModel:
    """A text coalescer by embedded name or folder, its weights checked against the sha256 in its config."""
    from safetensors.torch import load_file

    d = resolve(name_or_path)
    where = str(d / CONFIG_NAME)
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot read {where}: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ModelConfigError(f"{where} is not a text coalescer config (format {FORMAT!r})")
    if sha256_file(d / WEIGHTS_NAME) != cfg.get("weights_sha256"):
        raise ModelNotFound(f"{d / WEIGHTS_NAME} does not match the sha256 its config records: damaged or replaced")
    try:
        config = CoalescerConfig(**cfg["net"])
    except (TypeError, KeyError) as e:
        raise ModelConfigError(f"{where}: bad 'net' ({e}); rewrite it with save_text_coalescer") from None
    config.check(where)
    state = {k: v.float() for k, v in load_file(str(d / WEIGHTS_NAME)).items()}
    null = state.get("null_embedding")
    if null is None:
        raise ModelNotFound(f"{d / WEIGHTS_NAME} lacks the null embedding")
    model = build(config, null, name=cfg.get("name") or d.name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelNotFound(f"weights {d / WEIGHTS_NAME} do not match the config: {str(e)[:300]}") from e
    if isinstance(cfg.get("defaults"), dict):
        model.defaults = dict(cfg["defaults"])
    model.model_config = cfg
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
