"""The denoising loop every fastdiff sampler runs: device buffers, one step, eager or CUDA-graph replay, finite check.

Per step the loop runs the model on the CFG batch, then ONE fused step (``fastdiff.ops.fused_step``) that does the
guidance arithmetic, the scheduler update, the history write and the next model input. The coefficient table and
timesteps are moved to the device once; nothing in the loop reads a device value on the host, so it makes no
host<->device sync per step (checked with ``torch.cuda.set_sync_debug_mode("error")`` on a GPU). The one sync is
:func:`check_finite` after the last step.

The loop lives in its own module, below the samplers, so that both the UNet sampler
(:mod:`fastdiff.unet_sampler`) and the pipeline sampler (:mod:`fastdiff.pipelines`) use it by composition -- a
model runner, a step backend and prepared inputs go in, the final sample comes out -- and neither sampler has to
subclass or import the other. :func:`split_backend` is here for the same reason: both samplers (and
``fastdiff.accelerate``) read a user's ``backend=`` the same way.

Whole-loop CUDA graphs (:func:`run_loop` with ``cuda_graph=True``): one step is captured once and replayed for
every step. The captured step reads its coefficient row, timestep and pre-drawn noise from device tables indexed by
a step counter in device memory and increments the counter itself, so replaying the same graph N times runs the N
different steps with no host work in between. Replay equals the eager loop bit for bit on the same backend: the
noise is drawn up front in the eager order and every kernel is the same.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from fastdiff.backends.base import ModelRunner
from fastdiff.backends.registry import MODEL_BACKENDS
from fastdiff.errors import InvalidInput, NonFiniteError, UnknownBackend
from fastdiff.ops import BACKENDS as STEP_BACKENDS
from fastdiff.ops import fused_step, resolve
from fastdiff.ops.guidance import guidance_rescale_factors, step_threshold_limits
from fastdiff.sample_inputs import Conditioning
from fastdiff.schedulers.plan import HIST_SLOTS, StepPlan


def split_backend(backend: str, step_backend: str | None) -> tuple[str, str]:
    """(model backend, step backend) for a sampler's ``backend=``: it names either a step backend (the model runs
    in torch) or a model backend of :mod:`fastdiff.backends.registry` (the step picks its backend: ``auto``).
    ``"torch"`` is both; it means the torch step, with the model in torch too."""
    if backend == "auto" or backend in STEP_BACKENDS:
        return "torch", step_backend or backend
    if backend in MODEL_BACKENDS:
        return backend, step_backend or "auto"
    model_only = [b for b in MODEL_BACKENDS if b not in STEP_BACKENDS]
    raise UnknownBackend(
        f"unknown backend {backend!r}; choose one of: auto, {', '.join(STEP_BACKENDS)}, {', '.join(model_only)}"
    )


def check_graph_device(cuda_graph: bool, device: torch.device, hint: str = "") -> None:
    """A CUDA graph needs the model on a CUDA device; raise early (at construction) rather than at capture."""
    if cuda_graph and device.type != "cuda":
        raise InvalidInput(f"cuda_graph=True needs the model on a CUDA device, it is on {device}{hint}")


class LoopState:
    """The device buffers of one sampling loop and one step of it. ``step(i)`` with a Python ``i`` is the eager
    path; ``step(None)`` selects the coefficient row, timestep and noise on the device from ``counter`` (the
    CUDA-graph path), so the same code is captured once and replayed for every step."""

    def __init__(self, runner: ModelRunner, step_backend: str, plan: StepPlan, latents: torch.Tensor,
                 cond: Conditioning, g: float, rescale: float, generator: torch.Generator | None):
        dev, dtype = latents.device, latents.dtype
        self.runner, self.plan, self.cond, self.g, self.rescale, self.generator = (
            runner, plan, cond, g, rescale, generator)
        self.step_backend = resolve(step_backend, latents).name
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
        out = self.runner(self.model_in, t, cond.encoder_hidden_states, cond.class_labels, **cond.model_kwargs)
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


def run_loop(runner: ModelRunner, step_backend: str, plan: StepPlan, latents: torch.Tensor, cond: Conditioning,
             g: float, guidance_rescale: float, generator: torch.Generator | None, progress: bool,
             cuda_graph: bool = False) -> torch.Tensor:
    """The denoising loop on prepared inputs (``latents``: unit-variance noise); returns the final sample
    (B, C, H, W). Raises :class:`~fastdiff.errors.NonFiniteError` if any step produced a NaN / Inf."""
    state = LoopState(runner, step_backend, plan, latents, cond, g, guidance_rescale, generator)
    if cuda_graph:
        _run_graphed(state, progress)
    else:
        for i in tqdm(range(plan.num_steps), disable=not progress, desc="sampling", leave=False):
            state.step(i)
    check_finite(state.flag, plan.num_steps, latents.dtype)
    return state.x


def check_finite(flag: torch.Tensor, num_steps: int, dtype: torch.dtype) -> None:
    """Raise :class:`NonFiniteError` naming the first step whose fused step flagged a non-finite value."""
    bad = torch.nonzero(flag).flatten()  # the one host sync of the loop, after the last step
    if bad.numel():
        raise NonFiniteError(int(bad[0]) + 1, num_steps, str(dtype).replace("torch.", ""))


# ----- the CUDA-graph path ------------------------------------------------------------------------------------------
_GRAPH_BUFFERS = ("x", "model_in", "hist", "saved", "flag", "counter")


def _snapshot(state: LoopState) -> dict:
    return {n: getattr(state, n).clone() for n in _GRAPH_BUFFERS if getattr(state, n) is not None}


def _restore(state: LoopState, snap: dict) -> None:
    for name, value in snap.items():
        getattr(state, name).copy_(value)


def _run_graphed(state: LoopState, progress: bool, warmup: int = 2) -> None:
    """Run ``state``'s loop as one captured step replayed ``num_steps`` times."""
    state.draw_all_noise()
    snap = _snapshot(state)
    side = torch.cuda.Stream(device=state.x.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, autotuning, cuDNN plans
        for _ in range(warmup):
            state.step(None)
    torch.cuda.current_stream().wait_stream(side)
    _restore(state, snap)  # the warm-up steps advanced the buffers and the counter: start again from step 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        state.step(None)
    _restore(state, snap)  # capture records, it does not run; restore anyway in case an op ran eagerly
    for _ in tqdm(range(state.plan.num_steps), disable=not progress, desc="sampling (graph)", leave=False):
        graph.replay()
