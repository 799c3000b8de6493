"""The model-runner interface the sampler drives, and its PyTorch implementation.

A runner maps ``(sample (N, C, H, W), timestep (N,) float32, encoder_hidden_states (N, L, D) or None,
class_labels (N,) or None, **model_kwargs)`` to the model's prediction ``(N, C_out, H, W)`` on the sampler's
device, without host<->device syncs. ``N`` is 2B under classifier-free guidance.
"""

from __future__ import annotations

import torch

from fastdiff.errors import InvalidInput


class ModelRunner:
    """Base class. Subclasses fill the attributes and implement ``__call__``."""

    name: str = ""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = None  # latent / pixel side length the model was trained at (None: unknown)
    cross_attention_dim: int | None = None  # D of encoder_hidden_states, None for unconditional models
    needs_class_labels: bool = False
    time_cond_proj_dim: int | None = None  # width of ``timestep_cond`` (folded guidance, LCM-style), None: none
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
        cfg = getattr(unet, "config", None)
        if not all(hasattr(cfg, k) for k in ("in_channels", "out_channels", "sample_size")) or not any(
                True for _ in unet.parameters()):
            # Anything else (an nn.Linear, a classifier) would fail on its first call with an AttributeError or a
            # shape error that does not name the real problem.
            raise InvalidInput(
                f"{type(unet).__name__} is not a diffusion network fastdiff can run: pass a diffusers "
                "UNet2DConditionModel / UNet2DModel (with a .config holding in_channels, out_channels, sample_size), "
                "a LabelConditionedUNet, an embedded model name, an exported .onnx / .engine path or a ModelRunner")
        self.unet = unet
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
        self.time_cond_proj_dim = getattr(cfg, "time_cond_proj_dim", None)
        p = next(unet.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **model_kwargs):
        kwargs = dict(model_kwargs)
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if self.cross_attention_dim is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        return self._prediction(self.unet(sample, timestep, return_dict=False, **kwargs), sample)

    def _prediction(self, out, sample: torch.Tensor) -> torch.Tensor:
        """The prediction in what the network returned: diffusers' ``(prediction,)`` with return_dict=False, or a
        bare tensor. Indexing a bare tensor with [0] would take its first image and fail later with a misleading
        channel-count message, so the type and shape are checked here (host-side shape reads only, no sync)."""
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        expected = (sample.shape[0], self.out_channels, *sample.shape[2:])
        if not isinstance(out, torch.Tensor):
            what = f"a dict with keys {sorted(map(str, out))[:10]}" if isinstance(out, dict) else type(out).__name__
            raise InvalidInput(f"the model returned {what}; expected a tensor of shape {expected} (or a tuple whose "
                               "first item is one, as diffusers UNets return with return_dict=False)")
        if tuple(out.shape) != expected:
            raise InvalidInput(f"the model returned a tensor of shape {tuple(out.shape)} for a sample of shape "
                               f"{tuple(sample.shape)}; expected {expected} (batch, the model's out_channels, "
                               "height, width)")
        return out
