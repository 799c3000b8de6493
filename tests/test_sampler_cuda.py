"""GPU-only sampler checks: no host sync per step, CUDA-graph replay equals eager bit for bit, torch.compile."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

import fastdiff
from fastdiff.loop import LoopState
from fastdiff.ops import availability, fused_step
from fastdiff.sample_inputs import prepare_conditioning

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, C, H, W, L, D = 2, 4, 16, 16, 7, 32


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, attention_head_dim=8, norm_num_groups=8,
    ).eval().to("cuda")


def step_backends():
    return [b for b in ("torch", "cuda", "triton") if not availability("cuda")[b]]


@pytest.mark.parametrize("gen_device", ["cuda", "cpu"])
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a", "unipc", "ddpm"])
@pytest.mark.parametrize("backend", step_backends() + ["torch-fast"])
def test_loop_makes_no_host_sync(unet, scheduler, backend, gen_device):
    """Also with a CPU generator: its noise is drawn into pinned memory and copied asynchronously."""
    sampler = fastdiff.Sampler(unet, scheduler=scheduler, backend=backend)
    emb = torch.randn(B, L, D, device="cuda")
    cond = prepare_conditioning(sampler.runner, None, 5.0, emb, None, None, 1, None)
    latents = torch.randn(B, C, H, W, device="cuda")
    gen = torch.Generator(gen_device).manual_seed(0)
    state = LoopState(sampler.runner, sampler.step_backend, sampler.plan(6), latents, cond, 5.0, 0.0, gen)
    state.step(0)  # first call: lazy inits (cuBLAS handles, Triton compile) may sync; they are not per-step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 6):
            state.step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.x).all()


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a", "unipc", "lcm"])
@pytest.mark.parametrize("backend", step_backends())
def test_graph_replay_equals_eager_bitwise(unet, scheduler, backend):
    emb = torch.randn(B, L, D, device="cuda")
    latents = torch.randn(B, C, H, W, device="cuda")
    kw = dict(num_inference_steps=4 if scheduler == "lcm" else 8, guidance_scale=4.0, encoder_hidden_states=emb,
              latents=latents, output_type="latent", progress=False)
    eager = fastdiff.Sampler(unet, scheduler=scheduler, backend=backend).sample(
        generator=torch.Generator("cuda").manual_seed(3), **kw)
    graphed = fastdiff.Sampler(unet, scheduler=scheduler, backend=backend, cuda_graph=True).sample(
        generator=torch.Generator("cuda").manual_seed(3), **kw)
    assert torch.equal(eager, graphed), f"max diff {(eager - graphed).abs().max().item()}"


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_graph_is_captured_once_per_sampler(unet, num_steps):
    """A second call (another seed, other latents and embeddings of the same shapes) replays the cached graph and
    returns what the eager loop returns; a one-step plan warms up one step only (two would index past its table)."""
    graphed = fastdiff.Sampler(unet, scheduler="euler_a", cuda_graph=True)
    eager = fastdiff.Sampler(unet, scheduler="euler_a")
    for seed in (1, 2):
        kw = dict(num_inference_steps=num_steps, guidance_scale=4.0, encoder_hidden_states=torch.randn(B, L, D,
                  device="cuda"), latents=torch.randn(B, C, H, W, device="cuda"), output_type="latent",
                  progress=False)
        got = graphed.sample(generator=torch.Generator("cuda").manual_seed(seed), **kw)
        want = eager.sample(generator=torch.Generator("cuda").manual_seed(seed), **kw)
        assert graphed.graph_cache.captures == 1
        assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize("backend", step_backends())
def test_backends_agree_on_gpu(unet, backend):
    emb = torch.randn(B, L, D, device="cuda")
    latents = torch.randn(B, C, H, W, device="cuda")
    kw = dict(num_inference_steps=10, guidance_scale=4.0, encoder_hidden_states=emb, latents=latents,
              output_type="latent", progress=False)
    ref = fastdiff.sample(unet, scheduler="unipc", backend="torch", **kw)
    ours = fastdiff.sample(unet, scheduler="unipc", backend=backend, **kw)
    if backend == "triton":
        # The reference's operations in its order (tests/kernels/test_step_triton.py::test_bit_for_bit): the same
        # bits. Anything less is amplified here: TF32 convolutions turn a one-ulp change of the UNet's input into
        # a 1e-3 one, and a one-ulp step difference once ended this loop 0.099 away.
        assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max().item()}"
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", step_backends())
def test_torch_compile_loop_calls_the_op(backend):
    plan = fastdiff.get_scheduler("dpmpp_2m").plan(5)
    table = plan.device_table("cuda")
    x0 = torch.randn(B, C, H, W, device="cuda")
    outs = torch.randn(5, 2 * B, C, H, W, device="cuda")

    def loop(x, hist):
        for i in range(5):
            x = fused_step(outs[i], x, table[i], guidance_scale=3.0, cfg=True, hist=hist, backend=backend)
        return x

    ref = loop(x0.clone(), torch.zeros(3, B, C, H, W, device="cuda"))
    got = torch.compile(loop, fullgraph=False)(x0.clone(), torch.zeros(3, B, C, H, W, device="cuda"))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_non_finite_in_graph_mode(unet):
    class NaNModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, sample, t, encoder_hidden_states=None, return_dict=False):
            out = self.inner(sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            return (out / (t.view(-1, 1, 1, 1) > 500).float(),)  # inf once t drops to 500 or below

    s = fastdiff.Sampler(NaNModel(unet), scheduler="ddim", cuda_graph=True)
    with pytest.raises(fastdiff.errors.NonFiniteError, match="at step"):
        s.sample(num_inference_steps=4, encoder_hidden_states=torch.randn(1, L, D, device="cuda"), progress=False)
