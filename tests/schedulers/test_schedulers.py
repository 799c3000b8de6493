"""Scheduler API: names, configs and defaults vs diffusers, from_diffusers sources, plan structure, thresholding,
and the places where we deliberately differ from diffusers (its quirks), each checked against diffusers' own
numbers where it has them."""

from __future__ import annotations

import ast
import inspect
import re

import diffusers
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.ops import fused_step
from fastdiff.ops.guidance import threshold_limits
from fastdiff.schedulers import (
    DIFFUSERS_CLASSES,
    HIST_SLOTS,
    NAMES,
    NCOEF,
    Col,
    Scheduler,
    Thresholding,
    base,
    from_diffusers,
    get_scheduler,
)
from tests.tolerances import SCHED_STEP_RTOL, rel_err

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("name", list(NAMES))
def test_name_builds_a_consistent_plan(name):
    s = get_scheduler(name)
    assert isinstance(s, Scheduler) and s.name == name
    n = min(7, s.max_steps)
    p = s.plan(n)
    assert p.scheduler == name and p.num_steps == n and p.coefs.shape == (n, NCOEF)
    assert p.coefs.dtype == np.float64 and np.isfinite(p.coefs).all()
    assert np.array_equal(p.coefs[:, Col.STEP], np.arange(n))
    assert p.coefs[-1, Col.IN_NEXT] == 1.0
    wslot = p.coefs[:, Col.WSLOT]
    assert set(np.unique(wslot)) <= {-1.0, 0.0, 1.0, 2.0} and p.hist_slots <= HIST_SLOTS
    assert p.hist_slots == (int(wslot.max()) + 1 if (wslot >= 0).any() else 0)
    assert p.config == s.config and p.prediction_type == s["prediction_type"]
    assert p.timestep_dtype == ("float32" if s.diffusers_class.startswith("Euler") else "int64")


def test_noise_columns_follow_diffusers_draws():
    assert get_scheduler("ddpm", timestep_spacing="linspace").plan(5).noise_steps().tolist() == [1, 1, 1, 1, 0]
    assert get_scheduler("ddpm", timestep_spacing="trailing").plan(3).noise_steps().all()  # last t = 332 > 0
    assert not get_scheduler("ddim").plan(5).needs_noise()
    assert get_scheduler("ddim", eta=0.3).plan(5).noise_steps().all()  # drawn even where std = 0 (last step)
    assert get_scheduler("euler_a").plan(4).noise_steps().all()
    assert get_scheduler("lcm").plan(4).noise_steps().tolist() == [1, 1, 1, 0]
    for name in ("euler", "dpmpp_2m", "unipc", "onestep"):
        assert not get_scheduler(name).plan(1).needs_noise()


@pytest.mark.parametrize("cls_name", list(DIFFUSERS_CLASSES))
def test_defaults_equal_diffusers_defaults(cls_name):
    ours, theirs = DIFFUSERS_CLASSES[cls_name](), getattr(diffusers, cls_name)().config
    for key, value in ours.diffusers_config().items():
        assert key in theirs, f"{cls_name} has no config key {key}"
        assert value == theirs[key] or (value in ([], None) and theirs[key] in ([], None)), key
    for key, value in ours.NEUTRAL.items():
        assert theirs.get(key) == value, key


SCHEDULER_CLASSES = {cls.__name__: cls for cls, _ in NAMES.values()}
# An ``Args:`` entry of a class docstring: ``key (type, default <literal>): ...`` for a key taken at any value,
# ``key (type, only <literal>): ...`` for one accepted at a single neutral value (Scheduler.NEUTRAL).
ARG_ENTRY = re.compile(r"^ {8}(\w+) \(([^)]*), (default|only) ([^)]*)\): ", re.MULTILINE)


def _literal(text: str):
    return float(text) if text in ("inf", "-inf") else ast.literal_eval(text)


@pytest.mark.parametrize("cls_name", list(SCHEDULER_CLASSES))
def test_every_config_key_is_documented(cls_name):
    """The class docstring documents exactly the keys the class accepts, each with its real default (or the one
    value it accepts), so the docs cannot drift from DEFAULTS / NEUTRAL."""
    cls = SCHEDULER_CLASSES[cls_name]
    documented = {m[0]: (m[2], m[3]) for m in ARG_ENTRY.findall(cls.__doc__ or "")}
    accepted = {**{k: ("default", v) for k, v in cls.DEFAULTS.items()},
                **{k: ("only", v) for k, v in cls.NEUTRAL.items()}}
    assert sorted(documented) == sorted(accepted), f"{cls_name}: docstring Args and accepted keys differ"
    for key, (kind, value) in accepted.items():
        doc_kind, doc_value = documented[key]
        assert (doc_kind, _literal(doc_value)) == (kind, value), f"{cls_name}.{key}: documented {doc_kind} {doc_value}"


CONFIGS = [
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD), 10),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, solver_type="heun", **SD), 20),
    ("UniPCMultistepScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing"), 8),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing", **SD), 4),
    ("LCMScheduler", {}, 4),
]


@pytest.mark.parametrize("cls_name,cfg,n", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_from_diffusers_sources_agree(cls_name, cfg, n, tmp_path):
    theirs = getattr(diffusers, cls_name)(**cfg)
    theirs.save_config(tmp_path / "model" / "scheduler")
    sources = [theirs, dict(theirs.config, _class_name=cls_name), tmp_path / "model",
               str(tmp_path / "model" / "scheduler"), tmp_path / "model" / "scheduler" / "scheduler_config.json"]
    ours = [from_diffusers(src) for src in sources] + [from_diffusers(dict(theirs.config), class_name=cls_name)]
    ours.append(get_scheduler(tmp_path / "model"))
    theirs.set_timesteps(n)
    for s in ours:
        assert s.config == ours[0].config and s.diffusers_class == cls_name
        assert np.array_equal(s.plan(n).timesteps, theirs.timesteps.numpy())
        assert np.array_equal(s.plan(n).coefs, ours[0].plan(n).coefs)
    for key, value in cfg.items():
        assert ours[0][key] == value


def test_from_diffusers_overrides_and_name():
    s = from_diffusers(diffusers.DPMSolverMultistepScheduler(), use_karras_sigmas=True, prediction_type="sample")
    assert s.name == "dpmpp_2m_karras" and s["prediction_type"] == "sample"
    assert from_diffusers(diffusers.EulerAncestralDiscreteScheduler()).name == "euler_a"
    assert get_scheduler("dpmpp_2m", use_karras_sigmas=True).name == "dpmpp_2m_karras"
    assert get_scheduler("dpmpp_2m_karras", use_karras_sigmas=False).name == "dpmpp_2m"


def test_get_scheduler_passes_schedulers_through_and_copies_on_override():
    s = get_scheduler("ddim", clip_sample=False)
    assert get_scheduler(s) is s
    t = get_scheduler(s, eta=0.5)
    assert t is not s and t["eta"] == 0.5 and s["eta"] == 0.0 and t["clip_sample"] is False
    s.config["eta"] = 9  # config is a copy
    assert s["eta"] == 0.0
    assert fastdiff.get_scheduler is get_scheduler and fastdiff.from_diffusers is from_diffusers


def test_base_config_matches_diffusers_from_config():
    """get_scheduler(name, config=model_config) == diffusers' XScheduler.from_config(model_config)."""
    pndm = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **SD)
    ours = get_scheduler("dpmpp_2m_karras", config=pndm)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(pndm.config, use_karras_sigmas=True)
    assert ours["steps_offset"] == 1 and ours["beta_schedule"] == "scaled_linear" and ours["use_karras_sigmas"]
    theirs.set_timesteps(20)
    assert np.array_equal(ours.plan(20).timesteps, theirs.timesteps.numpy())
    for key, value in ours.diffusers_config().items():
        assert theirs.config[key] == value or (value in ([], None) and theirs.config[key] in ([], None)), key


@pytest.mark.parametrize("name", list(NAMES))
def test_to_diffusers_round_trip(name):
    s = get_scheduler(name, **({} if name == "lcm" else SD))
    if not s.diffusers_class:
        pytest.skip(f"{name!r} has no diffusers equivalent")
    d = s.to_diffusers()
    assert type(d).__name__ == s.diffusers_class
    n = min(4, s.max_steps)
    d.set_timesteps(n)
    assert np.array_equal(d.timesteps.numpy(), s.plan(n).timesteps)
    if name != "onestep":
        assert from_diffusers(d).diffusers_config() == s.diffusers_config()


@pytest.mark.parametrize("shape,ratio,max_value", [((3, 4, 9, 7), 0.9, 1.5), ((1, 3, 16, 16), 0.995, 3.0),
                                                   ((2, 4, 8, 8), 0.5, 1.0)])
def test_threshold_limits_match_diffusers(shape, ratio, max_value):
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2.5
    s = threshold_limits(x0, Thresholding(ratio, max_value))
    assert s.shape == (shape[0],) and s.dtype == torch.float32
    assert bool((s >= 1).all() and (s <= max_value).all())
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                  sample_max_value=max_value)._threshold_sample(x0)
    ours = torch.maximum(torch.minimum(x0, s.view(-1, 1, 1, 1)), -s.view(-1, 1, 1, 1)) / s.view(-1, 1, 1, 1)
    assert rel_err(ours, ref) <= 1e-6
    s16 = threshold_limits(x0.half(), Thresholding(ratio, max_value))
    assert s16.dtype == torch.float32 and torch.allclose(s16, s, rtol=2e-3)


@pytest.mark.parametrize("cls_name,name", [("DDIMScheduler", "ddim"), ("EulerDiscreteScheduler", "euler"),
                                           ("DPMSolverMultistepScheduler", "dpmpp_2m")])
def test_trailing_spacing_spurious_timestep_is_dropped(cls_name, name):
    """diffusers quirk: trailing spacing arange(T, 0, -T/n) has n + 1 entries for some n (61, 103, ...): a final
    timestep -1. We plan exactly n steps, the first n of diffusers' timesteps."""
    theirs = getattr(diffusers, cls_name)(timestep_spacing="trailing")
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    plan = get_scheduler(name, timestep_spacing="trailing").plan(61)
    assert plan.num_steps == 61 and np.array_equal(plan.timesteps, theirs.timesteps[:61].numpy())


@pytest.mark.parametrize("name,spacing", [(n, s) for n in ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "unipc")
                                          for s in ("leading", "linspace", "trailing")])
def test_max_steps_timesteps_match_diffusers(name, spacing):
    s = get_scheduler(name, timestep_spacing=spacing)
    theirs = get_scheduler(name).to_diffusers().__class__(timestep_spacing=spacing)
    theirs.set_timesteps(s.max_steps)
    assert np.array_equal(s.plan(s.max_steps).timesteps, theirs.timesteps.numpy())


def test_unipc_bh1_zero_final_sigma_gives_x0():
    """diffusers quirk: UniPC bh1 with final_sigmas_type="zero" computes B_h = -h = -inf at the last step and
    returns -inf * 0 = NaN. The h -> inf limit of the update is the x0 prediction, which we return; the expected
    value here is diffusers' own x0 (convert_model_output) at that step."""
    n, shape = 4, (1, 4, 6, 6)
    ours = get_scheduler("unipc", solver_type="bh1", prediction_type="v_prediction")
    theirs = diffusers.UniPCMultistepScheduler(solver_type="bh1", prediction_type="v_prediction")
    theirs.set_timesteps(n)
    theirs._step_index = n - 1
    x, m = torch.randn(shape), torch.randn(shape)
    plan = ours.plan(n)
    out = fused_step(m, x, plan.device_table("cpu")[n - 1], hist=torch.zeros(3, *shape), saved=torch.zeros(shape),
                     backend="torch")
    assert plan.coefs[-1, Col.OS] == 0 and plan.coefs[-1, Col.OH0:Col.OH2 + 1].tolist() == [0, 0, 0]
    assert rel_err(out, theirs.convert_model_output(m, sample=x)) <= SCHED_STEP_RTOL


def test_dpm_karras_sigma_min_last_step_is_identity():
    """Karras + final_sigmas_type="sigma_min" ends on sigma_min twice (h = 0). diffusers' heun update evaluates
    (e^-h - 1) / h = NaN there; midpoint gives prev = x. Our last row is the identity for both solver types."""
    for solver_type in ("midpoint", "heun"):
        plan = get_scheduler("dpmpp_2m_karras", final_sigmas_type="sigma_min", solver_type=solver_type).plan(20)
        last = plan.coefs[-1]
        assert last[Col.OX] == 1.0 and not last[[Col.OM, Col.O0, Col.OH0, Col.OH1, Col.OH2]].any()
    theirs = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    theirs.set_timesteps(20)
    assert float(theirs.sigmas[-1]) == float(theirs.sigmas[-2])


def test_step_kwargs_for_diffusers():
    s = get_scheduler("ddim", eta=0.4, use_clipped_model_output=True)
    assert s.step_kwargs == {"eta": 0.4, "use_clipped_model_output": True}
    assert "eta" not in s.diffusers_config()
    assert set(s.step_kwargs) <= set(inspect.signature(diffusers.DDIMScheduler.step).parameters)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "ddim", "euler_a"])
def test_plan_is_built_once_per_step_count(name, monkeypatch):
    """plan(n) is cached per scheduler object: the second call builds nothing and returns the same table; another
    step count or a replaced config builds its own (a cache keyed too loosely would hand back the wrong table)."""
    sched = get_scheduler(name)
    builds = []
    real = type(sched)._plan
    monkeypatch.setattr(type(sched), "_plan", lambda self, n: builds.append(n) or real(self, n))
    first = sched.plan(12)
    assert sched.plan(12) is first and builds == [12]
    other = sched.plan(7)
    assert builds == [12, 7] and other.num_steps == 7
    fresh = get_scheduler(name).plan(12)
    np.testing.assert_array_equal(first.coefs, fresh.coefs)
    changed = sched.replace(prediction_type="v_prediction").plan(12)
    assert builds[-1] == 12 and len(builds) == 4
    assert not np.array_equal(changed.coefs, first.coefs)
    for n in range(100, 100 + base.PLAN_CACHE_SIZE + 3):  # bounded: old step counts are dropped
        sched.plan(n)
    assert len(sched._plan_cache) == base.PLAN_CACHE_SIZE
