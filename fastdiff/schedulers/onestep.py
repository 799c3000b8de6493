"""One-step sampling for distilled models (SD-Turbo-like, consistency / adversarially distilled).

A single model call at the last training timestep ``t = T - 1``; the result is the model's x0 prediction::

    prev = x0 = PX x + PM m        (prediction_type "sample" by default: prev = m)

This equals diffusers' ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)`` at one step (its
previous alpha is then 1, so the DDIM update returns x0), which is what ``to_diffusers()`` gives. For the
Euler-ancestral one-step setting (SD-Turbo's own scheduler) use ``"onestep_euler_a"``.
"""

from __future__ import annotations

import math

from fastdiff.schedulers.base import CLIP_DEFAULTS, COMMON_DEFAULTS, THRESHOLD_DEFAULTS, Rows, Scheduler, x0_coefs
from fastdiff.schedulers.betas import alphas_cumprod
from fastdiff.schedulers.docs import documented
from fastdiff.schedulers.plan import StepPlan

_NOT_HERE = ("timestep_spacing", "steps_offset")


@documented(notes={
    "prediction_type": 'The default is ``"sample"`` (distilled one-step models predict x0), where diffusers\' '
                       'DDIMScheduler defaults to ``"epsilon"``.',
    "clip_sample": "Off here, where diffusers' DDIMScheduler defaults to True.",
})
class OneStep(Scheduler):
    """One step at t = T - 1 returning the x0 prediction.

    Args:
        {args}

    There is no ``timestep_spacing``, ``steps_offset`` or ``set_alpha_to_one``: the one step is fixed, and
    :meth:`diffusers_config` sets them to the DDIM values that reproduce it.
    """

    name = "onestep"
    diffusers_class = "DDIMScheduler"
    DEFAULTS = {**{k: v for k, v in COMMON_DEFAULTS.items() if k not in _NOT_HERE}, **CLIP_DEFAULTS,
                **THRESHOLD_DEFAULTS, "prediction_type": "sample", "clip_sample": False}

    @property
    def max_steps(self) -> int:
        return 1

    def _max_steps_reason(self) -> str:
        return " (a one-step scheduler; for a few steps use 'lcm' or 'euler_a' with timestep_spacing='trailing')"

    def _plan(self, n: int) -> StepPlan:
        t = self["num_train_timesteps"] - 1
        a = alphas_cumprod(self._config)[t]
        px, pm = x0_coefs(self["prediction_type"], math.sqrt(a), math.sqrt(1 - a))
        rows = Rows(1)
        rows.set(0, px, pm, {"x0": 1.0})
        return self._make_plan([t], rows)

    def diffusers_config(self) -> dict:
        return {**super().diffusers_config(), "timestep_spacing": "trailing", "set_alpha_to_one": True,
                "steps_offset": 0}
