"""Label conditioning through cross-attention: a learned embedding per class label, plus a null label for CFG."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.errors import InvalidInput


class LabelConditionedUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` conditioned on class labels through cross-attention.

    ``encode_labels(labels (B,) long) -> (B, tokens, D)`` looks up a learned embedding; label ``null_label``
    (= ``num_classes``) is the unconditional embedding learned by label dropout and used for CFG.
    The sampler recognises this interface (``unet`` + ``encode_labels`` + ``null_label``).
    """

    def __init__(self, unet: nn.Module, num_classes: int, tokens: int = 1, scheduler_config: dict | None = None,
                 name: str = "custom"):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.null_label = num_classes
        self.tokens = tokens
        self.embed_dim = unet.config.cross_attention_dim
        self.label_embedding = nn.Embedding(num_classes + 1, tokens * self.embed_dim)
        self.scheduler_config = dict(scheduler_config or {})
        self.name = name
        # what a distilled student was trained for (fastdiff.models.folded_guidance.check_limits); {}: no limits
        self.limits: dict = {}

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.label_embedding.weight.device).long().reshape(-1)
        if labels.numel() and not bool(((labels >= 0) & (labels <= self.null_label)).all()):
            raise InvalidInput(
                f"class labels must be integers in [0, {self.num_classes - 1}] (or {self.null_label} for the null "
                f"label), got {labels.tolist()}"
            )
        emb = self.label_embedding(labels)
        return emb.view(labels.shape[0], self.tokens, self.embed_dim)

    def forward(self, sample, timestep, labels):
        """Training-time forward: predict from labels directly (null label where dropped)."""
        return self.unet(sample, timestep, encoder_hidden_states=self.encode_labels(labels), return_dict=False)[0]


def is_label_model(obj) -> bool:
    """Whether ``obj`` is a label-conditioned model the samplers and exporters understand: a network ``unet`` plus
    ``encode_labels`` (a :class:`LabelConditionedUNet`, or an exported file's rebuilt label table)."""
    return hasattr(obj, "encode_labels") and hasattr(obj, "unet")
