"""Latent Consistency Model multistep sampling (Luo et al., 2023), as diffusers' ``LCMScheduler``.

Timesteps are picked from the ``original_inference_steps`` grid ``t_k = k * (T // original) - 1`` (``timestep_spacing``
and ``steps_offset`` are not used). With ``c_skip = 0.25 / ((10 t)^2 + 0.25)`` and ``c_out = 10 t /
sqrt((10 t)^2 + 0.25)`` (``timestep_scaling`` = 10)::

    denoised = c_out * x0 + c_skip * x
    prev     = sqrt(abar_next) denoised + sqrt(1 - abar_next) z     (z drawn at every step but the last)
    prev     = denoised                                             (last step)
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import CLIP_DEFAULTS, COMMON_DEFAULTS, THRESHOLD_DEFAULTS, Rows, Scheduler, x0_coefs
from fastdiff.schedulers.betas import alphas_cumprod
from fastdiff.schedulers.docs import documented
from fastdiff.schedulers.plan import StepPlan


@documented(keys={
    "steps_offset": (
        "int", 'added to every ``"leading"`` timestep in the other schedulers. LCM ignores both this and '
        "``timestep_spacing``: its timesteps come from the ``original_inference_steps`` grid, as in diffusers."),
    "original_inference_steps": (
        "int", "the size of the timestep grid the model was distilled on, t_k = k * (num_train_timesteps // "
        "original_inference_steps) - 1; an int in [1, num_train_timesteps], and the most inference steps the "
        "scheduler allows."),
    "timestep_scaling": (
        "float", "t is multiplied by this in the consistency boundary conditions c_skip = 0.25 / ((s t)^2 + 0.25), "
        "c_out = s t / sqrt((s t)^2 + 0.25)."),
})
class LCM(Scheduler):
    """diffusers' ``LCMScheduler``.

    Args:
        {args}
    """

    name = "lcm"
    diffusers_class = "LCMScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, **CLIP_DEFAULTS, **THRESHOLD_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "original_inference_steps": 50, "clip_sample": False,
                "set_alpha_to_one": True, "timestep_scaling": 10.0}

    def validate(self) -> None:
        orig, T = self["original_inference_steps"], self["num_train_timesteps"]
        if not (isinstance(orig, (int, np.integer)) and 1 <= orig <= T):
            raise InvalidInput(f"{self.label()}: original_inference_steps must be an int in [1, {T}], got {orig!r}")

    @property
    def max_steps(self) -> int:
        return int(self["original_inference_steps"])

    def _max_steps_reason(self) -> str:
        return (f" (LCM picks its timesteps from original_inference_steps={self['original_inference_steps']}; "
                "raise that to use more steps)")

    def timesteps(self, n: int) -> np.ndarray:
        """(n,) int64: n of the ``original_inference_steps`` grid points, evenly by index, descending."""
        orig, T = self["original_inference_steps"], self["num_train_timesteps"]
        grid = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
        return grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)].astype(np.int64)

    def _plan(self, n: int) -> StepPlan:
        ac = alphas_cumprod(self._config)
        ts = self.timesteps(n)
        final = 1.0 if self["set_alpha_to_one"] else ac[0]
        rows = Rows(n)
        for i, t in enumerate(ts):
            a = ac[t]
            px, pm = x0_coefs(self["prediction_type"], math.sqrt(a), math.sqrt(1 - a))
            st = float(t) * float(self["timestep_scaling"])
            c_skip = 0.25 / (st**2 + 0.25)
            c_out = st / math.sqrt(st**2 + 0.25)
            last = i == n - 1
            if last:
                out = {"x0": c_out, "x": c_skip}
            else:
                t_n = ts[i + 1]
                a_n = ac[t_n] if t_n >= 0 else final
                out = {"x0": math.sqrt(a_n) * c_out, "x": math.sqrt(a_n) * c_skip, "noise": math.sqrt(1 - a_n)}
            rows.set(i, px, pm, out, noise=not last)
        return self._make_plan(ts, rows)
