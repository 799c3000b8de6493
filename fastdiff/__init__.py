"""fastdiff: fused, optimized sampling kernels for diffusion image models.

    import fastdiff
    images = fastdiff.sample(unet, num_inference_steps=20, guidance_scale=5.0, encoder_hidden_states=emb)
"""

from __future__ import annotations

from fastdiff import errors
from fastdiff.errors import FastDiffError

__version__ = "0.1.0"

_LAZY = {
    "Sampler": "fastdiff.sampler",
    "sample": "fastdiff.sampler",
    "fused_step": "fastdiff.ops",
    "get_scheduler": "fastdiff.schedulers",
    "from_diffusers": "fastdiff.schedulers",
    "optimize": "fastdiff.model_optimizer",
    "accelerate": "fastdiff.pipeline_accelerator",
    "restore": "fastdiff.pipeline_accelerator",  # pipelines; a UNet goes on to fastdiff.model_optimizer.restore
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = ["errors", "FastDiffError", "__version__", *_LAZY]
