"""``UNetSampler``: noise to images with a denoising network -- a diffusers UNet, a label-conditioned model, an
embedded model name or an exported ``.onnx`` / engine file.

``fastdiff.Sampler(model, ...)`` builds one of these for anything that is not a diffusers pipeline (see
:mod:`fastdiff.sampler`). This module prepares the inputs (conditioning, starting noise) and hands them to the
denoising loop in :mod:`fastdiff.loop`, which the pipeline sampler shares.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff._checks import check_device, check_dtype, check_int, check_number
from fastdiff.backends.base import ModelRunner, TorchRunner
from fastdiff.backends.registry import make_runner
from fastdiff.errors import InvalidInput
from fastdiff.images import OUTPUT_TYPES, to_images
from fastdiff.loop import GraphCache, check_graph_device, run_loop, split_backend
from fastdiff.models.folded_guidance import check_limits
from fastdiff.models.label_unet import is_label_model
from fastdiff.pipelines import scheduler_with_eta
from fastdiff.sample_inputs import check_generator, check_latents, prepare_conditioning
from fastdiff.schedulers.plan import StepPlan

DEFAULT_MODEL = "digits"
DEFAULT_SCHEDULER = "dpmpp_2m"
#: sampling settings for a model that states none of its own (a bare diffusers UNet): diffusers' usual ones
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
#: the largest height / width accepted: far beyond any trained model, small enough that a typo (an extra zero or
#: three) is refused instead of allocating gigabytes of noise.
MAX_SIDE = 16384
#: the most latent cells (images x height x width) one call samples: 4,096 Stable Diffusion images of 512 x 512 px.
#: Two sides each under MAX_SIDE can still ask for terabytes of activations (16384 x 16384 x a batch); a CI run was
#: killed by the kernel at 23 GB for such a request instead of getting an error.
MAX_LATENT_CELLS = 1 << 24


def _load_model(model):
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, str) and not model.endswith((".onnx", ".plan", ".engine")):
        from fastdiff.models import load

        return load(model)
    return model


class UNetSampler:
    """A reusable sampler: model + scheduler + backend, ready to draw images.

    Args:
        model: a diffusers ``UNet2DConditionModel`` / ``UNet2DModel``, a ``LabelConditionedUNet``, the name of an
            embedded model (``"digits"``, ``"digits-onestep"``), or a path to an exported ``.onnx`` / engine file.
            None means ``"digits"``.
        scheduler: a scheduler name (``"dpmpp_2m"``, ``"euler_a"``, ...), a diffusers scheduler object, its
            config dict, a ``scheduler_config.json`` path, or a ``fastdiff.schedulers.Scheduler``. A name on a
            model that carries a scheduler config (embedded models, exported files) takes that config's noise
            schedule and prediction type, as diffusers' ``from_config`` does. None uses the model's own scheduler
            config when it has one, else ``"dpmpp_2m"``.
        backend: ``"auto"`` or a step backend (``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``; the model runs in
            PyTorch) or a model backend (``"onnxruntime"``, ``"tensorrt"``; the step picks its backend itself).
        device / dtype: where and in what precision to run (default: the model's).
        step_backend: override the step backend when ``backend`` names a model backend.
        cuda_graph: capture one step (model call + fused step, row / timestep / noise picked on the device from
            a step counter) in a CUDA graph once, and replay it for every step: no host work between steps.
        compile: run the network ``torch.compile``d (inductor, frozen weights; see :mod:`fastdiff.compiled`),
            compiled on the first call per input shape and kept on the sampler. Where compilation is unavailable
            or fails, a :class:`~fastdiff.compiled.CompileWarning` says why and the model runs eagerly.
            ``compile_seconds`` is the time spent compiling. The weights are frozen into the compiled graph:
            build a new sampler after changing them.
    """

    def __init__(self, model=None, scheduler=None, backend: str = "auto", device=None, dtype=None,
                 step_backend: str | None = None, cuda_graph: bool = False, compile: bool = False):
        from fastdiff.schedulers import NAMES, get_scheduler

        model_backend, self.step_backend = split_backend(backend, step_backend)
        # Checked before the model is loaded or moved: torch's own failures come mid-way, as AssertionErrors.
        device, dtype = check_device(device), check_dtype(dtype)
        model = _load_model(model)
        self.label_model = model if is_label_model(model) else None
        unet = self.label_model.unet if self.label_model is not None else model
        if isinstance(unet, torch.nn.Module) and (device is not None or dtype is not None):
            (self.label_model or unet).to(device=device, dtype=dtype)
        self.runner = _make_runner(unet, model_backend, device, dtype)
        if compile:
            from fastdiff.compiled import CompiledRunner

            self.runner = CompiledRunner(self.runner)
        if self.label_model is None:  # an exported file of a label model carries its label table
            self.label_model = getattr(self.runner, "label_model", None)
        own_config = (getattr(self.label_model, "scheduler_config", None)
                      or getattr(self.runner, "scheduler_config", None) or None)
        if scheduler is None:
            scheduler = own_config or DEFAULT_SCHEDULER
        if isinstance(scheduler, str) and scheduler in NAMES and own_config:
            # A name on a model that carries its scheduler config keeps the model's noise schedule and prediction
            # type (diffusers' XScheduler.from_config(model_config)); without this, "ddim" on a v-prediction
            # model trained on a cosine schedule would silently sample with epsilon / linear-beta defaults.
            self.scheduler = get_scheduler(scheduler, config=own_config)
        else:
            self.scheduler = get_scheduler(scheduler)
        self.backend = backend
        self.cuda_graph = bool(cuda_graph)
        self.graph_cache = GraphCache()  # captured steps, reused by later calls with the same shapes and settings
        check_graph_device(self.cuda_graph, self.runner.device)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the network so far (``compile=True``; 0.0 otherwise)."""
        return float(getattr(self.runner, "compile_seconds", 0.0))

    def plan(self, num_inference_steps: int, eta: float | None = None) -> StepPlan:
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
        scheduler = self.scheduler
        if eta is not None:
            scheduler = scheduler_with_eta(scheduler, None, check_number("eta", eta))
        return scheduler.plan(num_inference_steps)

    @torch.no_grad()
    def sample(
        self,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        class_labels=None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pt",
        progress: bool = True,
        eta: float | None = None,
    ):
        """Run the whole sampling loop. Returns images as ``output_type`` says ("latent": the final (B, C, H, W)
        sample; "pt": (B, C, H, W) in [0, 1]; "np": (B, H, W, C); "pil": a list of PIL images).

        ``latents`` is unit-variance starting noise (scaled by the scheduler's init sigma inside, as diffusers
        does); without it, noise is drawn from ``generator`` with diffusers' ``randn_tensor``. ``height`` /
        ``width`` are the sample's spatial size (pixels for pixel models, latent size for latent UNets).
        ``num_inference_steps`` / ``guidance_scale`` left at None take the model's own defaults where it states them
        (the embedded models do: 20 steps and CFG 1.5 for ``digits``, 1 or 2 steps for the students), else 20 and
        5.0: a 2-step student asked for diffusers' usual step count would only raise an error."""
        defaults = getattr(self.label_model, "defaults", None) or {}
        if num_inference_steps is None:
            num_inference_steps = int(defaults.get("num_inference_steps", DEFAULT_STEPS))
        if guidance_scale is None:
            guidance_scale = float(defaults.get("guidance_scale", DEFAULT_GUIDANCE))
        g = check_number("guidance_scale", guidance_scale, hint="e.g. 1.0 (no guidance) to 7.5")
        guidance_rescale = check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        # `height or size` would turn 0 into the model's size; only None means "the model's size".
        height, width = (None if v is None else check_int(name, v, 1, MAX_SIDE)
                         for name, v in (("height", height), ("width", width)))
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise InvalidInput(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        plan = self.plan(num_inference_steps, eta)
        check_limits(self.label_model, plan.num_steps, g)
        runner = self.runner
        cond = prepare_conditioning(runner, self.label_model, g, encoder_hidden_states,
                                    negative_encoder_hidden_states, class_labels, num_images_per_prompt, latents)
        size = runner.sample_size or 64
        height, width = (size if v is None else v for v in (height, width))
        shape = (cond.batch, runner.in_channels, height, width)
        cells = cond.batch * height * width
        if cells > MAX_LATENT_CELLS:
            raise InvalidInput(f"{cond.batch} image(s) of {height} x {width} latents is {cells:,} latent cells, over "
                               f"the {MAX_LATENT_CELLS:,} one call samples; ask for smaller images or fewer per call")
        check_generator(generator, cond.batch)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=runner.device, dtype=runner.dtype)
        else:
            check_latents(latents, shape, runner)
        x = run_loop(runner, self.step_backend, plan, latents, cond, g, guidance_rescale, generator, progress,
                     cuda_graph=self.cuda_graph, graph_cache=self.graph_cache)
        return to_images(x, output_type)


def _make_runner(unet, model_backend: str, device, dtype) -> ModelRunner:
    """The runner for ``unet``: a torch module runs as it is (already moved to ``device`` / ``dtype``), anything
    else (an exported file, a model backend) goes through the model-backend registry."""
    if isinstance(unet, ModelRunner):
        return unet
    if model_backend == "torch" and isinstance(unet, torch.nn.Module):
        return TorchRunner(unet)
    return make_runner(unet, model_backend, device, dtype)
