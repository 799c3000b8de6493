"""Every scheduler error: its type and that its message says what was wrong and what to do."""

from __future__ import annotations

import diffusers
import pytest

from fastdiff.errors import FastDiffError, InvalidInput, UnknownScheduler
from fastdiff.schedulers import NAMES, from_diffusers, get_scheduler


def raises(exc, *needles):
    """pytest.raises that also checks the message contains every needle."""

    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.ctx.__exit__(*a)
            msg = str(self.info.value)
            for needle in needles:
                assert needle in msg, f"{needle!r} not in message: {msg}"
            assert isinstance(self.info.value, FastDiffError)
            return out

    return _Ctx()


def test_unknown_name_lists_names():
    with raises(UnknownScheduler, "'dpm++'", *NAMES):
        get_scheduler("dpm++")


def test_unknown_object_type():
    with raises(UnknownScheduler, "int", "ddim"):
        get_scheduler(123)


@pytest.mark.parametrize("name,n,needle", [
    ("ddim", 0, "1 to 1000"), ("ddim", -3, "1 to 1000"), ("ddpm", 1001, "num_train_timesteps=1000"),
    ("euler", 1001, "1 to 1000"), ("dpmpp_2m", 1000, "1 to 999"), ("unipc", 5000, "1 to 999"),
    ("lcm", 51, "original_inference_steps=50"), ("onestep", 2, "one-step"),
])
def test_step_count_out_of_range(name, n, needle):
    with raises(InvalidInput, f"num_inference_steps={n}", needle):
        get_scheduler(name).plan(n)


@pytest.mark.parametrize("bad", [2.5, True, "10", None])
def test_step_count_wrong_type(bad):
    with raises(InvalidInput, "num_inference_steps must be an int"):
        get_scheduler("ddim").plan(bad)


def test_lcm_more_steps_with_larger_original_grid():
    assert get_scheduler("lcm", original_inference_steps=100).plan(51).num_steps == 51
    with raises(InvalidInput, "original_inference_steps must be an int in [1, 1000]"):
        get_scheduler("lcm", original_inference_steps=2000)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "dpmpp_2m", "unipc", "lcm", "onestep"])
@pytest.mark.parametrize("key,value,needle", [
    ("prediction_type", "flow_prediction", "'epsilon', 'v_prediction', 'sample'"),
    ("beta_schedule", "sigmoid", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
])
def test_bad_common_options(name, key, value, needle):
    with raises(InvalidInput, f"{key}={value!r}", needle):
        get_scheduler(name, **{key: value})


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "unipc"])
def test_bad_timestep_spacing(name):
    with raises(InvalidInput, "timestep_spacing='middle'", "'leading', 'linspace', 'trailing'"):
        get_scheduler(name, timestep_spacing="middle")


def test_unknown_override_key_lists_valid_keys():
    with raises(InvalidInput, "unknown config key 'etaa'", "eta", "clip_sample"):
        get_scheduler("ddim", etaa=0.5)


def test_euler_ancestral_sample_prediction():
    with raises(InvalidInput, "prediction_type='sample'", "'epsilon', 'v_prediction'"):
        get_scheduler("euler_a", prediction_type="sample")


@pytest.mark.parametrize("eta", [-0.1, 1.5, "x"])
def test_ddim_eta_range(eta):
    with raises(InvalidInput, "eta must be a number in [0, 1]"):
        get_scheduler("ddim", eta=eta)


@pytest.mark.parametrize("variance_type,needle", [("learned", "predicted variance"),
                                                  ("learned_range", "predicted variance"),
                                                  ("fixed_large_log", "NaN")])
def test_ddpm_variance_types(variance_type, needle):
    with raises(InvalidInput, f"variance_type={variance_type!r}", needle, "fixed_small, fixed_small_log, fixed_large"):
        from_diffusers(diffusers.DDPMScheduler(variance_type=variance_type))


@pytest.mark.parametrize("cls,kwargs,needle", [
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True), "use_exponential_sigmas=True"),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction"),
     "timestep_type='continuous'"),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), "use_lu_lambdas=True"),
    ("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), "variance_type='learned_range'"),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "use_flow_sigmas"),
    ("UniPCMultistepScheduler", dict(use_exponential_sigmas=True), "use_exponential_sigmas=True"),
])
def test_unsupported_sigma_options(cls, kwargs, needle):
    with raises(InvalidInput, needle, "not supported by fastdiff"):
        from_diffusers(getattr(diffusers, cls)(**kwargs))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "use algorithm_type='dpmsolver++'"),
    (dict(solver_order=3), "solver_order=3"),
    (dict(solver_type="midpoint", final_sigmas_type="denoised"), "final_sigmas_type='denoised'"),
])
def test_dpm_unsupported(kwargs, needle):
    with raises(InvalidInput, needle):
        from_diffusers(dict(kwargs), class_name="DPMSolverMultistepScheduler")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(solver_order=3), "solver_order=3 is not supported"),
    (dict(predict_x0=False), "predict_x0=False"),
    (dict(solver_type="bh3"), "solver_type='bh3'"),
])
def test_unipc_unsupported(kwargs, needle):
    with raises(InvalidInput, needle):
        from_diffusers(diffusers.UniPCMultistepScheduler(**kwargs) if "bh3" not in str(kwargs) else
                       {"_class_name": "UniPCMultistepScheduler", **kwargs})


def test_unipc_solver_p_unsupported():
    with raises(InvalidInput, "solver_p"):
        from_diffusers({"_class_name": "UniPCMultistepScheduler", "solver_p": "something"})


def test_unipc_second_order_step_to_zero_sigma():
    """diffusers returns inf / NaN here (see the module docstring of fastdiff.schedulers.unipc)."""
    s = get_scheduler("unipc", lower_order_final=False)
    assert s.plan(1).num_steps == 1  # one step is first order: fine
    with raises(InvalidInput, "lower_order_final=False", "final_sigmas_type='sigma_min'"):
        s.plan(5)


@pytest.mark.parametrize("source,needle", [
    (diffusers.PNDMScheduler(), "'PNDMScheduler' is not supported"),
    ({"_class_name": "HeunDiscreteScheduler"}, "'HeunDiscreteScheduler' is not supported"),
])
def test_unsupported_diffusers_class(source, needle):
    with raises(UnknownScheduler, needle, "DDIMScheduler", "UniPCMultistepScheduler", "config="):
        from_diffusers(source)


def test_config_without_class_name():
    with raises(InvalidInput, "_class_name", "class_name="):
        from_diffusers({"beta_start": 0.001})


def test_missing_config_path(tmp_path):
    with raises(InvalidInput, "scheduler_config.json", str(tmp_path)):
        from_diffusers(tmp_path / "nowhere")


def test_broken_config_file(tmp_path):
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with raises(InvalidInput, "cannot read scheduler config"):
        get_scheduler(tmp_path)


def test_config_only_with_names():
    with raises(InvalidInput, "config= is only for scheduler names"):
        get_scheduler(get_scheduler("ddim"), config={})


def test_zero_snr_with_epsilon_divides_by_zero():
    s = get_scheduler("ddim", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    with raises(InvalidInput, "non-finite coefficient", "timestep 999", "use v_prediction"):
        s.plan(10)
    assert get_scheduler(s, prediction_type="v_prediction").plan(10).num_steps == 10


def test_steps_offset_beyond_last_timestep():
    with raises(InvalidInput, "outside [0, 999]", "steps_offset"):
        get_scheduler("ddim", steps_offset=1).plan(1000)


def test_dpm_lambda_min_clipped_trailing_too_few():
    cfg = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=0.0, timestep_spacing="trailing")
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg)
    theirs.set_timesteps(50)
    assert len(theirs.timesteps) < 50  # diffusers silently runs fewer steps
    with raises(InvalidInput, "lambda_min_clipped", f"only {len(theirs.timesteps)} timesteps for 50 steps"):
        get_scheduler("dpmpp_2m", **cfg).plan(50)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(trained_betas=[0.01] * 10), "trained_betas has 10 values"),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio must be in (0, 1]"),
    (dict(thresholding=True, sample_max_value=0.5), "sample_max_value must be >= 1"),
    (dict(num_train_timesteps=1), "num_train_timesteps must be >= 2"),
])
def test_bad_values(kwargs, needle):
    with raises(InvalidInput, needle):
        get_scheduler("ddpm", **kwargs)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(final_sigmas_type="max"), "final_sigmas_type='max'"),
    (dict(interpolation_type="cubic"), "interpolation_type='cubic'"),
])
def test_euler_bad_choices(kwargs, needle):
    with raises(InvalidInput, needle, "choose one of"):
        get_scheduler("euler", **kwargs)
