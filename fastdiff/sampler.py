"""The sampler API: ``fastdiff.Sampler`` and ``fastdiff.sample``, one call from noise to images.

Per step the loop runs the model on the CFG batch, then ONE fused step (``fastdiff.ops.fused_step``) that does
the guidance arithmetic, the scheduler update, the history write and the next model input. The coefficient
table and timesteps are moved to the device once; nothing in the loop reads a device value on the host, so it
makes no host<->device sync per step (checked with ``torch.cuda.set_sync_debug_mode("error")`` on a GPU).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from fastdiff.backends.base import ModelRunner, TorchRunner
from fastdiff.conditioning_inputs import check_latents, prepare_conditioning
from fastdiff.errors import InvalidInput, NonFiniteError, UnknownBackend
from fastdiff.images import OUTPUT_TYPES, to_images
from fastdiff.models.label_unet import is_label_model
from fastdiff.ops import BACKENDS as STEP_BACKENDS
from fastdiff.ops import fused_step, resolve
from fastdiff.ops.guidance import guidance_rescale_factors, step_threshold_limits
from fastdiff.schedulers.plan import HIST_SLOTS, StepPlan

MODEL_BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_MODEL = "digits"
DEFAULT_SCHEDULER = "dpmpp_2m"


def _split_backend(backend: str, step_backend: str | None) -> tuple[str, str]:
    """``backend`` names either a step backend (model runs in torch) or a model backend (step on auto)."""
    if backend == "auto" or backend in STEP_BACKENDS:
        return "torch", step_backend or backend
    if backend in MODEL_BACKENDS:
        return backend, step_backend or "auto"
    raise UnknownBackend(
        f"unknown backend {backend!r}; choose one of: auto, {', '.join(STEP_BACKENDS)}, {', '.join(MODEL_BACKENDS)}"
    )


def _load_model(model):
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, str) and not model.endswith((".onnx", ".plan", ".engine")):
        from fastdiff.models import load

        return load(model)
    return model


class Sampler:
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
    """

    def __new__(cls, model=None, *args, **kwargs):
        # Hook (fastdiff/pipelines.py): a diffusers DiffusionPipeline gets the prompt-to-image PipelineSampler
        # subclass (fastdiff.sample(pipe, prompt=...) goes through here too). Everything else is unchanged.
        if cls is Sampler and any(c.__name__ == "DiffusionPipeline" for c in type(model).__mro__):
            from fastdiff.pipelines import PipelineSampler

            cls = PipelineSampler
        return super().__new__(cls)

    def __init__(self, model=None, scheduler=None, backend: str = "auto", device=None, dtype=None,
                 step_backend: str | None = None, cuda_graph: bool = False):
        from fastdiff.schedulers import NAMES, get_scheduler

        model_backend, self.step_backend = _split_backend(backend, step_backend)
        model = _load_model(model)
        self.label_model = model if is_label_model(model) else None
        unet = self.label_model.unet if self.label_model is not None else model
        if isinstance(unet, torch.nn.Module) and (device is not None or dtype is not None):
            (self.label_model or unet).to(device=device, dtype=dtype)
        self.runner = self._make_runner(unet, model_backend, device, dtype)
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
        if self.cuda_graph and self.runner.device.type != "cuda":
            raise InvalidInput(f"cuda_graph=True needs the model on a CUDA device, it is on {self.runner.device}")

    @staticmethod
    def _make_runner(unet, model_backend: str, device, dtype) -> ModelRunner:
        if isinstance(unet, ModelRunner):
            return unet
        if model_backend == "torch" and isinstance(unet, torch.nn.Module):
            return TorchRunner(unet)
        try:
            from fastdiff.backends.registry import make_runner
        except ImportError as e:
            raise UnknownBackend(f"model backend {model_backend!r} is not available in this build ({e})") from e
        return make_runner(unet, model_backend, device, dtype)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    def plan(self, num_inference_steps: int) -> StepPlan:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise InvalidInput(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        return self.scheduler.plan(num_inference_steps)

    @torch.no_grad()
    def sample(
        self,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
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
    ):
        """Run the whole sampling loop. Returns images as ``output_type`` says ("latent": the final (B, C, H, W)
        sample; "pt": (B, C, H, W) in [0, 1]; "np": (B, H, W, C); "pil": a list of PIL images).

        ``latents`` is unit-variance starting noise (scaled by the scheduler's init sigma inside, as diffusers
        does); without it, noise is drawn from ``generator`` with diffusers' ``randn_tensor``. ``height`` /
        ``width`` are the sample's spatial size (pixels for pixel models, latent size for latent UNets)."""
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise InvalidInput(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not (math.isfinite(float(guidance_rescale)) and 0.0 <= guidance_rescale <= 1.0):
            raise InvalidInput(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidInput(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        plan = self.plan(num_inference_steps)
        runner = self.runner
        cond = prepare_conditioning(runner, self.label_model, g, encoder_hidden_states,
                                    negative_encoder_hidden_states, class_labels, num_images_per_prompt, latents)
        size = runner.sample_size or 64
        height, width = height or size, width or size
        shape = (cond.batch, runner.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=runner.device, dtype=runner.dtype)
        else:
            check_latents(latents, shape, runner)
        x = self.run_loop(plan, latents, cond, g, guidance_rescale, generator, progress)
        return to_images(x, output_type)

    def run_loop(self, plan: StepPlan, latents: torch.Tensor, cond, g: float, guidance_rescale: float,
                 generator: torch.Generator | None, progress: bool) -> torch.Tensor:
        """The denoising loop on prepared inputs; returns the final sample (B, C, H, W)."""
        state = LoopState(self, plan, latents, cond, g, guidance_rescale, generator)
        if self.cuda_graph:
            from fastdiff.graphs import run_graphed

            run_graphed(state, progress)
        else:
            for i in tqdm(range(plan.num_steps), disable=not progress, desc="sampling", leave=False):
                state.step(i)
        self._check_finite(state.flag, plan, latents.dtype)
        return state.x

    @staticmethod
    def _check_finite(flag: torch.Tensor, plan: StepPlan, dtype: torch.dtype) -> None:
        bad = torch.nonzero(flag).flatten()  # the one host sync of the loop, after the last step
        if bad.numel():
            raise NonFiniteError(int(bad[0]) + 1, plan.num_steps, str(dtype).replace("torch.", ""))


class LoopState:
    """The device buffers of one sampling loop and one step of it. ``step(i)`` with a Python ``i`` is the eager
    path; ``step(None)`` selects the coefficient row, timestep and noise on the device from ``counter`` (the
    CUDA-graph path), so the same code is captured once and replayed for every step."""

    def __init__(self, sampler: Sampler, plan: StepPlan, latents: torch.Tensor, cond, g: float, rescale: float,
                 generator: torch.Generator | None):
        dev, dtype = latents.device, latents.dtype
        self.sampler, self.plan, self.cond, self.g, self.rescale, self.generator = (
            sampler, plan, cond, g, rescale, generator)
        self.step_backend = resolve(sampler.step_backend, latents).name
        self.table = plan.device_table(dev)
        self.timesteps = plan.device_timesteps(dev)
        mult = 2 if cond.cfg else 1
        self.x = latents * plan.init_noise_sigma
        self.model_in = torch.cat([self.x] * mult) * plan.input_scale0
        hist_shape = (HIST_SLOTS,) + tuple(self.x.shape)
        self.hist = torch.zeros(hist_shape, dtype=dtype, device=dev) if plan.hist_slots else None
        self.saved = torch.zeros_like(self.x) if plan.uses_saved else None
        self.flag = torch.zeros(plan.num_steps, dtype=torch.int32, device=dev)
        self.noise_steps = plan.noise_steps()
        self.counter = torch.zeros(1, dtype=torch.long, device=dev)
        self.noise_all = self.noise_index = None

    def draw_all_noise(self) -> None:
        """Draw every step's noise up front, in the eager loop's order (graph replay is then bit-exact)."""
        steps = [i for i in range(self.plan.num_steps) if self.noise_steps[i]]
        if not steps:
            return
        x = self.x
        self.noise_all = torch.stack(
            [randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) for _ in steps])
        index = torch.zeros(self.plan.num_steps, dtype=torch.long)
        index[steps] = torch.arange(len(steps))
        self.noise_index = index.to(x.device)

    def step(self, i: int | None) -> None:
        x, plan, cond = self.x, self.plan, self.cond
        if i is None:
            row = self.table.index_select(0, self.counter).squeeze(0)
            t = self.timesteps.index_select(0, self.counter).expand(self.model_in.shape[0])
            noise = None
            if self.noise_all is not None:
                noise = self.noise_all.index_select(0, self.noise_index.index_select(0, self.counter)).squeeze(0)
            last = False
        else:
            row, t = self.table[i], self.timesteps[i].expand(self.model_in.shape[0])
            noise = None
            if self.noise_steps[i]:
                noise = randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            last = i + 1 == plan.num_steps
        out = self.sampler.runner(self.model_in, t, cond.encoder_hidden_states, cond.class_labels,
                                  **cond.model_kwargs)
        if out.shape[1] != x.shape[1]:
            raise InvalidInput(
                f"the model returns {out.shape[1]} channels for a {x.shape[1]}-channel sample (a learned-variance "
                "model?); fastdiff samplers need a model whose output has the sample's channels"
            )
        m_scale = None
        if cond.cfg and self.rescale > 0:
            m_scale = guidance_rescale_factors(out, cond.batch, self.g, self.rescale)
        x0_limit = None
        if plan.thresholding is not None:
            x0_limit = step_threshold_limits(out, x, row, cond.batch, self.g, cond.cfg, m_scale, plan.thresholding)
        fused_step(out, x, row, x, guidance_scale=self.g, cfg=cond.cfg, hist=self.hist, saved=self.saved,
                   noise=noise, next_in=None if last else self.model_in, m_scale=m_scale,
                   clip_range=plan.clip_range, x0_limit=x0_limit, flag=self.flag, backend=self.step_backend)
        if i is None:
            self.counter += 1


def sample(model=None, scheduler=None, backend: str = "auto", device=None, dtype=None, cuda_graph: bool = False,
           **kwargs):
    """One call from noise to images: ``Sampler(model, scheduler, backend, device, dtype).sample(**kwargs)``."""
    return Sampler(model, scheduler=scheduler, backend=backend, device=device, dtype=dtype,
                   cuda_graph=cuda_graph).sample(**kwargs)
