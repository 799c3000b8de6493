"""Scheduler parity with diffusers: timesteps, init_noise_sigma, model-input scaling and every step's output.

Each step feeds the same (x, model output) to three steppers: our plan row through ``fused_step(backend="torch")``,
diffusers' ``step()`` in float32, and diffusers' ``step()`` with its tables (sigmas / alphas_cumprod) and tensors
upcast to float64 ("diffusers-exact": diffusers' own code and table values, without float32 rounding). x comes from
our previous step, so errors do not compound. Ancestral noise: both sides draw ``torch.randn(shape, generator=g)``
(float32) from identically seeded generators, we exactly where the plan's NOISE column says so; the generators must
end in the same state.

Checks per step (max|a - b| / max|b|): ours vs diffusers-exact <= SCHED_STEP_RTOL always; ours vs diffusers-fp32
<= SCHED_STEP_RTOL wherever diffusers' float32 result is itself within SCHED_STEP_RTOL / 2 of diffusers-exact. (It
is not for a few ill-conditioned settings, e.g. Euler with v-prediction on the cosine schedule, sigma_max ~ 2e4:
diffusers computes x + d * (sigma_next - sigma) with float32 scalars and loses ~1e-3 relative there.)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import sys

import diffusers
import numpy as np
import pytest
import torch

from fastdiff.ops import fused_step
from fastdiff.ops.guidance import threshold_limits
from fastdiff.schedulers import Col, Scheduler, get_scheduler
from tests.tolerances import SCHED_LOOP_RTOL, SCHED_STEP_RTOL, poison, rel_err

SHAPE = (2, 4, 8, 8)
STEPS = (1, 2, 3, 7, 25, 50)
PREDS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "linspace", "trailing")
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _randn_f32(shape, generator=None, device=None, dtype=None, layout=None):
    # float32 draws (the same numbers the float32 run and our side get), then upcast for the float64 oracle
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype or torch.float32)


@contextlib.contextmanager
def float32_noise():
    """Make diffusers draw float32 noise even when stepping float64 tensors (torch.randn in float64 gives other
    numbers for the same generator)."""
    mods = [m for k, m in list(sys.modules.items())
            if k.startswith("diffusers.schedulers.scheduling_") and hasattr(m, "randn_tensor")]
    saved = [m.randn_tensor for m in mods]
    for m in mods:
        m.randn_tensor = _randn_f32
    try:
        yield
    finally:
        for m, fn in zip(mods, saved, strict=True):
            m.randn_tensor = fn


def _upcast_tables(sched) -> None:
    for attr in ("sigmas", "alphas_cumprod", "final_alpha_cumprod", "one"):
        v = getattr(sched, attr, None)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            setattr(sched, attr, v.double())


def check_parity(ours: Scheduler, theirs, n: int, step_kwargs: dict | None = None, seed: int = 0) -> dict:
    """Step ours and diffusers side by side for ``n`` steps; assert parity; return error stats."""
    step_kwargs = step_kwargs or {}
    what = f"{ours!r} vs {type(theirs).__name__} at {n} steps"
    plan = ours.plan(n)
    exact = copy.deepcopy(theirs)
    for s in (theirs, exact):
        s.set_timesteps(n)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(0)  # as a pipeline should; see test_dpm_karras_cosine_repeated_first_timestep
    _upcast_tables(exact)
    tt = theirs.timesteps
    assert np.array_equal(plan.timesteps, tt.numpy().astype(np.float64)), f"{what}: timesteps {plan.timesteps} != {tt}"
    assert str(tt.dtype) == f"torch.{plan.timestep_dtype}", f"{what}: timestep dtype {tt.dtype}"
    ins = float(theirs.init_noise_sigma)
    assert abs(plan.init_noise_sigma - ins) <= 1e-6 * ins, f"{what}: init_noise_sigma {plan.init_noise_sigma} != {ins}"

    table = plan.device_table("cpu")
    g_model = torch.Generator().manual_seed(seed)
    g_ours, g_32, g_64 = (torch.Generator().manual_seed(seed + 1) for _ in range(3))
    gen = "generator" in inspect.signature(theirs.step).parameters
    x = torch.randn(SHAPE, generator=g_model) * plan.init_noise_sigma
    # poisoned state: a plan that reads a history slot or the saved buffer before writing it produces NaN
    hist = poison(torch.empty(3, *SHAPE))
    saved = poison(torch.empty(SHAPE)) if plan.uses_saved else None
    scale = plan.input_scale0
    stats = {"max_exact": 0.0, "max_fp32": 0.0, "fp32_skipped": 0}
    for i, t in enumerate(tt):
        x_in = theirs.scale_model_input(x, t)
        exact.scale_model_input(x.double(), t)
        e_in = rel_err(x * scale, x_in)
        assert e_in <= SCHED_STEP_RTOL, f"{what}: step {i} model input scale off by {e_in:.2e}"
        m = torch.randn(SHAPE, generator=g_model)
        noise = torch.randn(SHAPE, generator=g_ours) if plan.coefs[i, Col.NOISE] else None
        limit = None
        if plan.thresholding is not None:
            limit = threshold_limits(table[i, Col.PX] * x + table[i, Col.PM] * m, plan.thresholding)
        out = fused_step(m, x, table[i], hist=hist, saved=saved, noise=noise, clip_range=plan.clip_range,
                         x0_limit=limit, backend="torch")
        ref32 = theirs.step(m, t, x, **step_kwargs, **({"generator": g_32} if gen else {})).prev_sample
        with float32_noise():
            ref64 = exact.step(m.double(), t, x.double(), **step_kwargs,
                               **({"generator": g_64} if gen else {})).prev_sample
        assert ref64.dtype == torch.float64
        e64, e32, own = rel_err(out, ref64), rel_err(out, ref32), rel_err(ref32, ref64)
        assert e64 <= SCHED_STEP_RTOL, f"{what}: step {i} (t={float(t):g}) differs from diffusers-exact by {e64:.2e}"
        if own <= SCHED_STEP_RTOL / 2:
            assert e32 <= SCHED_STEP_RTOL, f"{what}: step {i} (t={float(t):g}) differs from diffusers by {e32:.2e}"
            stats["max_fp32"] = max(stats["max_fp32"], e32)
        else:
            stats["fp32_skipped"] += 1
        stats["max_exact"] = max(stats["max_exact"], e64)
        scale = float(table[i, Col.IN_NEXT])
        x = out
    if gen:
        assert torch.equal(g_ours.get_state(), g_32.get_state()), f"{what}: noise draws out of step with diffusers"
    return stats


def _steps(sched: Scheduler, steps=STEPS):
    return [n for n in steps if n <= sched.max_steps]


# ------------------------------------------------------------------------------------------------------------------
# Full matrix: scheduler x prediction type x spacing x beta schedule x step counts

MATRIX = [
    ("ddpm", "DDPMScheduler", {}),
    ("ddim", "DDIMScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("lcm", "LCMScheduler", {}),
]
MATRIX_PARAMS = [
    pytest.param(name, cls, extra, pred, spacing, beta, id=f"{name}-{pred}-{spacing}-{beta}")
    for (name, cls, extra), pred, spacing, beta in itertools.product(MATRIX, PREDS, SPACINGS, BETAS)
    if not (name == "euler_a" and pred == "sample")  # diffusers: NotImplementedError
    and not (name == "lcm" and spacing != "leading")  # LCM ignores timestep_spacing
]


@pytest.mark.parametrize("name,cls,extra,pred,spacing,beta", MATRIX_PARAMS)
def test_matrix(name, cls, extra, pred, spacing, beta):
    cfg = dict(prediction_type=pred, timestep_spacing=spacing, beta_schedule=beta)
    ours = get_scheduler(name, **cfg)
    for n in _steps(ours):
        check_parity(ours, getattr(diffusers, cls)(**cfg, **extra), n)


# ------------------------------------------------------------------------------------------------------------------
# Options, each at a few step counts (diffusers class, config, step kwargs); ours = from the same config via a name.

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ZSNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
THRESH = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample")
OPTIONS = {
    "ddpm": ("DDPMScheduler", [
        dict(variance_type="fixed_small_log"), dict(variance_type="fixed_large", clip_sample=False),
        dict(clip_sample_range=2.0, prediction_type="v_prediction"), dict(THRESH), dict(steps_offset=1, **SD),
        dict(ZSNR), dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), clip_sample=False),
    ]),
    "ddim": ("DDIMScheduler", [
        dict(eta=0.5), dict(eta=1.0, clip_sample=False, **SD), dict(use_clipped_model_output=True),
        dict(use_clipped_model_output=True, eta=0.3, prediction_type="v_prediction"),
        dict(set_alpha_to_one=False, clip_sample=False), dict(steps_offset=1, clip_sample=False, **SD),
        dict(ZSNR, clip_sample=False), dict(THRESH), dict(THRESH, eta=0.7, use_clipped_model_output=True),
        dict(clip_sample=False, prediction_type="sample", timestep_spacing="trailing"),
    ]),
    "euler": ("EulerDiscreteScheduler", [
        dict(use_karras_sigmas=True, **SD), dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0),
        dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min", use_karras_sigmas=True),
        dict(interpolation_type="log_linear"), dict(ZSNR), dict(steps_offset=1, **SD),
        dict(timestep_spacing="trailing", prediction_type="v_prediction", **SD),
    ]),
    "euler_a": ("EulerAncestralDiscreteScheduler", [
        dict(ZSNR), dict(steps_offset=1, **SD), dict(timestep_spacing="trailing", **SD),
    ]),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", [
        dict(solver_type="heun"), dict(solver_type="heun", use_karras_sigmas=True, **SD),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_type="heun"),
        dict(euler_at_final=True, final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min"),
        dict(final_sigmas_type="sigma_min", use_karras_sigmas=True), dict(solver_order=1),
        dict(THRESH), dict(THRESH, prediction_type="epsilon", use_karras_sigmas=True),
        dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        dict(ZSNR), dict(steps_offset=1, timestep_spacing="leading", **SD),
        dict(solver_type="bh2"), dict(algorithm_type="deis", final_sigmas_type="sigma_min"),
    ]),
    "unipc": ("UniPCMultistepScheduler", [
        # bh1 with a zero final sigma: diffusers computes -inf * 0 = NaN at the last step (see test_schedulers)
        dict(solver_type="bh1", final_sigmas_type="sigma_min"),
        dict(solver_type="bh1", use_karras_sigmas=True, final_sigmas_type="sigma_min", **SD), dict(solver_order=1),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=8.0),
        dict(disable_corrector=[0, 2]), dict(disable_corrector=[1], solver_type="bh1", final_sigmas_type="sigma_min"),
        dict(THRESH), dict(ZSNR), dict(steps_offset=1, timestep_spacing="leading", **SD),
    ]),
    "lcm": ("LCMScheduler", [
        dict(original_inference_steps=100), dict(clip_sample=True, prediction_type="sample"), dict(THRESH),
        dict(timestep_scaling=5.0, set_alpha_to_one=False),
        dict(timestep_scaling=0.01),  # c_skip is ~0 at the default scaling; this makes it matter
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, original_inference_steps=20),
    ]),
}
OPTION_PARAMS = [
    pytest.param(name, cls, cfg, id=f"{name}-" + ",".join(f"{k}={v}" for k, v in cfg.items() if k != "trained_betas"))
    for name, (cls, cfgs) in OPTIONS.items() for cfg in cfgs
]
STEP_KEYS = ("eta", "use_clipped_model_output")


@pytest.mark.parametrize("name,cls,cfg", OPTION_PARAMS)
def test_options(name, cls, cfg):
    ours = get_scheduler(name, **cfg)
    diff_cfg = {k: v for k, v in cfg.items() if k not in STEP_KEYS}
    step_kwargs = {k: v for k, v in cfg.items() if k in STEP_KEYS}
    for n in _steps(ours, (1, 2, 3, 7, 16, 25)):
        check_parity(ours, getattr(diffusers, cls)(**diff_cfg), n, step_kwargs)


# ------------------------------------------------------------------------------------------------------------------
# One-step settings and presets


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("extra", [{}, dict(clip_sample=True, clip_sample_range=1.5), dict(thresholding=True)],
                         ids=["plain", "clip", "threshold"])
def test_onestep_is_ddim_trailing_one_step(pred, extra):
    ours = get_scheduler("onestep", prediction_type=pred, **SD, **extra)
    theirs = diffusers.DDIMScheduler(timestep_spacing="trailing", prediction_type=pred,
                                     **{"clip_sample": False, **SD, **extra})
    check_parity(ours, theirs, 1)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_onestep_euler_a_matches_sd_turbo_setting(n):
    ours = get_scheduler("onestep_euler_a", **SD)
    check_parity(ours, diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SD), n)


def test_dpm_karras_cosine_repeated_first_timestep():
    """diffusers quirk: Karras timesteps on the cosine schedule are truncated, not rounded, and repeat (998, 998,
    998, ...). Without set_begin_index(0), diffusers' index_for_timestep takes the *second* match at the first
    step, skipping sigma_max, and then runs off the end of its sigmas. Our plan starts at sigma_max, which is what
    diffusers does with set_begin_index(0) (as check_parity calls).

    Whether the timesteps repeat depends on NumPy's last-bit rounding (7 steps repeat under NumPy 2.x; under 1.26
    no count in 4..39 does), so the timesteps are compared with diffusers' under the installed NumPy for every
    count, and the first-step check runs on the counts that repeat there."""
    cfg = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg)
    repeating = []
    for n in range(4, 40):
        theirs.set_timesteps(n)
        want = theirs.timesteps.numpy()
        np.testing.assert_array_equal(get_scheduler("dpmpp_2m", **cfg).plan(n).timesteps, want, err_msg=f"{n} steps")
        if want[0] == want[1]:
            repeating.append(n)
    for n in repeating[:2]:
        check_parity(get_scheduler("dpmpp_2m", **cfg), diffusers.DPMSolverMultistepScheduler(**cfg), n)


# ------------------------------------------------------------------------------------------------------------------
# Full loops: both chains run on their own (fp32), compared at the end with the loop tolerance.

LOOPS = [
    ("ddpm", "DDPMScheduler", dict(clip_sample=False, **SD), {}, 50),
    ("ddim", "DDIMScheduler", dict(clip_sample=False, **SD), dict(eta=0.5), 25),
    ("euler", "EulerDiscreteScheduler", dict(SD), {}, 25),
    ("euler_a", "EulerAncestralDiscreteScheduler", dict(SD), {}, 25),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, **SD), {}, 25),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(prediction_type="v_prediction", **SD), {}, 20),
    ("unipc", "UniPCMultistepScheduler", dict(SD), {}, 20),
    ("lcm", "LCMScheduler", {}, {}, 4),
]


@pytest.mark.parametrize("name,cls,cfg,step_kwargs,n", LOOPS, ids=[c[0] for c in LOOPS])
def test_full_loop(name, cls, cfg, step_kwargs, n):
    """A smooth stand-in model (m = 0.3 x + noise-free structure) so the chain stays bounded; both sides run
    their own chain; the final samples agree to SCHED_LOOP_RTOL."""
    ours = get_scheduler(name, **cfg, **step_kwargs)
    theirs = getattr(diffusers, cls)(**cfg)
    theirs.set_timesteps(n)
    plan = ours.plan(n)
    table = plan.device_table("cpu")
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)) * plan.init_noise_sigma
    g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    gen = {"generator": g_theirs} if "generator" in inspect.signature(theirs.step).parameters else {}
    hist, saved = torch.zeros(3, *SHAPE), torch.zeros(SHAPE)
    a, b = x0.clone(), x0.clone()
    for i, t in enumerate(theirs.timesteps):
        a_in = a * (plan.input_scale0 if i == 0 else float(table[i - 1, Col.IN_NEXT]))
        b_in = theirs.scale_model_input(b, t)
        noise = torch.randn(SHAPE, generator=g_ours) if plan.coefs[i, Col.NOISE] else None
        a = fused_step(0.3 * a_in + base, a, table[i], hist=hist, saved=saved, noise=noise,
                       clip_range=plan.clip_range, backend="torch")
        b = theirs.step(0.3 * b_in + base, t, b, **step_kwargs, **gen).prev_sample
    err = rel_err(a, b)
    assert err <= SCHED_LOOP_RTOL, f"{name}: final sample differs by {err:.2e}"
