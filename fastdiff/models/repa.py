"""Representation alignment (REPA, Yu et al. 2024) for training the digits and shapes teachers.

During training a forward hook takes an intermediate UNet feature map of the noisy image (default: the mid block's
output, 64 channels at 8x8 -- the end of the UNet's down path), a small MLP (the *projector*) maps each spatial
token to the frozen encoder's width, and the loss gains ``lambda * (1 - cosine similarity)`` to the encoder's tokens
of the **clean** image (:mod:`fastdiff.models.repa_encoder`). Alignment is per spatial token, as in REPA: the UNet's
8x8 map is average-pooled 2x2 to the encoder's 4x4 grid and token (i, j) is compared with token (i, j), so the
network is pushed to know *where* strokes are, not only which digit it is (a pooled vector would say nothing about
layout, and the classifier-free label already tells the network which digit). The projector is trained with the
UNet but is not part of the teacher: the saved weights are the plain EMA UNet and load with the registry as before.

The shapes teacher (:mod:`fastdiff.models.shapes.train_unet`) aligns to :class:`VaeFeatures`: the frozen encoder of
its own VAE (trained here without labels, as an autoencoder), up to its mid block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff._checks import check_number
from fastdiff.errors import InvalidInput

#: UNet sub-modules whose output can be aligned (their outputs are 8x8 for the digits UNet)
LAYERS = ("down_blocks.0", "down_blocks.1", "mid_block")
DEFAULT_LAYER = "mid_block"
#: projector hidden width (REPA uses a 3-layer SiLU MLP of width 2048 for DiT/SiT; 256 fits a 64-wide feature)
PROJECTOR_HIDDEN = 256


def check_weight(repa_weight) -> float:
    """``repa_weight`` (lambda) as a float >= 0, else :class:`InvalidInput`."""
    return check_number("repa_weight", repa_weight, minimum=0.0,
                        hint="0 trains without alignment; REPA's default is 0.5")


def layers_of(unet) -> tuple[str, ...]:
    """The alignable blocks of a diffusers UNet: every ``down_blocks.i`` and ``mid_block`` (:data:`LAYERS` for the
    digits UNet)."""
    return (*(f"down_blocks.{i}" for i in range(len(unet.down_blocks))), "mid_block")


def check_layer(layer, unet=None) -> str:
    """``layer`` if it names an alignable block (of ``unet``, else of the digits UNet: :data:`LAYERS`), else
    :class:`InvalidInput`."""
    names = layers_of(unet) if unet is not None else LAYERS
    if layer not in names:
        raise InvalidInput(f"repa layer must be one of {', '.join(names)}, got {layer!r}")
    return layer


def _layer_channels(unet, layer: str) -> int:
    ch = list(unet.config.block_out_channels)
    return ch[int(layer.split(".")[1])] if layer.startswith("down_blocks.") else ch[-1]


class Alignment(nn.Module):
    """The projector plus a hook on ``model.unet.<layer>``; call :meth:`loss` after each forward of ``model``."""

    def __init__(self, model, encoder: nn.Module, layer: str = DEFAULT_LAYER, seed: int = 0,
                 hidden: int = PROJECTOR_HIDDEN):
        super().__init__()
        check_layer(layer, model.unet)
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer = layer
        c = _layer_channels(model.unet, layer)
        with torch.random.fork_rng():  # the projector's initialisation never touches the global stream
            torch.manual_seed(seed + 1)
            self.projector = nn.Sequential(nn.Linear(c, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                           nn.Linear(hidden, encoder.dim))
        self._feature: torch.Tensor | None = None
        self._hook = model.unet.get_submodule(layer).register_forward_hook(self._grab)

    def _grab(self, module, inputs, output) -> None:
        self._feature = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        """Detach the hook from the UNet (the model is then exactly what it was)."""
        self._hook.remove()
        self._feature = None

    def loss(self, x0: torch.Tensor | None = None, *, target: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over batch and tokens of ``1 - cos(projector(UNet token), encoder token of x0)``. ``target``: the
        encoder's features of x0 when the caller already has them (the shapes trainer catches them while the VAE
        encodes the batch), instead of ``x0``."""
        if (x0 is None) == (target is None):
            raise TypeError("Alignment.loss takes x0 or target=, exactly one of them")
        h = self._feature
        if h is None:
            raise RuntimeError("Alignment.loss called before a forward pass of the model")
        self._feature = None
        if target is None:
            with torch.no_grad():
                target = self.encoder(x0)  # (B, D, h, w): 4x4 for the digits encoder
        # Both maps on the coarser of the two grids (average pooling): the digits UNet's 8x8 -> the encoder's 4x4,
        # the shapes VAE encoder's 16x16 -> the shapes UNet's 4x4 mid block.
        grid = tuple(min(a, b) for a, b in zip(h.shape[-2:], target.shape[-2:], strict=True))
        if h.shape[-2:] != grid:
            h = F.adaptive_avg_pool2d(h, grid)
        if target.shape[-2:] != grid:
            target = F.adaptive_avg_pool2d(target, grid)
        tokens = self.projector(h.flatten(2).transpose(1, 2))  # (B, tokens, D)
        cos = F.cosine_similarity(tokens, target.flatten(2).transpose(1, 2), dim=-1)
        return (1 - cos).mean()


class VaeFeatures(nn.Module):
    """A frozen ``AutoencoderKL``'s encoder up to its mid block, as a REPA target: images in [-1, 1] ->
    ``(B, C, H / 2^(n-1), W / 2^(n-1))`` features (the shapes VAE: 64 channels at 16x16 for 64x64 images). Trained
    without labels (reconstruction), so it may serve as REPA's pretrained encoder; the judge is another network."""

    def __init__(self, vae):
        super().__init__()
        enc = vae.encoder
        self.conv_in, self.down_blocks, self.mid_block = enc.conv_in, enc.down_blocks, enc.mid_block
        self.dim = int(vae.config.block_out_channels[-1])
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.mid_block(h)
