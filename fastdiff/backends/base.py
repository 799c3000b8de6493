"""The model-runner interface the sampler drives, and its PyTorch implementation.

A runner maps ``(sample (N, C, H, W), timestep (N,) float32, encoder_hidden_states (N, L, D) or None,
class_labels (N,) or None, **model_kwargs)`` to the model's prediction ``(N, C_out, H, W)`` on the sampler's
device, without host<->device syncs. ``N`` is 2B under classifier-free guidance.
"""

from __future__ import annotations

import torch


class ModelRunner:
    """Base class. Subclasses fill the attributes and implement ``__call__``."""

    name: str = ""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = None  # latent / pixel side length the model was trained at (None: unknown)
    cross_attention_dim: int | None = None  # D of encoder_hidden_states, None for unconditional models
    needs_class_labels: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(ModelRunner):
    """Runs a diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` eagerly."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        cfg = unet.config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        size = cfg.sample_size
        self.sample_size = size if isinstance(size, int) else (size[0] if size else None)
        self.cross_attention_dim = getattr(cfg, "cross_attention_dim", None)
        if type(unet).__name__ == "UNet2DModel":
            self.cross_attention_dim = None
        self.needs_class_labels = getattr(cfg, "class_embed_type", None) is not None or (
            getattr(cfg, "num_class_embeds", None) is not None
        )
        p = next(unet.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **model_kwargs):
        kwargs = dict(model_kwargs)
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if self.cross_attention_dim is not None:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                             **kwargs)[0]
        return self.unet(sample, timestep, return_dict=False, **kwargs)[0]
