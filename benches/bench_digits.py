"""The main job on CPU, end to end: the embedded digits teacher with its defaults (DPM-Solver++ 2M, 20 steps,
CFG 1.5), 10 images (one per digit), as a diffusers user writes the loop vs fastdiff, eager and torch.compile'd.

Providers (same session, same weights, same starting noise, ``output_type="latent"``):

- ``diffusers``: ``DPMSolverMultistepScheduler.from_config(model's scheduler config)`` and the pipeline loop
  (cat the CFG batch, ``scale_model_input``, the network, chunk, guidance, ``scheduler.step``);
- ``diffusers-compile``: the same loop with the UNet ``torch.compile``d (inductor, default mode);
- ``fastdiff``: ``fastdiff.Sampler(model)`` (the fused cpp step, ``auto``);
- ``fastdiff-compile``: the same Sampler over the compiled UNet.

The providers run interleaved: each round runs all four, in an order that rotates from round to round, and each
provider's median over the rounds goes to the ratio table. On this shared 2-core VM separate per-provider runs drifted
by up to 1.5x between runs of the same code; interleaving exposes every provider to the same drift. Compilation
happens in the warm-up round, outside the timed rounds. ``max_abs_diff``: each provider's latents against the eager
diffusers loop's.

    OMP_NUM_THREADS=2 pytest benches/bench_digits.py --benchmark-only -p no:cacheprovider   # ~1-2 min on 2 cores
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

import fastdiff
from benches.helpers import digits_model

IMAGES, STEPS, GUIDANCE = 10, 20, 1.5
LABELS = torch.arange(IMAGES)
PROVIDERS = ["diffusers", "diffusers-compile", "fastdiff", "fastdiff-compile"]
ROUNDS = 10


def diffusers_loop(model, noise: torch.Tensor) -> torch.Tensor:
    """The loop of a diffusers pipeline, over the label-conditioned network (unconditional half second, as the
    network's null label is appended after the labels)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    y = torch.cat([LABELS, torch.full_like(LABELS, model.null_label)])
    with torch.inference_mode():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            cond, uncond = model(inp, t.expand(2 * IMAGES), y).chunk(2)
            x = sched.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def models():
    eager = digits_model()
    compiled = copy.deepcopy(eager)
    compiled.unet = torch.compile(compiled.unet)
    noise = torch.randn(IMAGES, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"eager": eager, "compile": compiled}, noise, diffusers_loop(eager, noise)


def test_main_job(benchmark, models):
    from benches.conftest import RESULTS, environment

    nets, noise, reference = models
    runs = {}
    for provider in PROVIDERS:
        net = nets["compile" if provider.endswith("-compile") else "eager"]
        if provider.startswith("diffusers"):
            runs[provider] = lambda net=net: diffusers_loop(net, noise)
        else:
            sampler = fastdiff.Sampler(net, scheduler="dpmpp_2m")
            runs[provider] = lambda s=sampler: s.sample(
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, class_labels=LABELS, latents=noise,
                output_type="latent", progress=False)
    diffs = {k: float((run() - reference).abs().max()) for k, run in runs.items()}  # warm-up (compiles)
    times: dict[str, list[float]] = {k: [] for k in PROVIDERS}
    rounds = iter(range(ROUNDS))

    def one_round():
        r = next(rounds)
        for k in PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[:r % len(PROVIDERS)]:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    case = f"{IMAGES} img, DPM++ 2M {STEPS} steps, CFG {GUIDANCE}"
    for k in PROVIDERS:
        median = statistics.median(times[k])
        extra = dict(threads=torch.get_num_threads(), max_abs_diff=diffs[k], ms_per_image=median / IMAGES * 1e3,
                     min_s=min(times[k]), max_s=max(times[k]))
        benchmark.extra_info[k] = extra
        RESULTS[("digits", case)][k] = (median, extra)
    benchmark.extra_info.update(environment())
