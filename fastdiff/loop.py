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

import dataclasses
import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from fastdiff.backends.base import ModelRunner
from fastdiff.backends.registry import MODEL_BACKENDS
from fastdiff.errors import InvalidInput, NonFiniteError, UnknownBackend
from fastdiff.ops import BACKENDS as STEP_BACKENDS
from fastdiff.ops import resolve
from fastdiff.ops.guidance import guidance_rescale_factors, step_threshold_limits
from fastdiff.ops.step import check_step_args
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


def draw_noise(shape: tuple, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise, the numbers diffusers' ``randn_tensor`` draws. With a CPU generator and a CUDA target,
    ``randn_tensor`` draws on the CPU and copies from pageable memory, which blocks the host until the GPU has
    caught up (one sync per ancestral step); here the draw goes into pinned memory (torch's caching host allocator
    reuses a block only after its copy is done) and the copy is asynchronous."""
    gens = generator if isinstance(generator, list) else [generator]
    if device.type != "cuda" or gens[0] is None or gens[0].device.type != "cpu":
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    host = torch.empty(shape, dtype=dtype, pin_memory=True)
    randn_into(host, generator)
    return host.to(device, non_blocking=True)


def randn_into(out: torch.Tensor, generator) -> torch.Tensor:
    """Fill the CPU tensor ``out`` with what ``randn_tensor(out.shape, generator=generator)`` returns: one draw, or
    one per sample from a list of generators."""
    if isinstance(generator, list) and len(generator) > 1:
        for i, g in enumerate(generator):
            torch.randn(out[i:i + 1].shape, generator=g, dtype=out.dtype, out=out[i:i + 1])
    else:
        g = generator[0] if isinstance(generator, list) else generator
        torch.randn(out.shape, generator=g, dtype=out.dtype, out=out)
    return out


class LoopState:
    """The device buffers of one sampling loop and one step of it. ``step(i)`` with a Python ``i`` is the eager
    path; ``step(None)`` selects the coefficient row, timestep and noise on the device from ``counter`` (the
    CUDA-graph path), so the same code is captured once and replayed for every step.

    The step backend is resolved and its arguments validated once per loop, not per step: the eager step calls the
    launcher directly. Through ``fastdiff.ops.fused_step`` every step paid ``registry.resolve`` (5 us) and the
    validation (37 us, SDXL-size x4 fp32 with CFG and history, 2-core CPU); the loop's own host time is now ~9 us
    per step (benches/bench_loop.py). The loop's buffers are its own and contiguous; the model's output is checked
    on the first step and made contiguous when a model returns a view.

    :meth:`reset` refills the buffers in place for another call with the same shapes (the graph cache reuses a
    captured state that way). ``graph=True``: the step will be captured, so a backend that reads the row on the
    host (``torch-fast``) is replaced by the reference, which reads it on the device."""

    def __init__(self, runner: ModelRunner, step_backend: str, plan: StepPlan, latents: torch.Tensor,
                 cond: Conditioning, g: float, rescale: float, generator: torch.Generator | None, *,
                 graph: bool = False):
        self.runner, self.g, self.rescale = runner, g, rescale
        entry = resolve(step_backend, latents)
        if graph and entry.host_coef:
            entry = STEP_BACKENDS["torch"]
        self.step_backend, self.launch, self.host_coef = entry.name, entry.launch_fn(), entry.host_coef
        self.x = self.model_in = self.hist = self.saved = self.flag = self.counter = None
        self.table = self.timesteps = self.noise_all = self.noise_index = None
        self.cond = cond
        self.reset(plan, latents, cond, generator)

    def _fill(self, name: str, value: torch.Tensor) -> None:
        """The buffer ``name`` gets ``value``: allocated on the first call, copied into afterwards (static)."""
        buf = getattr(self, name)
        if buf is None:
            setattr(self, name, value.contiguous())
        else:
            buf.copy_(value)

    def reset(self, plan: StepPlan, latents: torch.Tensor, cond: Conditioning,
              generator: torch.Generator | None) -> None:
        """Start (again) from ``latents`` with ``plan``'s coefficients and ``cond``, in the same buffers."""
        dev = latents.device
        self.plan, self.generator, self.num_steps = plan, generator, plan.num_steps
        if cond is not self.cond:
            copy_cond(self.cond, cond)
        self._fill("table", plan.device_table(dev))
        self._fill("timesteps", plan.device_timesteps(dev))
        x = latents * plan.init_noise_sigma
        self._fill("x", x)
        self._fill("model_in", torch.cat([x] * (2 if cond.cfg else 1)) * plan.input_scale0)
        if plan.hist_slots:
            self._fill("hist", torch.zeros((HIST_SLOTS,) + tuple(x.shape), dtype=x.dtype, device=dev))
        if plan.uses_saved:
            self._fill("saved", torch.zeros_like(x))
        self._fill("flag", torch.zeros(plan.num_steps, dtype=torch.int32, device=dev))
        self._fill("counter", torch.zeros(1, dtype=torch.long, device=dev))
        # Per-step views and host numbers, made once here rather than in every step (each view costs ~1-2 us).
        n = self.model_in.shape[0]
        self.noise_steps = plan.noise_steps().tolist()
        self.rows = self.table.unbind(0)
        self.ts = [t.expand(n) for t in self.timesteps.unbind(0)]
        self.host_rows = plan.coefs.tolist() if self.host_coef else None
        self.checked = False

    def draw_all_noise(self) -> None:
        """Draw every step's noise up front, in the eager loop's order (graph replay is then bit-exact)."""
        steps = [i for i in range(self.plan.num_steps) if self.noise_steps[i]]
        if not steps:
            return
        x = self.x
        self._fill("noise_all", torch.stack(
            [draw_noise(tuple(x.shape), self.generator, x.device, x.dtype) for _ in steps]))
        index = torch.zeros(self.plan.num_steps, dtype=torch.long)
        index[steps] = torch.arange(len(steps))
        self._fill("noise_index", index.to(x.device))

    def _check(self, out: torch.Tensor, row, noise, m_scale, x0_limit) -> None:
        """Once per loop, on the first model output: what ``fused_step`` checks on every call."""
        x = self.x
        if out.shape[1] != x.shape[1]:
            raise InvalidInput(
                f"the model returns {out.shape[1]} channels for a {x.shape[1]}-channel sample (a learned-variance "
                "model?); fastdiff samplers need a model whose output has the sample's channels"
            )
        check_step_args(out, x, row, x, self.cond.cfg, self.hist, self.saved, noise, self.model_in, m_scale,
                        x0_limit, self.flag)
        if not math.isfinite(self.g):
            raise InvalidInput(f"guidance_scale must be finite, got {self.g}")
        for t in (x, self.model_in, self.hist, self.saved, self.flag, row):
            assert t is None or t.is_contiguous()  # the launchers walk raw addresses; _fill made them so
        self.checked = True

    def step(self, i: int | None) -> None:
        x, plan, cond = self.x, self.plan, self.cond
        host = None
        if i is None:
            row = self.table.index_select(0, self.counter).squeeze(0)
            t = self.timesteps.index_select(0, self.counter).expand(self.model_in.shape[0])
            noise = None
            if self.noise_all is not None:
                noise = self.noise_all.index_select(0, self.noise_index.index_select(0, self.counter)).squeeze(0)
            last = False
        else:
            row, t = self.rows[i], self.ts[i]
            noise = draw_noise(x.shape, self.generator, x.device, x.dtype) if self.noise_steps[i] else None
            last = i + 1 == self.num_steps
            if self.host_rows is not None:
                host = self.host_rows[i]
        out = self.runner(self.model_in, t, cond.encoder_hidden_states, cond.class_labels, **cond.model_kwargs)
        if not out.is_contiguous():  # e.g. a channels_last model
            out = out.contiguous()
        m_scale = None
        if cond.cfg and self.rescale > 0:
            m_scale = guidance_rescale_factors(out, cond.batch, self.g, self.rescale)
        x0_limit = None
        if plan.thresholding is not None:
            x0_limit = step_threshold_limits(out, x, row, cond.batch, self.g, cond.cfg, m_scale, plan.thresholding)
        if not self.checked:
            self._check(out, row, noise, m_scale, x0_limit)
        args = (out, x, row, x, self.g, cond.cfg, self.hist, self.saved, noise, None if last else self.model_in,
                m_scale, plan.clip_range, x0_limit, self.flag)
        if host is None:
            self.launch(*args)
        else:
            self.launch(*args, host_coef=host)
        if i is None:
            self.counter += 1


def copy_cond(dst: Conditioning, src: Conditioning) -> None:
    """Copy ``src``'s tensors into ``dst``'s (same structure: the graph cache's key says so)."""
    for a, b in zip(_tensors(dst), _tensors(src), strict=True):
        a.copy_(b)


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Conditioning):
        obj = [obj.encoder_hidden_states, obj.class_labels, obj.model_kwargs]
    if isinstance(obj, dict):
        obj = [obj[k] for k in sorted(obj)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _signature(obj):
    """What a captured graph depends on in ``obj``: tensors by shape, dtype and device, other values by value."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, Conditioning):
        obj = (obj.batch, obj.cfg, obj.encoder_hidden_states, obj.class_labels, obj.model_kwargs)
    if isinstance(obj, dict):
        return tuple((k, _signature(obj[k])) for k in sorted(obj))
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(v) for v in obj)
    try:
        hash(obj)
        return obj
    except TypeError:
        return repr(obj)


def _clone_cond(cond: Conditioning) -> Conditioning:
    """``cond`` with its own tensors: a cached graph reads them by address, and later calls copy into them (never
    into the caller's tensors)."""
    def clone(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {k: clone(w) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(clone(w) for w in v)
        return v

    return dataclasses.replace(cond, encoder_hidden_states=clone(cond.encoder_hidden_states),
                               class_labels=clone(cond.class_labels), model_kwargs=clone(cond.model_kwargs))


def run_loop(runner: ModelRunner, step_backend: str, plan: StepPlan, latents: torch.Tensor, cond: Conditioning,
             g: float, guidance_rescale: float, generator: torch.Generator | None, progress: bool,
             cuda_graph: bool = False, graph_cache: GraphCache | None = None) -> torch.Tensor:
    """The denoising loop on prepared inputs (``latents``: unit-variance noise); returns the final sample
    (B, C, H, W). Raises :class:`~fastdiff.errors.NonFiniteError` if any step produced a NaN / Inf.

    With ``cuda_graph``, the captured step is kept in ``graph_cache`` (the sampler's, so a later call with the same
    shapes and settings replays it without capturing again; a fresh cache when None)."""
    if cuda_graph:
        state = _run_graphed(graph_cache or GraphCache(), runner, step_backend, plan, latents, cond, g,
                             guidance_rescale, generator, progress)
        check_finite(state.flag, plan.num_steps, latents.dtype)
        return state.x.clone()  # the cached state's buffer is overwritten by the next call
    state = LoopState(runner, step_backend, plan, latents, cond, g, guidance_rescale, generator)
    # tqdm(disable=True) still costs ~20 us per loop to build: only build it when it shows something
    steps = tqdm(range(plan.num_steps), desc="sampling", leave=False) if progress else range(plan.num_steps)
    for i in steps:
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
WARMUP_STEPS = 2  # eager steps before capture: lazy inits, autotuning, cuDNN plans (capped at the plan's length)


class CudaGraphs:
    """How the loop warms up, captures and replays: ``torch.cuda.CUDAGraph`` on a side stream. Tests put an object
    with the same two methods in a :class:`GraphCache` to run the caching logic on CPU tensors."""

    def warm_up(self, fn, n: int, device: torch.device) -> None:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(n):
                fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn, device: torch.device):
        """Record ``fn`` (not run it); returns the replay function."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


class GraphCache:
    """Captured loop steps of one sampler, keyed by everything the captured step depends on: shapes, dtype, device,
    CFG, the conditioning's structure, guidance values, clamp kind, which buffers exist, the step backend and the
    plan's length. A capture costs two warm-up steps and the capture itself (5 % of a 50-step call, 50-75 % of a
    4-step one); a hit refills the static buffers (latents, tables, noise, conditioning) and replays.
    Keeps the ``size`` most recent entries (each holds its graph's memory pool)."""

    def __init__(self, graphs=None, size: int = 4):
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.size, self.entries, self.captures = size, {}, 0

    def get(self, key):
        hit = self.entries.pop(key, None)
        if hit is not None:
            self.entries[key] = hit  # most recent last
        return hit

    def put(self, key, value) -> None:
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))
        self.captures += 1


def _snapshot(state: LoopState) -> dict:
    return {n: getattr(state, n).clone() for n in _GRAPH_BUFFERS if getattr(state, n) is not None}


def _restore(state: LoopState, snap: dict) -> None:
    for name, value in snap.items():
        getattr(state, name).copy_(value)


def warm_up(state: LoopState, graphs, warmup: int = WARMUP_STEPS) -> int:
    """Run ``min(warmup, num_steps)`` device-indexed steps and put the buffers back as they were; returns how many
    ran. More steps than the plan has would index the tables past their last row (a device assert that kills the
    CUDA context on a GPU; an IndexError on CPU)."""
    snap = _snapshot(state)
    n = min(warmup, state.plan.num_steps)
    graphs.warm_up(lambda: state.step(None), n, state.x.device)
    _restore(state, snap)  # the warm-up steps advanced the buffers and the counter: start again from step 0
    return n


def _run_graphed(cache: GraphCache, runner: ModelRunner, step_backend: str, plan: StepPlan, latents: torch.Tensor,
                 cond: Conditioning, g: float, rescale: float, generator, progress: bool) -> LoopState:
    """Run the loop as one captured step replayed ``num_steps`` times; capture only on a cache miss."""
    entry = resolve(step_backend, latents)
    # the network by identity (a pipeline sampler wraps pipe.unet in a new runner per call); the cached state keeps
    # it alive, so its id is not reused while the entry exists
    key = (id(getattr(runner, "unet", runner)), tuple(latents.shape), latents.dtype, latents.device, entry.name,
           plan.num_steps, plan.hist_slots, plan.uses_saved, int(plan.noise_steps().sum()), plan.clip_range,
           plan.thresholding, float(g), float(rescale), _signature(cond))
    hit = cache.get(key)
    if hit is None:
        state = LoopState(runner, step_backend, plan, latents, _clone_cond(cond), g, rescale, generator, graph=True)
        state.draw_all_noise()
        warm_up(state, cache.graphs)
        snap = _snapshot(state)
        replay = cache.graphs.capture(lambda: state.step(None), state.x.device)
        _restore(state, snap)  # capture records, it does not run; restore anyway in case an op ran eagerly
        cache.put(key, (state, replay))
    else:
        state, replay = hit
        state.reset(plan, latents, cond, generator)
        state.draw_all_noise()
    steps = range(plan.num_steps)
    for _ in tqdm(steps, desc="sampling (graph)", leave=False) if progress else steps:
        replay()
    return state
