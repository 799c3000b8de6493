"""The sigma grid shared by the multistep solvers (DPM-Solver++, UniPC).

Both hold the sample in VP form and step between noise levels given as sigmas ``s`` (``x = alpha (x0 + s eps)``
with ``alpha = 1/sqrt(s^2 + 1)``, ``sig = s * alpha``, ``lambda = log(alpha / sig) = -log s``). Their grids are
built alike: ``n + 1``-point timestep spacing, optional Karras sigmas, and a final sigma of zero or sigma_min.
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import Scheduler
from fastdiff.schedulers.betas import alphas_cumprod_f32, karras_sigmas, sigma_table_f32, sigma_to_t, timestep_grid

# The noise level after the last step: 0 (the last step returns x0) or the training schedule's smallest sigma.
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Options whose non-default values change the noise levels in ways we do not implement.
SIGMA_NEUTRAL = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
                 "use_dynamic_shifting": False}


def vp_from_sigma(s: float) -> tuple[float, float, float]:
    """(alpha, sig, lambda) of the VP process at sigma-form noise level s (s = 0 gives lambda = +inf)."""
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    return alpha, s * alpha, (-math.log(s) if s > 0 else math.inf)


class SigmaGrid(Scheduler):
    """Timesteps and sigmas shared by the multistep solvers (DPM-Solver++, UniPC): n + 1-point spacing, optional
    Karras sigmas, final sigma zero or sigma_min."""

    def _last_timestep(self) -> int:
        return self["num_train_timesteps"]

    def _karras_last(self, sig: np.ndarray, ac) -> float:
        return float(((1 - ac[0]) / ac[0]) ** 0.5)

    def sigma_grid(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps (n,) int64, sigmas (n + 1,) float32), as diffusers' set_timesteps builds them."""
        cfg = self._config
        T = cfg["num_train_timesteps"]
        ts = timestep_grid(cfg["timestep_spacing"], T, n, cfg["steps_offset"], plus_one=True,
                           last_timestep=self._last_timestep())
        if len(ts) != n:
            raise InvalidInput(f"{self.label()}: timestep_spacing='trailing' with lambda_min_clipped gives only "
                               f"{len(ts)} timesteps for {n} steps; use another spacing or fewer steps")
        self._check_timesteps(ts)
        table = sigma_table_f32(cfg)
        ac = alphas_cumprod_f32(cfg, terminal_floor=True)
        if cfg["use_karras_sigmas"]:
            smin = cfg.get("sigma_min")
            smax = cfg.get("sigma_max")
            sig = karras_sigmas(float(table[0]) if smin is None else smin, float(table[-1]) if smax is None else smax,
                                n)
            t = np.array([sigma_to_t(x, np.log(table)) for x in sig])
            # diffusers rounds Karras timesteps except for the cosine schedule, where they are truncated to int.
            ts = (t if self._karras_no_round() else t.round()).astype(np.int64)
            last = self._karras_last(sig, ac) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sig = np.interp(ts, np.arange(0, len(table)), table)
            last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sig, [last]]).astype(np.float32)
        # Karras grids with final_sigmas_type="sigma_min" end on sigma_min twice: that last step is the identity.
        if not ((np.diff(sigmas[:-1].astype(np.float64)) < 0).all() and sigmas[-1] <= sigmas[-2]):
            raise InvalidInput(f"{self.label()}: {n} steps with timestep_spacing={cfg['timestep_spacing']!r} repeat a "
                               f"noise level, which makes the multistep solver divide by zero; use fewer steps")
        return ts, sigmas

    def _karras_no_round(self) -> bool:
        return False

    @property
    def max_steps(self) -> int:
        # n + 1-point linspace / leading grids over [0, last) stay strictly decreasing up to n = last - 1.
        if self["use_karras_sigmas"] or self["timestep_spacing"] == "trailing":
            return self["num_train_timesteps"]
        return self._last_timestep() - 1
