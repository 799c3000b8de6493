"""The denoising loop (:mod:`fastdiff.loop`) on CPU tensors: the CUDA-graph path's warm-up and graph cache driven by a
fake graph object (capture records the step, replay runs it), the noise draw a CPU generator feeds, and the eager
loop's once-per-loop checks. The real CUDA graphs are in tests/test_sampler_cuda.py."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff.errors import InvalidInput
from fastdiff.loop import GraphCache, LoopState, draw_noise, randn_into, run_loop, warm_up
from fastdiff.sample_inputs import Conditioning
from fastdiff.schedulers import get_scheduler

B, C, H, W, L, D = 2, 4, 6, 5, 3, 8


class Runner:
    """A cheap model whose output depends on the sample, the timestep and the conditioning."""

    def __init__(self, layout=torch.contiguous_format):
        self.layout, self.calls = layout, 0

    def __call__(self, sample, t, ehs, labels, **kw):
        self.calls += 1
        out = 0.3 * sample + 1e-3 * t.view(-1, 1, 1, 1) + ehs.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return out.contiguous(memory_format=self.layout)


class FakeGraphs:
    """Stands in for CUDA graphs: warm-up runs the step, capture records it, replay calls it."""

    def __init__(self):
        self.recorded = []

    def warm_up(self, fn, n, device):
        for _ in range(n):
            fn()

    def capture(self, fn, device):
        self.recorded.append(fn)
        return fn


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(2 * B, L, D, generator=g)
    return torch.randn(B, C, H, W, generator=g), Conditioning(batch=B, cfg=True, encoder_hidden_states=emb,
                                                              class_labels=None)


@pytest.mark.parametrize("num_steps", [1, 2, 3])
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_warm_up_indexes_only_the_plans_steps(num_steps, scheduler):
    """Two warm-up steps on a one-step plan indexed the tables at row 1 (a device assert on a GPU); CPU
    index_select raises IndexError, so this fails without the cap."""
    latents, cond = inputs(0)
    plan = get_scheduler(scheduler).plan(num_steps)
    state = LoopState(Runner(), "torch", plan, latents, cond, 4.0, 0.0, torch.Generator().manual_seed(1), graph=True)
    state.draw_all_noise()
    x0 = state.x.clone()
    assert warm_up(state, FakeGraphs()) == min(2, num_steps)
    assert int(state.counter) == 0 and torch.equal(state.x, x0) and not state.flag.any()


@pytest.mark.parametrize("backend", ["torch", "auto", "torch-fast"])
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m", "unipc"])
def test_graph_cache_replays_without_capturing_again(backend, scheduler):
    cache, runner = GraphCache(FakeGraphs()), Runner()
    plan = get_scheduler(scheduler).plan(4)
    for seed in (1, 2, 3):
        latents, cond = inputs(seed)
        emb = cond.encoder_hidden_states.clone()
        graphed = run_loop(runner, backend, plan, latents, cond, 4.0, 0.0, torch.Generator().manual_seed(seed),
                           progress=False, cuda_graph=True, graph_cache=cache)
        eager = run_loop(runner, backend, plan, latents, cond, 4.0, 0.0, torch.Generator().manual_seed(seed),
                         progress=False)
        assert cache.captures == 1 and len(cache.graphs.recorded) == 1
        assert torch.equal(cond.encoder_hidden_states, emb)  # the caller's tensors are copied from, never into
        if backend == "torch-fast":  # a graph replays the reference (the fast step reads its row on the host)
            torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)  # 4 steps of fp32 rounding apart
        else:
            assert torch.equal(graphed, eager), (graphed - eager).abs().max()
    latents, cond = inputs(4)
    run_loop(runner, backend, plan, latents, cond, 5.0, 0.0, None, progress=False, cuda_graph=True,
             graph_cache=cache)  # another guidance scale is baked into the step: a new capture
    run_loop(runner, backend, get_scheduler(scheduler).plan(5), latents, cond, 4.0, 0.0, None, progress=False,
             cuda_graph=True, graph_cache=cache)
    assert cache.captures == 3


def test_graph_cache_keeps_the_most_recent_entries():
    cache, runner = GraphCache(FakeGraphs(), size=2), Runner()
    latents, cond = inputs(0)
    for n in (2, 3, 4, 2):
        run_loop(runner, "torch", get_scheduler("ddim").plan(n), latents, cond, 4.0, 0.0, None, progress=False,
                 cuda_graph=True, graph_cache=cache)
    assert cache.captures == 4 and len(cache.entries) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_gens", [0, 1, 3])
def test_noise_draw_equals_randn_tensor(dtype, n_gens):
    """The pinned-memory draw (a CPU generator feeding CUDA tensors) fills the numbers diffusers' randn_tensor
    draws, one generator or one per sample."""
    shape = (3, 4, 5, 6)

    def gens():
        if n_gens == 0:
            return torch.Generator().manual_seed(7)
        return [torch.Generator().manual_seed(7 + i) for i in range(n_gens)]  # a list of one acts as one

    want = randn_tensor(shape, generator=gens(), device=torch.device("cpu"), dtype=dtype)
    assert torch.equal(randn_into(torch.empty(shape, dtype=dtype), gens()), want)
    assert torch.equal(draw_noise(shape, gens(), torch.device("cpu"), dtype), want)


def test_eager_loop_checks_once_and_takes_views_from_the_model():
    latents, cond = inputs(0)
    plan = get_scheduler("dpmpp_2m").plan(4)
    want = run_loop(Runner(), "auto", plan, latents, cond, 4.0, 0.0, None, progress=False)
    got = run_loop(Runner(torch.channels_last), "auto", plan, latents, cond, 4.0, 0.0, None, progress=False)
    assert torch.equal(got, want)
    fast = run_loop(Runner(), "torch-fast", plan, latents, cond, 4.0, 0.0, None, progress=False)
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-4)

    def bad(sample, t, ehs, labels):
        return torch.zeros(sample.shape[0] + 1, *sample.shape[1:])

    with pytest.raises(InvalidInput, match="model_out must have shape"):
        run_loop(bad, "auto", plan, latents, cond, 4.0, 0.0, None, progress=False)
