"""The whole sampling loop when the model costs (almost) nothing: what fastdiff adds per step against a diffusers
pipeline's loop, and the host time of fastdiff's eager step.

Setting: a real ``UNet2DConditionModel`` (small, sample size 128) whose ``forward`` is replaced by a cheap function
(``0.5 * sample``, the same for every provider), SDXL-size latents x 4 images (4x4x128x128), fp32, DPM-Solver++ 2M
(diffusers' default ``DPMSolverMultistepScheduler`` config), CFG 7.5, 20 steps, one seeded CPU generator.

- ``test_loop``: providers ``diffusers`` (a pipeline's loop: ``torch.cat([latents] * 2)``, ``scale_model_input``,
  the UNet, ``chunk`` + CFG, ``scheduler.step``), ``fastdiff`` (``fastdiff.Sampler``, ``auto``: the cpp step when
  built), ``fastdiff-torch-fast`` (the PyTorch step ``auto`` falls to without a compiled module) and
  ``fastdiff-torch`` (the reference, for information). Rounds are interleaved (every provider once per round, the
  order rotating); each provider's median goes to the ratio table. ``max_abs_diff``: final latents against the
  diffusers loop's.
- ``test_host_per_step``: the same fastdiff loop with a no-op model (``forward`` returns a preallocated tensor) and a
  no-op step launcher: what remains is the loop's own per-step host time (everything but the kernel and the model).

    FASTDIFF_BENCH_SAVE=1 pytest benches/bench_loop.py --benchmark-only -p no:cacheprovider -s   # ~1 min on 2 cores
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import fastdiff
from fastdiff.ops import availability

B, C, SIZE, STEPS, G = 4, 4, 128, 20, 7.5
ROUNDS = 15
PROVIDERS = ["diffusers", "fastdiff", "fastdiff-torch-fast", "fastdiff-torch"]
LATENT = (B, C, SIZE, SIZE)


def make_unet(forward):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval().requires_grad_(False)
    unet.forward = forward
    return unet


def cheap_forward(sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
    out = 0.5 * sample
    return (out,) if not return_dict else {"sample": out}


def conditioning():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 8, 32, generator=g), torch.randn(B, 8, 32, generator=g)


def diffusers_loop(unet, scheduler, emb, neg, seed):
    """A diffusers pipeline's denoising loop (StableDiffusionPipeline.__call__), latents drawn as it draws them."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(STEPS)
    latents = randn_tensor(LATENT, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    prompt_embeds = torch.cat([neg, emb])
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + G * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
    return latents


def fastdiff_loop(sampler, emb, neg, seed):
    return sampler.sample(STEPS, G, encoder_hidden_states=emb, negative_encoder_hidden_states=neg, height=SIZE,
                          width=SIZE, generator=torch.Generator().manual_seed(seed), output_type="latent",
                          progress=False)


def interleaved(runs: dict, rounds: int) -> dict:
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _record(benchmark, suite, case, times, **extra_by_provider):
    from benches.conftest import RESULTS, environment

    for k, ts in times.items():
        median = statistics.median(ts)
        extra = dict(threads=torch.get_num_threads(), per_step_us=median / STEPS * 1e6, min_s=min(ts), max_s=max(ts))
        extra.update(extra_by_provider.get(k, {}))
        benchmark.extra_info[k] = extra
        RESULTS[(suite, case)][k] = (median, extra)
    benchmark.extra_info.update(environment())


def test_loop(benchmark):
    from diffusers import DPMSolverMultistepScheduler

    unet = make_unet(cheap_forward)
    emb, neg = conditioning()
    scheduler = DPMSolverMultistepScheduler()
    runs = {"diffusers": lambda: diffusers_loop(unet, scheduler, emb, neg, 0)}
    for name in PROVIDERS[1:]:
        backend = name.removeprefix("fastdiff").removeprefix("-") or "auto"
        sampler = fastdiff.Sampler(unet, scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config),
                                   backend=backend)
        runs[name] = lambda s=sampler: fastdiff_loop(s, emb, neg, 0)
    reference = runs["diffusers"]()
    extra = {k: {"max_abs_diff": float((run() - reference).abs().max())} for k, run in runs.items()}  # warm-up
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timing is the interleaved rounds below
    times = interleaved(runs, ROUNDS)
    _record(benchmark, "loop", f"{B}x{C}x{SIZE}x{SIZE} fp32, DPM++ 2M {STEPS} steps, CFG {G}, 0.5*sample model",
            times, **extra)


def _noop_launch(*args, **kwargs):
    return None


@pytest.mark.skipif(bool(availability("cpu")["cpp"]), reason="the C++ extension is not built")
def test_host_per_step(benchmark):
    """Per-step host time of the eager loop: ``LoopState.step`` (what ``run_loop`` calls per step) with a no-op
    model (``forward`` returns a preallocated tensor; the runner and ``nn.Module.__call__`` stay) and a no-op
    launcher. For context, the same steps with the real cpp launcher, and with the cheap model and the cpp launcher
    (the per-step cost of ``test_loop``'s fastdiff provider without its per-call setup)."""
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.loop import LoopState
    from fastdiff.sample_inputs import prepare_conditioning

    out = torch.zeros((2 * B, C, SIZE, SIZE))
    emb, neg = conditioning()
    latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    states = {}
    for name, forward, launch in (("no-op model + no-op launcher", None, _noop_launch),
                                  ("no-op model + cpp step", None, None),
                                  ("0.5*sample model + cpp step", cheap_forward, None)):
        unet = make_unet(forward or (lambda sample, timestep, encoder_hidden_states=None, return_dict=True, **kw:
                                     (out,)))
        sampler = fastdiff.Sampler(unet, scheduler=DPMSolverMultistepScheduler(), backend="cpp")
        cond = prepare_conditioning(sampler.runner, None, G, emb, neg, None, 1, None)
        state = LoopState(sampler.runner, "cpp", sampler.plan(STEPS), latents, cond, G, 0.0, None)
        if launch is not None:
            state.launch = launch
        states[name] = state

    def steps(state):
        with torch.no_grad():
            for i in range(STEPS):
                state.step(i)

    runs = {name: (lambda st=st: steps(st)) for name, st in states.items()}
    for run in runs.values():
        run()  # the first step checks the arguments (once per loop)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timing is the interleaved rounds below
    times = interleaved(runs, 60)
    host = statistics.median(times["no-op model + no-op launcher"]) / STEPS * 1e6
    print(f"\nper-step host time of the eager loop (no-op model and launcher): {host:.1f} us")
    _record(benchmark, "host", f"{B}x{C}x{SIZE}x{SIZE} fp32, DPM++ 2M, LoopState.step x {STEPS}", times)
