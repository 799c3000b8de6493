"""Hostile scheduler configs (dicts, keyword overrides, scheduler_config.json files): each is refused with a typed
error naming the key, instead of a TypeError from the noise-schedule math or a silent coercion."""

from __future__ import annotations

import numpy as np
import pytest

from fastdiff.errors import InvalidInput
from fastdiff.schedulers import from_diffusers, get_scheduler

DDIM = {"_class_name": "DDIMScheduler"}

# (id, config dict for from_diffusers, message fragment)
DICT_CASES = [
    ("beta_start string", {**DDIM, "beta_start": "abc"}, "'beta_start' must be a number, got 'abc'"),
    ("beta_end None", {**DDIM, "beta_end": None}, "'beta_end' must be a number, got None"),
    ("beta_start bool", {**DDIM, "beta_start": True}, "'beta_start' must be a number, got True"),
    ("timesteps string", {**DDIM, "num_train_timesteps": "1000"}, "'num_train_timesteps' must be an integer"),
    ("timesteps float", {**DDIM, "num_train_timesteps": 1000.5}, "'num_train_timesteps' must be an integer"),
    ("clip_sample string", {**DDIM, "clip_sample": "no"}, "'clip_sample' must be true or false"),
    ("steps_offset bool", {**DDIM, "steps_offset": True}, "'steps_offset' must be an integer"),
    ("solver_order string", {"_class_name": "DPMSolverMultistepScheduler", "solver_order": "2"},
     "solver_order='2' is not supported"),  # the scheduler's own check speaks first
]


@pytest.mark.parametrize("config,needle", [c[1:] for c in DICT_CASES], ids=[c[0] for c in DICT_CASES])
def test_config_values(config, needle):
    with pytest.raises(InvalidInput) as e:
        from_diffusers(config)
    assert needle in str(e.value)


def test_overrides_are_checked_too():
    with pytest.raises(InvalidInput, match="'beta_start' must be a number"):
        get_scheduler("euler", beta_start="0.0001")


def test_real_numbers_of_other_types_are_accepted():
    s = from_diffusers({**DDIM, "num_train_timesteps": np.int64(500), "clip_sample_range": 2})
    assert s.plan(5).timesteps.shape[0] == 5


@pytest.mark.parametrize("text,needle", [("[1, 2]", "must hold a JSON object"), ('"ddim"', "must hold a JSON object"),
                                         ("{not json", "cannot read scheduler config"),
                                         ('{"_class_name": "DDIMScheduler", "beta_start": "x"}', "'beta_start'")],
                         ids=["list", "string", "not json", "bad value"])
def test_config_files(tmp_path, text, needle):
    path = tmp_path / "scheduler_config.json"
    path.write_text(text)
    for source in (path, tmp_path):  # the file, and the folder holding it
        with pytest.raises(InvalidInput) as e:
            get_scheduler(str(source))
        assert needle in str(e.value)
    with pytest.raises(InvalidInput):
        get_scheduler("ddim", config=str(path))
