"""Turning final samples into images (pixel-space models) the way diffusers pipelines do."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from fastdiff._atomic import atomic_write_bytes
from fastdiff.errors import InvalidInput

OUTPUT_TYPES = ("latent", "pt", "np", "pil")


def to_images(sample: torch.Tensor, output_type: str):
    """(B, C, H, W) sample in [-1, 1] -> "pt": (B, C, H, W) float in [0, 1]; "np": (B, H, W, C) float32;
    "pil": list of PIL images (mode "L" for one channel, "RGB" for three); "latent": the sample unchanged."""
    if output_type not in OUTPUT_TYPES:
        raise InvalidInput(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return sample
    if sample.shape[1] not in (1, 3):
        raise InvalidInput(
            f"output_type={output_type!r} needs a pixel-space model with 1 or 3 channels, but the sample has "
            f"{sample.shape[1]} channels (a latent). Use output_type='latent' and decode it with your VAE."
        )
    images = (sample.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    u8 = (arr * 255).round().astype(np.uint8)
    if u8.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in u8]
    return [Image.fromarray(a, mode="RGB") for a in u8]


def save_image(image, path: str | os.PathLike, format: str | None = None, **params) -> Path:
    """Save a PIL image atomically: encoded in memory, then :func:`fastdiff._atomic.atomic_write_bytes` (PIL's own
    ``save(path)`` truncates the old file first, so a kill or a second writer leaves a broken one). ``format``
    defaults to the one the suffix names."""
    from PIL import Image

    path = Path(path)
    buf = io.BytesIO()
    image.save(buf, format=format or Image.registered_extensions().get(path.suffix.lower(), "PNG"), **params)
    return atomic_write_bytes(path, buf.getvalue())
