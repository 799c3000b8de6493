"""Fréchet distance between two Gaussian fits of feature sets (the FID formula, in our classifier's features).

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, computed in float64 with symmetric
eigendecompositions only (no scipy): ``tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))``.
"""

from __future__ import annotations

import torch


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (D,), covariance (D, D))`` in float64 of ``features (N, D)`` (unbiased covariance)."""
    f = features.detach().to(torch.float64).cpu()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``feat_a (N, D)`` and ``feat_b (M, D)``."""
    mu1, s1 = gaussian_stats(feat_a)
    mu2, s2 = gaussian_stats(feat_b)
    r1 = _sqrtm_psd(s1)
    w = torch.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = w.clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return float(fd.clamp_min(0))
