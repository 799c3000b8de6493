"""``compile=True`` (:mod:`fastdiff.compiled`): the same images as eager, compiled once per input shape, and a
warned eager fallback wherever compilation cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel

import fastdiff
from fastdiff import compiled as compiled_module
from fastdiff.backends.base import ModelRunner, TorchRunner
from fastdiff.compiled import CompiledRunner, CompileWarning
from tests.tolerances import rel_err

C, H, L, D = 4, 8, 5, 32
KW = dict(num_inference_steps=3, guidance_scale=4.0, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=H, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def _inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(batch, C, H, H, generator=gen), encoder_hidden_states=torch.randn(batch, L, D,
                                                                                                       generator=gen))


def test_compiled_sampler_gives_the_eager_images(unet):
    """The real torch.compile (inductor, frozen weights, channels-last): one compile, the same images."""
    try:
        import torch._inductor  # noqa: F401
    except ImportError:
        pytest.skip("no inductor in this PyTorch")
    eager = fastdiff.Sampler(unet, scheduler="dpmpp_2m", backend="torch").sample(**_inputs(), **KW)
    sampler = fastdiff.Sampler(unet, scheduler="dpmpp_2m", backend="torch", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # a fallback would pass the equality test: fail on it
        ours = sampler.sample(**_inputs(), **KW)
    assert sampler.runner.compiled and sampler.compile_seconds > 0
    assert rel_err(ours, eager) <= 1e-3, f"rel err {rel_err(ours, eager):.2e}"
    first = sampler.compile_seconds
    again = sampler.sample(**_inputs(seed=1), **KW)  # same shapes: no new compile
    assert sampler.compile_seconds == first
    assert rel_err(again, fastdiff.sample(unet, scheduler="dpmpp_2m", backend="torch", **_inputs(seed=1),
                                          **KW)) <= 1e-3


@pytest.fixture
def traced(monkeypatch):
    """torch.compile replaced by a recorder that runs the traced function as it is (fast); returns the calls."""
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_one_compile_per_shape_and_the_bound(unet, traced, monkeypatch):
    monkeypatch.setattr(compiled_module, "MAX_SHAPES", 2)
    sampler = fastdiff.Sampler(unet, scheduler="ddim", backend="torch", compile=True)
    assert traced == [{"dynamic": False, "options": {"freezing": True}}]
    runner = sampler.runner
    for batch in (1, 2, 1):
        sampler.sample(**_inputs(batch), **KW)
    assert len(runner._signatures) == 2
    with pytest.warns(CompileWarning, match="more than 2 input shapes"):
        out = sampler.sample(**_inputs(3), **KW)
    assert len(runner._signatures) == 2 and out.shape[0] == 3


def test_compile_failure_falls_back_once_with_the_reason(unet, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    eager = fastdiff.sample(unet, scheduler="dpmpp_2m", backend="torch", **_inputs(), **KW)
    sampler = fastdiff.Sampler(unet, scheduler="dpmpp_2m", backend="torch", compile=True)
    with pytest.warns(CompileWarning, match="RuntimeError: no C\\+\\+ compiler found"):
        ours = sampler.sample(**_inputs(), **KW)
    torch.testing.assert_close(ours, eager)
    assert not sampler.runner.compiled and sampler.compile_seconds == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # once: later calls run eagerly without a new warning
        torch.testing.assert_close(sampler.sample(**_inputs(), **KW), eager)


def test_input_errors_are_not_taken_for_compile_failures(unet, traced):
    runner = CompiledRunner(TorchRunner(unet))
    with pytest.raises(Exception):  # noqa: B017 -- whatever the UNet raises for a wrong channel count
        runner(torch.randn(1, C + 1, H, H), torch.ones(1), torch.randn(1, L, D))
    assert runner.compiled


def test_a_runner_that_is_not_pytorch_runs_as_it_is():
    class Doubler(ModelRunner):
        name = "doubler"

        def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **kw):
            return 2 * sample

    with pytest.warns(CompileWarning, match="doubler runner is not a PyTorch module"):
        runner = CompiledRunner(Doubler())
    x = torch.ones(1, 4, 2, 2)
    torch.testing.assert_close(runner(x, torch.ones(1)), 2 * x)
    assert not runner.compiled


def test_compile_on_a_pipeline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("fastdiff.sampler.is_diffusers_pipeline", lambda model: True)
    with pytest.raises(fastdiff.errors.InvalidInput, match="compile=True is not supported for diffusers pipelines"):
        fastdiff.Sampler(object(), compile=True)
