"""The main job on CPU, end to end: the embedded digits teacher with its defaults (DPM-Solver++ 2M, 20 steps,
CFG 1.5), 10 images (one per digit), as a diffusers user writes the loop vs fastdiff's routes: eager,
``compile=True``, the UNet in onnxruntime, and the whole sampler as one onnxruntime graph.

Providers (same session, same weights, same starting noise, ``output_type="latent"``):

- ``diffusers``: ``DPMSolverMultistepScheduler.from_config(model's scheduler config)`` and the pipeline loop
  (cat the CFG batch, ``scale_model_input``, the network, chunk, guidance, ``scheduler.step``);
- ``diffusers-compile``: the same loop with the UNet ``torch.compile``d (inductor, default mode);
- ``fastdiff``: ``fastdiff.Sampler(model)`` (the fused cpp step, ``auto``);
- ``fastdiff-compile``: ``fastdiff.Sampler(model, compile=True)`` (:mod:`fastdiff.compiled`: inductor, frozen
  weights, channels-last inside the graph);
- ``fastdiff-onnxruntime``: ``fastdiff.Sampler(model, backend="onnxruntime")`` (the UNet exported on the fly);
- ``onnx-sampler-graph`` (only with ``FASTDIFF_BENCH_GRAPH=1``): the whole 20-step loop exported as one graph
  (``export_onnx(..., sampler="dpmpp_2m")``) run by :class:`fastdiff.backends.onnxruntime.OnnxSampler`, one
  onnxruntime call. Opt-in because exporting 20 unrolled UNet calls had not finished after 20 minutes on the
  loaded 2-core VM (2026-11-25), longer than the rest of the bench together.

The providers run interleaved: each round runs all of them, in an order that rotates from round to round, and each
provider's median over the rounds goes to the ratio table. On this shared 2-core VM separate per-provider runs drifted
by up to 1.5x between runs of the same code; interleaving exposes every provider to the same drift. Compilation
happens in the warm-up round, outside the timed rounds, and its time is reported as ``compile_s`` (the warm-up
call of the compiled providers; the exports' time for the onnx ones). ``max_abs_diff``: each provider's latents
against the eager diffusers loop's. ``FASTDIFF_BENCH_ROUNDS`` overrides the number of rounds.

    OMP_NUM_THREADS=2 pytest benches/bench_digits.py --benchmark-only -p no:cacheprovider -s   # minutes: compiles
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import pytest
import torch

import fastdiff
from benches.helpers import digits_model

IMAGES, STEPS, GUIDANCE = 10, 20, 1.5
LABELS = torch.arange(IMAGES)
PROVIDERS = ["diffusers", "diffusers-compile", "fastdiff", "fastdiff-compile", "fastdiff-onnxruntime",
             "onnx-sampler-graph"]
ROUNDS = int(os.environ.get("FASTDIFF_BENCH_ROUNDS", "10"))


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


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fastdiff_run(sampler, noise):
    return lambda: sampler.sample(num_inference_steps=STEPS, guidance_scale=GUIDANCE, class_labels=LABELS,
                                  latents=noise, output_type="latent", progress=False)


def _onnx_runs(model, noise, cache: str) -> tuple[dict, dict]:
    """The two onnxruntime providers (exports timed as their compile time), or none without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}, {}
    from fastdiff.backends.onnxruntime import OnnxSampler
    from fastdiff.export import export_onnx

    old = os.environ.get("FASTDIFF_CACHE_DIR")
    os.environ["FASTDIFF_CACHE_DIR"] = cache
    try:
        ort, t_ort = _timed(lambda: fastdiff.Sampler(model, scheduler="dpmpp_2m", backend="onnxruntime"))
        runs, seconds = {"fastdiff-onnxruntime": _fastdiff_run(ort, noise)}, {"fastdiff-onnxruntime": t_ort}
        if os.environ.get("FASTDIFF_BENCH_GRAPH") == "1":
            report, seconds["onnx-sampler-graph"] = _timed(lambda: export_onnx(
                model, os.path.join(cache, "graph"), sampler="dpmpp_2m", steps=STEPS, guidance_scale=GUIDANCE,
                progress=False))
            graph = OnnxSampler(report.files[-1][0])
            runs["onnx-sampler-graph"] = lambda: graph(noise, class_labels=LABELS, guidance_scale=GUIDANCE)
    finally:
        if old is None:
            os.environ.pop("FASTDIFF_CACHE_DIR", None)
        else:
            os.environ["FASTDIFF_CACHE_DIR"] = old
    return runs, seconds


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
    compiled = fastdiff.Sampler(nets["eager"], scheduler="dpmpp_2m", compile=True)
    runs = {"diffusers": lambda: diffusers_loop(nets["eager"], noise),
            "diffusers-compile": lambda: diffusers_loop(nets["compile"], noise),
            "fastdiff": _fastdiff_run(fastdiff.Sampler(nets["eager"], scheduler="dpmpp_2m"), noise),
            "fastdiff-compile": _fastdiff_run(compiled, noise)}
    with tempfile.TemporaryDirectory() as cache:
        onnx, compile_s = _onnx_runs(nets["eager"], noise, cache)
        runs.update(onnx)
        providers = [p for p in PROVIDERS if p in runs]
        diffs = {}
        for k in providers:  # warm-up: compiles; its time is the compile time of the compiled providers
            out, dt = _timed(runs[k])
            diffs[k] = float((out - reference).abs().max())
            if k.endswith("-compile"):
                compile_s[k] = dt
        compile_s["fastdiff-compile (compile_seconds)"] = compiled.compile_seconds
        print(f"\ncompile / export seconds: {compile_s}")
        times = _interleave(runs, providers, benchmark)
    case = f"{IMAGES} img, DPM++ 2M {STEPS} steps, CFG {GUIDANCE}"
    for k in providers:
        median = statistics.median(times[k])
        extra = dict(threads=torch.get_num_threads(), max_abs_diff=diffs[k], ms_per_image=median / IMAGES * 1e3,
                     min_s=min(times[k]), max_s=max(times[k]), compile_s=compile_s.get(k))
        benchmark.extra_info[k] = extra
        RESULTS[("digits", case)][k] = (median, extra)
        print(f"{k}: median {median:.3f} s (min {min(times[k]):.3f}, max {max(times[k]):.3f}), max_abs_diff "
              f"{diffs[k]:.1e}, compile {compile_s.get(k)}")
    benchmark.extra_info.update(environment())


def _interleave(runs: dict, providers: list[str], benchmark) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in providers}
    rounds = iter(range(ROUNDS))

    def one_round():
        r = next(rounds)
        for k in providers[r % len(providers):] + providers[:r % len(providers)]:
            times[k].append(_timed(runs[k])[1])

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return times
