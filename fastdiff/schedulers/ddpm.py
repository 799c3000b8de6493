"""DDPM (Ho et al., 2020) ancestral sampling, as diffusers' ``DDPMScheduler``.

With ``abar_t`` = alphas_cumprod[t], ``abar_p`` = alphas_cumprod[prev_t] (1 past the end), ``alpha_t`` =
abar_t / abar_p and ``beta_t = 1 - alpha_t``, one step is the posterior mean q(x_prev | x_t, x0) plus noise::

    prev = sqrt(abar_p) beta_t / (1 - abar_t) * x0  +  sqrt(alpha_t) (1 - abar_p) / (1 - abar_t) * x  +  std * z

with ``std^2 = max((1 - abar_p) / (1 - abar_t) * beta_t, 1e-20)`` ("fixed_small", also "fixed_small_log") or
``beta_t`` ("fixed_large"). Noise is drawn at every step whose timestep is > 0.
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import CLIP_DEFAULTS, COMMON_DEFAULTS, THRESHOLD_DEFAULTS, Rows, Scheduler, x0_coefs
from fastdiff.schedulers.betas import alphas_cumprod, timestep_grid
from fastdiff.schedulers.docs import documented
from fastdiff.schedulers.plan import StepPlan

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@documented(keys={
    "variance_type": (
        "str", 'the variance of the added noise: ``"fixed_small"`` (the posterior variance, floored at 1e-20), '
        '``"fixed_small_log"`` (the same numbers here) or ``"fixed_large"`` (beta_t). fastdiff refuses '
        '``"learned"`` / ``"learned_range"`` (they need the model\'s predicted variance) and ``"fixed_large_log"`` '
        "(diffusers computes NaN there)."),
})
class DDPM(Scheduler):
    """diffusers' ``DDPMScheduler`` (variance types fixed_small, fixed_small_log, fixed_large).

    Args:
        {args}
    """

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, **CLIP_DEFAULTS, **THRESHOLD_DEFAULTS, "variance_type": "fixed_small"}

    def validate(self) -> None:
        vt = self["variance_type"]
        if vt not in VARIANCE_TYPES:
            raise InvalidInput(
                f"{self.label()}: variance_type={vt!r} is not supported ("
                + ("it needs the model's predicted variance" if str(vt).startswith("learned") else
                   "diffusers takes sqrt(log(beta)) there, which is NaN")
                + f"); choose one of {', '.join(VARIANCE_TYPES)}")

    def _plan(self, n: int) -> StepPlan:
        ac = alphas_cumprod(self._config)
        ts = timestep_grid(self["timestep_spacing"], self["num_train_timesteps"], n, self["steps_offset"])
        self._check_timesteps(ts)
        rows = Rows(n)
        for i, t in enumerate(ts):
            # diffusers finds the previous timestep through the first index holding t (matters only if t repeats).
            j = int(np.nonzero(ts == t)[0][0])
            prev_t = int(ts[j + 1]) if j + 1 < n else -1
            a_t = ac[t]
            a_p = ac[prev_t] if prev_t >= 0 else 1.0
            alpha_t = a_t / a_p
            beta_t = 1 - alpha_t
            b_t, b_p = 1 - a_t, 1 - a_p
            if self["variance_type"] == "fixed_large":
                std = math.sqrt(beta_t)
            else:
                std = math.sqrt(max(b_p / b_t * beta_t, 1e-20))
            px, pm = x0_coefs(self["prediction_type"], math.sqrt(a_t), math.sqrt(b_t))
            noise = bool(t > 0)
            out = {"x0": math.sqrt(a_p) * beta_t / b_t, "x": math.sqrt(alpha_t) * b_p / b_t,
                   "noise": std if noise else 0.0}
            rows.set(i, px, pm, out, noise=noise)
        return self._make_plan(ts, rows)
