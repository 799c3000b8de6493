"""Euler and Euler-ancestral (Karras et al., 2022, k-diffusion), as diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler``.

These hold the sample in sigma form, ``x = x0 + sigma * eps`` (so ``init_noise_sigma`` is sigma_max), and feed the
model ``x / sqrt(sigma^2 + 1)``. With ``d = (x - x0) / sigma``::

    Euler:            prev = x + d * (sigma_next - sigma)
    Euler-ancestral:  sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
                      sigma_down = sqrt(sigma_next^2 - sigma_up^2),
                      prev = x + d * (sigma_down - sigma) + sigma_up * z          (z drawn at every step)

and x0 = x - sigma m (epsilon), m * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1) (v), m (sample; Euler only).
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import COMMON_DEFAULTS, Rows, Scheduler
from fastdiff.schedulers.betas import (
    alphas_cumprod_f32,
    karras_sigmas,
    sigma_table_f32,
    sigma_to_t,
    timestep_grid,
)
from fastdiff.schedulers.docs import SIGMA_NOTES, documented
from fastdiff.schedulers.plan import StepPlan
from fastdiff.schedulers.sigmas import FINAL_SIGMAS_TYPES


def sigma_x0_coefs(prediction_type: str, sigma: float) -> tuple[float, float]:
    """(PX, PM) with x0 = PX x + PM m for a sigma-form sample x = x0 + sigma eps."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    return 0.0, 1.0


class _SigmaScheduler(Scheduler):
    """Shared timestep / sigma construction of the two Euler schedulers."""

    def _grid(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps (n,) float32, sigmas (n,) float64 interpolated in the float32 sigma table) as diffusers'
        set_timesteps builds them (before the final sigma is appended and everything is rounded to float32)."""
        T = self["num_train_timesteps"]
        ts = timestep_grid(self["timestep_spacing"], T, n, self["steps_offset"], float32=True)
        self._check_timesteps(ts)
        table = sigma_table_f32(self._config)
        return ts, np.interp(ts, np.arange(0, len(table)), table)

    def _init_sigma(self, sigmas: np.ndarray) -> float:
        smax = float(sigmas.max())
        if self["timestep_spacing"] in ("linspace", "trailing"):
            return smax
        # float32 like diffusers: (max_sigma ** 2 + 1) ** 0.5 on a float32 tensor
        return float(np.sqrt(np.float32(smax) ** 2 + np.float32(1)))

    def _euler_plan(self, ts: np.ndarray, sigmas: np.ndarray, ancestral: bool) -> StepPlan:
        n = len(ts)
        s = sigmas.astype(np.float64)
        rows = Rows(n)
        for i in range(n):
            sig, nxt = s[i], s[i + 1]
            px, pm = sigma_x0_coefs(self["prediction_type"], sig)
            if ancestral:
                up = math.sqrt(nxt**2 * (sig**2 - nxt**2) / sig**2)
                target, noise = math.sqrt(max(nxt**2 - up**2, 0.0)), up
            else:
                target, noise = nxt, 0.0
            # prev = x + (x - x0) / sig * (target - sig) = (target / sig) x + (1 - target / sig) x0
            out = {"x": target / sig, "x0": 1.0 - target / sig, "noise": noise}
            in_next = 1.0 / math.sqrt(nxt**2 + 1) if i + 1 < n else 1.0
            rows.set(i, px, pm, out, in_next=in_next, noise=ancestral)
        return self._make_plan(ts, rows, timestep_dtype="float32", init_noise_sigma=self._init_sigma(sigmas),
                               input_scale0=1.0 / math.sqrt(s[0] ** 2 + 1))


@documented(keys={
    "interpolation_type": (
        "str", 'how sigmas are read off the training table at the spaced timesteps: ``"linear"`` (interpolated at '
        'each timestep) or ``"log_linear"`` (evenly spaced in log sigma from the largest to the smallest training '
        "sigma)."),
    "timestep_type": (
        "str", 'diffusers\' ``"continuous"`` timesteps (v-prediction EDM models) are not implemented, refused.'),
}, notes={
    **SIGMA_NOTES,
    "sigma_min": "None: the smallest sigma of the spaced (or log_linear) grid.",
    "sigma_max": "None: the largest sigma of the spaced (or log_linear) grid.",
})
class Euler(_SigmaScheduler):
    """diffusers' ``EulerDiscreteScheduler`` (linear / log_linear interpolation, Karras sigmas, final sigma zero
    or sigma_min).

    Args:
        {args}
    """

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
                "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero"}
    NEUTRAL = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "timestep_type": "discrete"}

    def validate(self) -> None:
        self._choice("interpolation_type", ("linear", "log_linear"))
        self._choice("final_sigmas_type", FINAL_SIGMAS_TYPES)

    def _plan(self, n: int) -> StepPlan:
        ts, sig = self._grid(n)
        table = sigma_table_f32(self._config)
        if self["interpolation_type"] == "log_linear":
            import torch

            # diffusers: torch.linspace(log(sigma_T), log(sigma_0), n + 1).exp(), i.e. n + 1 sigmas for n steps
            # plus the final one; only the first n + 1 are ever read.
            sig = torch.linspace(np.log(table[-1]), np.log(table[0]), n + 1).exp().numpy().astype(np.float64)
        if self["use_karras_sigmas"]:
            smin = self["sigma_min"] if self["sigma_min"] is not None else float(sig[-1])
            smax = self["sigma_max"] if self["sigma_max"] is not None else float(sig[0])
            sig = karras_sigmas(smin, smax, n)
            ts = np.array([sigma_to_t(x, np.log(table)) for x in sig]).astype(np.float32)
        if self["final_sigmas_type"] == "sigma_min":
            ac = alphas_cumprod_f32(self._config, terminal_floor=True)
            last = float(((1 - ac[0]) / ac[0]) ** 0.5)
        else:
            last = 0.0
        sigmas = np.concatenate([sig, [last]]).astype(np.float32)
        return self._euler_plan(ts, sigmas, ancestral=False)


@documented(keys={
    "prediction_type": (
        "str", 'what the model predicts: ``"epsilon"`` or ``"v_prediction"``. ``"sample"`` is refused (diffusers '
        "raises NotImplementedError for it in ``step()``)."),
}, notes=SIGMA_NOTES)
class EulerAncestral(_SigmaScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` (epsilon or v prediction).

    Args:
        {args}
    """

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, "timestep_spacing": "linspace"}
    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def validate(self) -> None:
        if self["prediction_type"] not in self.PREDICTION_TYPES:  # pragma: no cover - caught by _choice
            raise InvalidInput(f"{self.label()}: prediction_type 'sample' is not supported")

    def _plan(self, n: int) -> StepPlan:
        ts, sig = self._grid(n)
        return self._euler_plan(ts, np.concatenate([sig, [0.0]]).astype(np.float32), ancestral=True)
