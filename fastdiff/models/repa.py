"""Representation alignment (REPA, Yu et al. 2024) for training the digits teacher.

During training a forward hook takes an intermediate UNet feature map of the noisy image (default: the mid block's
output, 64 channels at 8x8 -- the end of the UNet's down path), a small MLP (the *projector*) maps each spatial
token to the frozen encoder's width, and the loss gains ``lambda * (1 - cosine similarity)`` to the encoder's tokens
of the **clean** image (:mod:`fastdiff.models.repa_encoder`). Alignment is per spatial token, as in REPA: the UNet's
8x8 map is average-pooled 2x2 to the encoder's 4x4 grid and token (i, j) is compared with token (i, j), so the
network is pushed to know *where* strokes are, not only which digit it is (a pooled vector would say nothing about
layout, and the classifier-free label already tells the network which digit). The projector is trained with the
UNet but is not part of the teacher: the saved weights are the plain EMA UNet and load with the registry as before.
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


def check_layer(layer) -> str:
    """``layer`` if it names an alignable UNet block (:data:`LAYERS`), else :class:`InvalidInput`."""
    if layer not in LAYERS:
        raise InvalidInput(f"repa layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    return layer


def _layer_channels(unet, layer: str) -> int:
    ch = list(unet.config.block_out_channels)
    return ch[int(layer.split(".")[1])] if layer.startswith("down_blocks.") else ch[-1]


class Alignment(nn.Module):
    """The projector plus a hook on ``model.unet.<layer>``; call :meth:`loss` after each forward of ``model``."""

    def __init__(self, model, encoder: nn.Module, layer: str = DEFAULT_LAYER, seed: int = 0,
                 hidden: int = PROJECTOR_HIDDEN):
        super().__init__()
        check_layer(layer)
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

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Mean over batch and tokens of ``1 - cos(projector(UNet token), encoder token of x0)``."""
        h = self._feature
        if h is None:
            raise RuntimeError("Alignment.loss called before a forward pass of the model")
        self._feature = None
        with torch.no_grad():
            target = self.encoder(x0)  # (B, D, 4, 4)
        if h.shape[-2:] != target.shape[-2:]:
            h = F.adaptive_avg_pool2d(h, target.shape[-2:])
        tokens = self.projector(h.flatten(2).transpose(1, 2))  # (B, 16, D)
        cos = F.cosine_similarity(tokens, target.flatten(2).transpose(1, 2), dim=-1)
        return (1 - cos).mean()
