"""Prompt to image with a diffusers Stable Diffusion / SDXL pipeline, the denoising loop run by fastdiff.

    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    images = fastdiff.sample(pipe, prompt="a red fox", num_inference_steps=25)      # list of PIL images
    sampler = fastdiff.Sampler(pipe, scheduler="dpmpp_2m_karras")                    # reusable

Everything around the loop is the pipeline's own code, called the way its ``__call__`` calls it, so images equal the
untouched pipeline's (within fp32 rounding) with the same generator:

- ``pipe.check_inputs`` and ``pipe.encode_prompt`` (both text encoders for SDXL, ``clip_skip``, LoRA scale);
- SDXL's added conditioning: ``add_text_embeds`` (pooled) and ``add_time_ids`` from ``pipe._get_add_time_ids``;
- LCM-distilled UNets (``unet.config.time_cond_proj_dim`` set): no CFG batch, guidance as ``timestep_cond`` from
  ``pipe.get_guidance_scale_embedding(g - 1)``;
- latents drawn exactly as ``pipe.prepare_latents`` draws them (same shape, dtype and generator consumption), then
  scaled by the scheduler's init sigma inside the loop;
- decoding: ``latents / vae.config.scaling_factor`` (SDXL: latents_mean / std when the VAE has them, and a float32
  VAE while decoding when it is fp16 with ``force_upcast``), ``pipe.run_safety_checker`` (SD), the watermark (SDXL),
  ``pipe.image_processor.postprocess``.

The loop itself is :func:`fastdiff.loop.run_loop` (the one ``fastdiff.Sampler`` runs for UNets) on the pipeline's
UNet, with ``fastdiff.from_diffusers(pipe.scheduler)``: per step one UNet call on the 2B CFG batch (uncond half
first) and one fused step ``m = u + g (c - u)`` (+ ``guidance_rescale``) + scheduler update + next model input.

What fastdiff does not run here (step-end callbacks, IP-Adapters, custom ``timesteps`` / ``sigmas``, SDXL's
``denoising_end``, an unsupported scheduler, offloaded models, ...) is reported by :func:`unsupported_reasons` /
:class:`Unsupported`; ``fastdiff.accelerate`` then falls back to the pipeline's own loop, ``fastdiff.sample`` raises.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff.backends.base import TorchRunner
from fastdiff.backends.registry import make_runner
from fastdiff.errors import InvalidInput
from fastdiff.images import OUTPUT_TYPES
from fastdiff.loop import GraphCache, check_graph_device, run_loop, split_backend
from fastdiff.models.folded_guidance import check_limits_of
from fastdiff.sample_inputs import Conditioning
from fastdiff.schedulers import NAMES, Scheduler, StepPlan, from_diffusers, get_scheduler

# (class name, the diffusers module that defines it): the pipelines whose __call__ this module reproduces.
_PIPELINES = {
    "sd": ("StableDiffusionPipeline", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"),
    "sdxl": ("StableDiffusionXLPipeline", "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"),
}
# Arguments that, when set, need code paths fastdiff does not reproduce: the original loop runs them.
_UNSUPPORTED_ARGS = {
    "timesteps": "custom `timesteps`",
    "sigmas": "custom `sigmas`",
    "ip_adapter_image": "IP-Adapter (`ip_adapter_image`)",
    "ip_adapter_image_embeds": "IP-Adapter (`ip_adapter_image_embeds`)",
    "callback_on_step_end": "`callback_on_step_end` (it may change latents between steps)",
    "denoising_end": "SDXL `denoising_end` (ensemble of experts)",
}


class Unsupported(InvalidInput):
    """A pipeline call fastdiff cannot run exactly; ``reasons`` says why (``fastdiff.accelerate`` falls back)."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("fastdiff cannot run this pipeline call: " + "; ".join(self.reasons)
                         + ". Call the pipeline itself for it (fastdiff.accelerate does that automatically).")


def is_diffusers_pipeline(obj: Any) -> bool:
    """True for any diffusers ``DiffusionPipeline`` (checked by class name: no diffusers import needed)."""
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


def _pipeline_class(kind: str) -> type:
    import importlib

    name, module = _PIPELINES[kind]
    return getattr(importlib.import_module(module), name)


def pipeline_kind(pipe: Any) -> str | None:
    """"sd" or "sdxl" for a (subclass of a) StableDiffusionPipeline / StableDiffusionXLPipeline, else None."""
    for kind in ("sdxl", "sd"):
        if isinstance(pipe, _pipeline_class(kind)):
            return kind
    return None


def class_reasons(pipe: Any, kind: str | None = None) -> list[str]:
    """Why this pipeline's class cannot run through fastdiff (not SD / SDXL, or its own ``__call__``)."""
    kind = kind or pipeline_kind(pipe)
    if kind is None:
        supported = ", ".join(name for name, _ in _PIPELINES.values())
        return [f"{type(pipe).__name__} is not supported (supported: {supported} and their "
                "AutoPipelineForText2Image forms)"]
    base = _pipeline_class(kind)
    orig = getattr(type(pipe), "_fastdiff_original_class", type(pipe))
    if orig.__call__ is not base.__call__:
        return [f"{orig.__name__} overrides {base.__name__}.__call__"]
    return []


def pipeline_reasons(pipe: Any, kind: str | None = None) -> list[str]:
    """Why this pipeline object (whatever the call) cannot run through fastdiff now; empty when it can. Besides
    :func:`class_reasons`, the UNet's state: IP-Adapter weights, class embeddings, offload hooks."""
    kind = kind or pipeline_kind(pipe)
    reasons = class_reasons(pipe, kind)
    if kind is None:
        return reasons
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "config"):
        return reasons + ["the pipeline has no UNet"]
    cfg = unet.config
    if getattr(cfg, "encoder_hid_dim_type", None) is not None:
        reasons.append(f"the UNet has encoder_hid_dim_type={cfg.encoder_hid_dim_type!r} (IP-Adapter weights loaded?)")
    if getattr(cfg, "class_embed_type", None) is not None or getattr(cfg, "num_class_embeds", None) is not None:
        reasons.append("the UNet has a class embedding")
    want = "text_time" if kind == "sdxl" else None
    if getattr(cfg, "addition_embed_type", None) != want:
        reasons.append(f"the UNet has addition_embed_type={cfg.addition_embed_type!r} (expected {want!r})")
    if hasattr(unet, "_hf_hook"):
        reasons.append("the UNet has accelerate hooks (model / sequential CPU offload)")
    return reasons


#: the attribute of a pipeline that holds its own default call arguments (set by ``fastdiff.models.load_pipeline``
#: for the embedded ``shapes`` model: a 20-step model should not be sampled at diffusers' generic 50 steps / CFG 7.5)
DEFAULTS_ATTR = "fastdiff_defaults"
#: the attribute of a pipeline that holds what a distilled student supports (``{"max_inference_steps": 1,
#: "guidance_scale": [1, 1]}``, :func:`fastdiff.models.folded_guidance.check_limits_of`); absent / empty: anything
LIMITS_ATTR = "fastdiff_limits"


def bind_call(pipe: Any, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(every named argument of the pipeline's ``__call__`` with defaults applied, the extra ``**kwargs``).
    Arguments the caller left out take ``pipe.fastdiff_defaults`` first (when the pipeline has it), then the
    signature's defaults."""
    base = getattr(type(pipe), "_fastdiff_original_class", type(pipe))
    sig = inspect.signature(base.__call__)
    bound = sig.bind(pipe, *args, **kwargs)
    for name, value in (getattr(pipe, DEFAULTS_ATTR, None) or {}).items():
        if name in sig.parameters and name not in bound.arguments:
            bound.arguments[name] = value
    bound.apply_defaults()
    values, extra = {}, {}
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(bound.arguments.get(name, {}))
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            values[name] = bound.arguments.get(name)
    values.pop(next(iter(sig.parameters)), None)  # self
    return values, extra


def call_reasons(a: dict, extra: dict) -> list[str]:
    """Why these call arguments cannot run through fastdiff (checked before anything runs)."""
    reasons = [f"{why} is not supported" for name, why in _UNSUPPORTED_ARGS.items() if a.get(name) is not None]
    given = sorted(k for k, v in extra.items() if v is not None)
    if given:
        reasons.append(f"argument(s) {', '.join(given)} (deprecated `callback` / `callback_steps`, or not "
                       "arguments of this pipeline) are not supported")
    if a.get("output_type") not in OUTPUT_TYPES:
        reasons.append(f"output_type={a.get('output_type')!r} (supported: {', '.join(OUTPUT_TYPES)})")
    g, r = a.get("guidance_scale"), a.get("guidance_rescale")
    if not isinstance(g, (int, float)) or not math.isfinite(g):
        reasons.append(f"guidance_scale={g!r} is not a finite number")
    if not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        reasons.append(f"guidance_rescale={r!r} is outside [0, 1]")
    n = a.get("num_inference_steps")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        reasons.append(f"num_inference_steps={n!r} is not an integer >= 1")
    return reasons


def scheduler_with_eta(scheduler: Scheduler, pipe_scheduler: Any, eta: Any) -> Scheduler:
    """The scheduler the pipeline's ``step(..., eta=eta)`` runs: diffusers passes ``eta`` only to schedulers whose
    ``step`` takes it (DDIM); fastdiff's DDIM holds it as a config key."""
    if pipe_scheduler is not None and "eta" not in inspect.signature(pipe_scheduler.step).parameters:
        return scheduler
    if "eta" not in scheduler.config:
        if eta:
            raise Unsupported([f"eta={eta!r} with fastdiff scheduler {scheduler.name!r}, which has no eta"])
        return scheduler
    if scheduler["eta"] == eta:
        return scheduler
    try:
        return scheduler.replace(eta=eta)
    except InvalidInput as e:
        raise Unsupported([str(e)]) from e


def _default_size(pipe: Any, kind: str, height: int | None, width: int | None) -> tuple[int, int]:
    """The pipeline's own defaults: the UNet's sample size times the VAE scale factor."""
    if kind == "sdxl":
        return (height or pipe.default_sample_size * pipe.vae_scale_factor,
                width or pipe.default_sample_size * pipe.vae_scale_factor)
    if height and width:
        return height, width
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def _call_with_known(fn, values: dict, **fixed):
    """Call ``fn`` with the keyword arguments it declares, taken from ``fixed`` then ``values``."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in values.items() if k in params}
    kwargs.update({k: v for k, v in fixed.items() if k in params})
    return fn(**kwargs)


class PipelineSampler:
    """``fastdiff.Sampler`` for a diffusers StableDiffusion(XL)Pipeline: prompt to images, the loop in fastdiff.

    ``fastdiff.Sampler(pipe, ...)`` returns one of these (a registered ``fastdiff.Sampler``; it shares the loop of
    :mod:`fastdiff.loop` with the UNet sampler rather than subclassing it). Args as
    :class:`fastdiff.unet_sampler.UNetSampler`, except:
        scheduler: None follows ``pipe.scheduler`` (converted with ``from_diffusers`` at each call, so swapping
            ``pipe.scheduler`` takes effect); a fastdiff name (``"dpmpp_2m_karras"``) takes the pipeline's noise
            schedule and prediction type from ``pipe.scheduler``'s config; anything else as ``get_scheduler``.
        device / dtype: move the whole pipeline (``pipe.to(device, dtype)``).
    """

    def __init__(self, model, scheduler=None, backend: str = "auto", device=None, dtype=None,
                 step_backend: str | None = None, cuda_graph: bool = False, *, check: bool = True):
        pipe = model
        self.pipe, self.kind = pipe, pipeline_kind(pipe)
        reasons = pipeline_reasons(pipe, self.kind)
        if reasons and check:
            raise InvalidInput("fastdiff cannot sample this pipeline: " + "; ".join(reasons))
        if device is not None or dtype is not None:
            pipe.to(device=device, dtype=dtype)
        self.model_backend, self.step_backend = split_backend(backend, step_backend)
        self.backend, self.cuda_graph, self.label_model = backend, bool(cuda_graph), None
        self.graph_cache = GraphCache()  # captured steps, reused by later calls with the same shapes and settings
        self._fixed_runner = None
        if self.model_backend != "torch":
            self._fixed_runner = make_runner(pipe.unet, self.model_backend, device, dtype)
            self._fixed_for = pipe.unet
        self.runner = self._refresh_runner()
        self._user_scheduler: Scheduler | None = None
        self._cache: tuple[Any, Scheduler] | None = None
        self._plans: tuple[Any, dict] = (None, {})
        if scheduler is None:
            if check:
                self.pipe_scheduler()  # fail here, not at the first call, when pipe.scheduler is not supported
        elif isinstance(scheduler, str) and scheduler in NAMES:
            self._user_scheduler = get_scheduler(scheduler, config=pipe.scheduler)
        else:
            self._user_scheduler = get_scheduler(scheduler)
        if check:
            self._check_graph_device()

    # ----- per-call state ---------------------------------------------------------------------------------------
    def _refresh_runner(self):
        """The runner for the UNet as it is now (the user may have moved or swapped ``pipe.unet``)."""
        if self._fixed_runner is not None:
            if self.pipe.unet is not self._fixed_for:
                raise Unsupported([f"pipe.unet was replaced after the {self.model_backend} runner was built from it "
                                   "(accelerate / build the sampler again)"])
            return self._fixed_runner
        return TorchRunner(self.pipe.unet)

    def _check_graph_device(self) -> None:
        check_graph_device(self.cuda_graph, self.runner.device, "; move the pipeline with pipe.to('cuda')")

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    def pipe_scheduler(self) -> Scheduler:
        """``from_diffusers(pipe.scheduler)``, converted once per scheduler object (raises if unsupported)."""
        if self._user_scheduler is not None:
            return self._user_scheduler
        current = self.pipe.scheduler
        if self._cache is None or self._cache[0] is not current:
            self._cache = (current, from_diffusers(current))
        return self._cache[1]

    def _plan(self, n: int, eta) -> StepPlan:
        """The StepPlan for this call (eta None: the scheduler's own), cached per scheduler object: a 50-step plan
        costs ~2 ms of host math, a call should not pay it twice."""
        try:
            base = self.pipe_scheduler()
            if self._plans[0] is not base:
                self._plans = (base, {})
            key = (n, eta)
            if key not in self._plans[1]:
                scheduler = base
                if eta is not None:
                    pipe_sched = self.pipe.scheduler if self._user_scheduler is None else None
                    scheduler = scheduler_with_eta(base, pipe_sched, eta)
                if len(self._plans[1]) > 32:
                    self._plans[1].clear()
                self._plans[1][key] = scheduler.plan(n)
            return self._plans[1][key]
        except Unsupported:
            raise
        except InvalidInput as e:  # unsupported scheduler class / option, step count out of range
            raise Unsupported([str(e)]) from e

    def plan(self, num_inference_steps: int) -> StepPlan:
        """The StepPlan a call with this step count runs (the scheduler's own ``eta``)."""
        return self._plan(num_inference_steps, None)

    @property
    def scheduler(self) -> Scheduler:
        return self.pipe_scheduler()

    @scheduler.setter
    def scheduler(self, value: Scheduler) -> None:  # as UNetSampler.scheduler: assigning pins a scheduler
        self._user_scheduler = value

    # ----- public API -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, *args, progress: bool = True, **kwargs):
        """Prompt to images, with the arguments of the pipeline's ``__call__`` (``prompt``, ``negative_prompt``,
        ``num_inference_steps``, ``guidance_scale``, ``generator``, ``output_type``, ``prompt_embeds``, SDXL's
        ``pooled_prompt_embeds`` / ``original_size`` / ..., same defaults). Returns the images only, as
        ``output_type`` says: "pil" a list of PIL images, "np" (N, H, W, 3) float32, "pt" (N, 3, H, W) in [0, 1],
        "latent" the final latents (N, 4, H/8, W/8). Raises :class:`Unsupported` for arguments fastdiff cannot run.
        """
        values, extra = bind_call(self.pipe, args, kwargs)
        reasons = call_reasons(values, extra)
        if reasons:
            raise Unsupported(reasons)
        eta_given = "eta" in kwargs
        images, _ = self.generate(values, progress=progress, pipe_eta=eta_given or self._user_scheduler is None)
        return images

    def generate(self, a: dict, progress: bool, pipe_eta: bool = True) -> tuple[Any, list[bool] | None]:
        """Run one pipeline call (``a``: its bound arguments, already checked by :func:`call_reasons`).
        Returns (postprocessed images, nsfw flags or None). Raises :class:`Unsupported` before drawing any random
        number when something only shows up now (scheduler, dtypes, devices, latents shape)."""
        pipe, kind = self.pipe, self.kind
        reasons = pipeline_reasons(pipe, kind)
        if reasons:
            raise Unsupported(reasons)
        self.runner = runner = self._refresh_runner()
        self._check_graph_device()
        if a["cross_attention_kwargs"] is not None and self.model_backend != "torch":
            raise Unsupported([f"cross_attention_kwargs with the {self.model_backend} model backend"])
        unet_cfg = pipe.unet.config
        height, width = _default_size(pipe, kind, a["height"], a["width"])
        values = dict(a, height=height, width=width, callback_steps=None)
        if kind == "sdxl":
            values["original_size"] = a["original_size"] or (height, width)
            values["target_size"] = a["target_size"] or (height, width)
        prompt = a["prompt"]
        if isinstance(prompt, list) and not prompt:
            raise InvalidInput("prompt is an empty list: give at least one prompt")
        try:
            _call_with_known(pipe.check_inputs, values)
        except InvalidInput:
            raise
        except ValueError as e:  # diffusers' own checks: same message, fastdiff's error type
            raise InvalidInput(str(e)) from e

        g = float(a["guidance_scale"])
        limits = getattr(pipe, LIMITS_ATTR, None)
        if limits:  # a distilled student (``shapes-onestep``): only what it was trained for
            check_limits_of(limits, getattr(pipe, "fastdiff_name", "this pipeline"), a["num_inference_steps"], g)
        lcm = getattr(unet_cfg, "time_cond_proj_dim", None) is not None
        do_cfg = g > 1 and not lcm
        pipe._guidance_scale, pipe._guidance_rescale = a["guidance_scale"], a["guidance_rescale"]
        pipe._clip_skip, pipe._cross_attention_kwargs = a["clip_skip"], a["cross_attention_kwargs"]
        pipe._interrupt = False
        if kind == "sdxl":
            pipe._denoising_end = None

        plan = self._plan(a["num_inference_steps"], a["eta"] if pipe_eta else None)

        batch = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else len(a["prompt_embeds"])
        total = batch * a["num_images_per_prompt"]
        device = pipe._execution_device
        generator = a["generator"]
        _check_generator(generator, total)
        if not _same_device(runner.device, torch.device(device)):
            raise Unsupported([f"the UNet is on {runner.device} but the pipeline executes on {device}"])

        try:
            cond, dtype = self._conditioning(a, values, kind, device, do_cfg, g, total)
        except InvalidInput:
            raise
        except ValueError as e:  # encode_prompt's checks (e.g. a negative-prompt list of another length)
            raise InvalidInput(str(e)) from e
        if dtype != runner.dtype:
            raise Unsupported([f"the prompt embeddings are {dtype} but the UNet runs in {runner.dtype}"])
        shape = (total, unet_cfg.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
        latents = a["latents"]
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
            if tuple(latents.shape) != shape or latents.dtype != runner.dtype:
                raise Unsupported([f"latents of shape {tuple(latents.shape)} and dtype {latents.dtype} (this call "
                                   f"draws {shape} in {runner.dtype})"])
        pipe._num_timesteps = plan.num_steps

        x = run_loop(runner, self.step_backend, plan, latents, cond, g, float(a["guidance_rescale"]), generator,
                     progress, cuda_graph=self.cuda_graph, graph_cache=self.graph_cache)
        images, nsfw = (_decode_sdxl(pipe, x, a["output_type"]) if kind == "sdxl"
                        else _decode_sd(pipe, x, a["output_type"], generator, device, dtype))
        pipe.maybe_free_model_hooks()
        return images, nsfw

    def _conditioning(self, a: dict, values: dict, kind: str, device, do_cfg: bool, g: float, total: int):
        """Encode the prompts with the pipeline's ``encode_prompt`` and build the CFG-batched Conditioning."""
        pipe = self.pipe
        cak = a["cross_attention_kwargs"]
        lora_scale = cak.get("scale", None) if cak is not None else None
        common = dict(device=device, num_images_per_prompt=a["num_images_per_prompt"],
                      do_classifier_free_guidance=do_cfg, lora_scale=lora_scale, clip_skip=a["clip_skip"])
        model_kwargs: dict[str, Any] = {}
        if kind == "sdxl":
            emb, neg, pooled, neg_pooled = _call_with_known(pipe.encode_prompt, a, **common)
            proj_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                        else pipe.text_encoder_2.config.projection_dim)
            time_ids = pipe._get_add_time_ids(values["original_size"], a["crops_coords_top_left"],
                                              values["target_size"], dtype=emb.dtype,
                                              text_encoder_projection_dim=proj_dim)
            neg_time_ids = time_ids
            if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
                neg_time_ids = pipe._get_add_time_ids(a["negative_original_size"], a["negative_crops_coords_top_left"],
                                                      a["negative_target_size"], dtype=emb.dtype,
                                                      text_encoder_projection_dim=proj_dim)
            text_embeds = pooled
            if do_cfg:
                text_embeds = torch.cat([neg_pooled, pooled], dim=0)
                time_ids = torch.cat([neg_time_ids, time_ids], dim=0)
            # as the pipeline: the (1 or 2, 6) time ids repeated B*n times (row order included)
            model_kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds.to(device),
                                                 "time_ids": time_ids.to(device).repeat(total, 1)}
        else:
            emb, neg = _call_with_known(pipe.encode_prompt, a, **common)
        dtype = emb.dtype
        ehs = torch.cat([neg, emb]).to(device) if do_cfg else emb.to(device)
        proj = getattr(pipe.unet.config, "time_cond_proj_dim", None)
        if proj is not None:  # LCM-distilled UNet: guidance enters as an embedding of (g - 1)
            w = torch.tensor(g - 1).repeat(total)
            model_kwargs["timestep_cond"] = pipe.get_guidance_scale_embedding(w, embedding_dim=proj).to(
                device=device, dtype=dtype)
        if cak is not None:
            model_kwargs["cross_attention_kwargs"] = cak
        return Conditioning(total, do_cfg, ehs, None, model_kwargs), dtype


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _check_generator(generator, total: int) -> None:
    if isinstance(generator, list) and len(generator) != total:
        raise Unsupported([f"a list of {len(generator)} generators for {total} images (the pipeline raises here)"])
    if generator is not None and not isinstance(generator, (torch.Generator, list)):
        raise Unsupported([f"generator of type {type(generator).__name__}"])


def _decode_sd(pipe, latents: torch.Tensor, output_type: str, generator, device, dtype):
    """StableDiffusionPipeline's tail: VAE decode, safety checker, postprocess."""
    if output_type != "latent":
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, device, dtype)
    else:
        image, nsfw = latents, None
    denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw


def _decode_sdxl(pipe, latents: torch.Tensor, output_type: str):
    """StableDiffusionXLPipeline's tail: an fp16 VAE with ``force_upcast`` decodes in float32 (the SDXL VAE
    overflows in fp16) and is cast back; latents_mean / std when the VAE config has them; watermark; postprocess."""
    if output_type == "latent":
        return latents, None
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        latents = latents.to(get_module_execution_device(vae))
    except ImportError:  # older diffusers
        pass
    try:
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type), None


def pipeline_output(pipe, images, nsfw, return_dict: bool):
    """The pipeline's own return value: its output dataclass, or the tuple with ``return_dict=False``."""
    if pipeline_kind(pipe) == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

    if not return_dict:
        return images, nsfw
    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
