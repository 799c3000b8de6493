"""The per-step cost that is not the model: diffusers' pipeline arithmetic vs fastdiff's fused step.

"diffusers" runs exactly what a diffusers pipeline runs around the UNet each step: ``torch.cat([latents] * 2)``,
``scheduler.scale_model_input``, ``chunk`` + CFG arithmetic, ``scheduler.step``. fastdiff runs one
``fused_step`` that does all of it (and writes the next model input). Both run a whole loop of ``STEPS`` steps on
fixed random model outputs; the per-step time is the loop time / STEPS. On a GPU the "copy" provider measures a
device-to-device copy of the same bytes the fused step must move, the floor GB/s is reported against.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from fastdiff.ops import availability, fused_step
from fastdiff.schedulers.plan import HIST_SLOTS, Col

STEPS = 20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"sd15-1": (1, 4, 64, 64), "sd15-4": (4, 4, 64, 64), "sdxl-4": (4, 4, 128, 128),
          "video-16": (16, 4, 64, 64)}
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
G = 7.5
quick = os.environ.get("FASTDIFF_BENCH_QUICK") == "1"
if DEVICE == "cpu":  # the CPU goal is stated at SDXL x4 fp32; other cases are slow on 2 cores
    SHAPES = {k: v for k, v in SHAPES.items() if k in ("sd15-1", "sdxl-4")}
    DTYPES = {"fp32": torch.float32}
if quick:
    SCHEDULERS = {k: SCHEDULERS[k] for k in ("euler_a", "dpmpp_2m")}

PROVIDERS = ["diffusers", "torch"] + [p for p in ("cpp", "cuda", "triton") if not availability(DEVICE)[p]]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_inputs(shape, dtype, n_sets=3):
    """Several input sets, rotated, so caches do not flatter small shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b = shape[0]
    return [(torch.randn((2 * b,) + shape[1:], generator=g).to(DEVICE, dtype),
             torch.randn(shape, generator=g).to(DEVICE, dtype)) for _ in range(n_sets)]


def step_bytes(plan, shape, itemsize: int) -> float:
    """Bytes the fused step must move per step, averaged over the plan: model out (2B), x read + write,
    next input (2B), each history slot with a nonzero coefficient, the history write, saved, noise."""
    numel = 1
    for s in shape:
        numel *= s
    total = 0.0
    for row in plan.coefs:
        n = 2 + 1 + 1 + 2
        n += sum(1 for j in range(HIST_SLOTS) if row[Col.OH0 + j] != 0 or row[Col.SH0 + j] != 0)
        n += 1 if row[Col.WSLOT] >= 0 else 0
        n += (2 if plan.uses_saved else 0) + (1 if row[Col.ON] != 0 else 0)
        total += n * numel * itemsize
    return total / plan.num_steps


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step(benchmark, record, provider, sched_name, shape_name, dtype_name):
    import diffusers

    from fastdiff.schedulers import from_diffusers

    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    cls_name, cfg = SCHEDULERS[sched_name]
    dsched = getattr(diffusers, cls_name)(**cfg)
    plan = from_diffusers(dsched).plan(STEPS)
    sets = make_inputs(shape, dtype)
    b = shape[0]
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    if provider == "diffusers":
        # As pipelines' prepare_extra_step_kwargs: only schedulers whose step() takes a generator get one.
        extra = {"generator": gen} if "generator" in inspect.signature(dsched.step).parameters else {}

        def loop():
            dsched.set_timesteps(STEPS, device=DEVICE)
            lat = sets[0][1].clone()
            for i, t in enumerate(dsched.timesteps):
                out, _ = sets[i % len(sets)]
                lmi = dsched.scale_model_input(torch.cat([lat] * 2), t)  # noqa: F841 - the pipeline makes it
                u, c = out.chunk(2)
                pred = u + G * (c - u)
                lat = dsched.step(pred, t, lat, return_dict=False, **extra)[0]
            sync()
    else:
        table = plan.device_table(DEVICE)
        x = sets[0][1].clone()
        next_in = torch.empty((2 * b,) + shape[1:], device=DEVICE, dtype=dtype)
        hist = torch.zeros((HIST_SLOTS,) + shape, device=DEVICE, dtype=dtype) if plan.hist_slots else None
        saved = torch.zeros(shape, device=DEVICE, dtype=dtype) if plan.uses_saved else None
        noise_steps = plan.noise_steps()

        def loop():
            for i in range(STEPS):
                out, _ = sets[i % len(sets)]
                noise = torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype) if noise_steps[i] else None
                fused_step(out, x, table[i], x, guidance_scale=G, cfg=True, hist=hist, saved=saved, noise=noise,
                           next_in=next_in, backend=provider)
            sync()

    loop()  # warm-up: compilation, lazy init
    benchmark.pedantic(loop, rounds=5 if DEVICE == "cpu" else 20, iterations=1, warmup_rounds=1)
    per_step = benchmark.stats.stats.median / STEPS
    nbytes = step_bytes(plan, shape, torch.empty((), dtype=dtype).element_size())
    record("step", f"{sched_name} {shape_name} {dtype_name}", provider, benchmark,
           gbps=nbytes / per_step / 1e9, per_step_us=per_step * 1e6)


@pytest.mark.skipif(DEVICE != "cuda", reason="copy bandwidth floor is measured on the GPU only")
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_copy_floor(benchmark, record, shape_name):
    """Device-to-device copy moving the bytes of a CFG Euler step in fp16 (read 2B model out + x, write x + 2B next
    input = 6 latent-sized buffers): copying 3 buffers reads 3 and writes 3. Same launch count (one) as fastdiff."""
    shape = SHAPES[shape_name]
    src = torch.randn((3,) + shape, device=DEVICE, dtype=torch.float16)
    dst = torch.empty_like(src)

    def loop():
        for _ in range(STEPS):
            dst.copy_(src)
        sync()

    loop()
    benchmark.pedantic(loop, rounds=20, iterations=1, warmup_rounds=1)
    per = benchmark.stats.stats.median / STEPS
    record("copy", f"copy {shape_name}", "copy", benchmark, gbps=2 * src.numel() * 2 / per / 1e9)
