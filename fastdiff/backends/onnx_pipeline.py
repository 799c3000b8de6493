"""Sampling an exported text-to-image pipeline (``python -m fastdiff.export shapes --format onnx``) with onnxruntime.

:class:`OnnxTextToImage` verifies the folder's manifest (every file's sha256), opens the three graphs and runs
``diffusers.StableDiffusionPipeline``'s own loop around them: the same tokenization (padded to the tokenizer's
length, truncated), ``[negative; prompt]`` embeddings, the same noise (``randn_tensor`` from the caller's
generator), the scheduler of the manifest (DPM-Solver++ for ``shapes``), the same guidance and decoding. So for the
same prompts, steps, guidance and generator it gives the PyTorch pipeline's images, up to onnxruntime's rounding
(tests/export/test_shapes_onnx.py measures how far).

    runner = OnnxTextToImage("out/shapes-onnx")
    images = runner(["a red circle"], num_inference_steps=20, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0))   # (1, 64, 64, 3) float32 in [0, 1]
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch

from fastdiff.errors import InvalidInput, ModelConfigError
from fastdiff.exported.manifest import COMPONENTS, read_manifest
from fastdiff.exported.session import make_session
from fastdiff.models.folded_guidance import check_limits_of


class OnnxTextToImage:
    """The three graphs of an exported text-to-image folder as a sampler (see the module doc); ``threads``:
    onnxruntime's intra-op threads (default torch's)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        comps = self.manifest["components"]
        self.sessions = {c: make_session(self.folder / comps[c]["file"], torch.device("cpu"), threads=threads)
                         for c in COMPONENTS}
        self.defaults = dict(self.manifest.get("defaults") or {})
        self.tokenizer = self._tokenizer()
        dims = comps["vae_decoder"]["dims"]  # named sizes: [min, opt, max, multiple]; height / width are static
        self.latent_shape = tuple(d if isinstance(d, int) else int(dims[d][1])
                                  for d in comps["vae_decoder"]["inputs"][0]["dims"][1:])  # (C, H, W)

    def _tokenizer(self):
        info = self.manifest.get("tokenizer") or {}
        if info.get("name") != "shapes":
            raise ModelConfigError(f"{self.folder}: the manifest names tokenizer {info.get('name')!r}; this runner "
                                   "knows the shipped 'shapes' tokenizer only")
        from fastdiff.models.shapes.tokenizer import load_tokenizer

        tok = load_tokenizer()
        if int(tok.model_max_length) != int(info.get("model_max_length", -1)):
            raise ModelConfigError(f"{self.folder}: exported for {info.get('model_max_length')} tokens, the shipped "
                                   f"tokenizer pads to {tok.model_max_length}; re-export")
        return tok

    def _scheduler(self):
        import diffusers

        cfg = dict(self.manifest.get("scheduler") or {})
        cls = getattr(diffusers, str(cfg.pop("_class_name", "")), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ModelConfigError(f"{self.folder}: the manifest's scheduler class is not a diffusers scheduler")
        return cls.from_config(cfg)

    def _run(self, comp: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One graph call, inputs cast to the graph's dtypes (fp16 exports), the output as float32."""
        dtypes = {s["name"]: s["dtype"] for s in self.manifest["components"][comp]["inputs"]}
        out = self.sessions[comp].run(None, {k: v.astype(dtypes[k], copy=False) for k, v in feeds.items()})[0]
        return out.astype(np.float32, copy=False)

    def guidance_input_dim(self) -> int | None:
        """The width of the UNet graph's ``timestep_cond`` input (folded guidance), None when it has none."""
        for spec in self.manifest["components"]["unet"]["inputs"]:
            if spec["name"] == "timestep_cond":
                return int(spec["dims"][1])
        return None

    def encode(self, prompts: list[str]) -> np.ndarray:
        """``last_hidden_state`` of ``prompts`` (tokenized as ``StableDiffusionPipeline.encode_prompt`` does)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        return self._run("text_encoder", {"input_ids": ids})

    def __call__(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None) -> np.ndarray:
        """Images (batch, H, W, 3) float32 in [0, 1] (the pipeline's ``output_type="np"``); steps and guidance
        default to the model's own (the manifest's ``defaults``)."""
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInput("prompt must be a string or a non-empty list of strings")
        negative = [""] * len(prompts) if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        if len(negative) != len(prompts):
            raise InvalidInput(f"negative_prompt has {len(negative)} entries for {len(prompts)} prompts")
        steps = int(num_inference_steps or self.defaults.get("num_inference_steps", 20))
        guidance = float(self.defaults.get("guidance_scale", 5.0) if guidance_scale is None else guidance_scale)
        if self.manifest.get("limits"):  # a distilled student (shapes-onestep): the steps / guidance it learned
            check_limits_of(self.manifest["limits"], self.manifest.get("model"), steps, guidance)
        cond_dim = self.guidance_input_dim()
        # the pipeline's do_classifier_free_guidance: none for a UNet with folded guidance (shapes-consistency)
        cfg = guidance > 1.0 and cond_dim is None
        embeds = self.encode(negative + prompts) if cfg else self.encode(prompts)
        extra = {}
        if cond_dim is not None:  # the guidance as an input, as the pipeline's get_guidance_scale_embedding(g - 1)
            from fastdiff.models.folded_guidance import folded_guidance_cond

            extra["timestep_cond"] = folded_guidance_cond(guidance, len(prompts), cond_dim, "cpu",
                                                          torch.float32).numpy()
        scheduler = self._scheduler()
        scheduler.set_timesteps(steps)
        # as the pipeline's prepare_extra_step_kwargs: the generator goes to schedulers that draw noise (LCM)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        latents = randn_tensor((len(prompts), *self.latent_shape), generator=generator, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = scheduler.scale_model_input(x, t)
            out = torch.from_numpy(self._run("unet", {
                "sample": x.numpy(), "timestep": np.full((x.shape[0],), float(t), np.float32),
                "encoder_hidden_states": embeds, **extra}))  # float32 out: guidance and the solver run in float32
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + guidance * (text - uncond)
            latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
        image = self._run("vae_decoder", {"latents": latents.numpy()})
        return np.ascontiguousarray(image.transpose(0, 2, 3, 1))
