"""A small CNN trained on the real digits: the judge of conditional accuracy and the feature space of the FD.

Trained on the fly (seeded, a few seconds on a CPU) on a fixed 75% split of scikit-learn's digits at 16x16, with
one-pixel random shifts so it does not punish a slightly off-centre sample; its accuracy on the held-out 25% is
reported next to every measurement. ``features(x)`` is the 64-wide penultimate layer (after ReLU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models import digits


class DigitClassifier(nn.Module):
    """``(B, 1, 16, 16)`` images in [-1, 1] -> logits ``(B, 10)``; ``features`` -> ``(B, 64)``."""

    feature_dim = 64

    def __init__(self, num_classes: int = digits.NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),   # 8x8
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * 16, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` of images ``(B, 1, H, W)`` (resized to 16x16 if needed)."""
        if x.shape[-2:] != (digits.IMAGE_SIZE, digits.IMAGE_SIZE):
            x = F.interpolate(x, size=(digits.IMAGE_SIZE, digits.IMAGE_SIZE), mode="bilinear", align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel per image (background value -1 fills the border)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2, x.shape[0]), generator=g).tolist()
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))])


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted labels (B,), features (B, 64))`` of images ``x (B, 1, H, W)`` in [-1, 1]."""
    model.eval()
    preds, feats = [], []
    for s in range(0, x.shape[0], batch_size):
        f = model.features(x[s:s + batch_size].float())
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


@functools.lru_cache(maxsize=4)
def train_classifier(seed: int = 0, epochs: int = 20, batch_size: int = 64) -> tuple[DigitClassifier, float]:
    """Train the judge on the 75% split; returns ``(classifier in eval mode, held-out accuracy)``. Memoised."""
    x, y = digits.load_digits_tensors()
    tr, te = digits.split_indices(x.shape[0], 0.25, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(tr) + batch_size - 1) // batch_size))
    for _ in range(epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    pred, _ = predict(model, x[te])
    return model, float((pred == y[te]).float().mean())
