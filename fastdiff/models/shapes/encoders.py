"""The frozen encoders of the ``shapes`` pipeline as one object: captions -> pooled text embeddings, renders ->
VAE latents, latents -> images. Used by the text coalescer (its index and its sampling)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastdiff._atomic import sha256_file


class ShapesEncoder:
    """The frozen encoders of the shipped ``shapes`` pipeline: captions -> pooled text embeddings (64-d), renders
    -> VAE latents. Loading verifies the pipeline folder's manifest (weights and VAE sha256)."""

    def __init__(self, pipeline_dir: str | os.PathLike | None = None):
        import transformers
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from fastdiff.models.shapes import pipeline as P
        from fastdiff.models.shapes.tokenizer import load_tokenizer

        folder = Path(pipeline_dir) if pipeline_dir is not None else P.PIPELINE_DIR
        P.verify(folder)
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32,
                                                              local_files_only=True).eval().requires_grad_(False)
        finally:
            transformers.logging.set_verbosity(level)
        vae_folder = P.vae_dir(folder)
        self.vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32,
                                                 local_files_only=True).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer()
        self.scale = float(self.vae.config.scaling_factor)
        self.text_sha256 = sha256_file(folder / "text_encoder" / "model.safetensors")
        self.vae_sha256 = sha256_file(vae_folder / "diffusion_pytorch_model.safetensors")

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """``(N, 64)`` pooled embeddings, tokenized as ``StableDiffusionPipeline`` tokenizes prompts."""
        # as StableDiffusionPipeline.encode_prompt (and train_unet.tokenize) tokenizes: padded to 24, truncated
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids).pooler_output.float()

    @torch.no_grad()
    def encode(self, images_uint8: np.ndarray) -> torch.Tensor:
        """``(N, 4, 16, 16)`` latents of ``(N, 64, 64, 3)`` uint8 renders (posterior mode x scaling_factor)."""
        x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.vae.encode(x).latent_dist.mode() * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, 64, 64)`` in [0, 1] of latents (inverse of :meth:`encode`)."""
        x = self.vae.decode(latents.float() / self.scale).sample
        return ((x + 1) / 2).clamp(0, 1)
