"""DPM-Solver++ (2M) (Lu et al., 2022), as diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"`` and ``solver_order`` 1 or 2.

On sigmas ``s_i`` (``x = alpha (x0 + s eps)`` with ``alpha = 1/sqrt(s^2 + 1)``, ``sig = s * alpha``,
``lambda = log(alpha / sig) = -log s``), step i from s_i to s_{i+1} with ``h = lambda_{i+1} - lambda_i`` and
``A = alpha_{i+1} (1 - e^{-h})``::

    first order:  prev = (sig_{i+1} / sig_i) x + A x0_i
    second order: D1 = (x0_i - x0_{i-1}) / r,  r = (lambda_i - lambda_{i-1}) / h
                  midpoint: prev = first order + A / 2 * D1
                  heun:     prev = first order + alpha_{i+1} ((e^{-h} - 1) / h + 1) * D1

Earlier x0 predictions live in the plan's history ring (step i writes slot i % 3). The first step is first order;
the last is first order when ``euler_at_final``, or ``lower_order_final`` with fewer than 15 steps, or when the
final sigma is zero (then prev = x0).
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import COMMON_DEFAULTS, THRESHOLD_DEFAULTS, Rows, x0_coefs
from fastdiff.schedulers.betas import alphas_cumprod_f32
from fastdiff.schedulers.docs import SIGMA_NOTES, documented
from fastdiff.schedulers.plan import HIST_SLOTS, StepPlan
from fastdiff.schedulers.sigmas import FINAL_SIGMAS_TYPES, SIGMA_NEUTRAL, SigmaGrid, vp_from_sigma


@documented(keys={
    "solver_order": (
        "int", "2 (DPM-Solver++ 2M, which uses the previous x0 prediction) or 1 (first order, DDIM-like). fastdiff "
        "refuses 3 (diffusers' order for unconditional sampling)."),
    "algorithm_type": (
        "str", 'only ``"dpmsolver++"``; fastdiff refuses the noise-drawing ``"sde-dpmsolver++"`` / '
        '``"sde-dpmsolver"`` and the deprecated ``"dpmsolver"``. ``"deis"`` is mapped to ``"dpmsolver++"``, as '
        "diffusers does."),
    "solver_type": (
        "str", 'the second-order update, ``"midpoint"`` or ``"heun"``; ``"logrho"``, ``"bh1"`` and ``"bh2"`` are '
        'mapped to ``"midpoint"``, as diffusers does.'),
    "lower_order_final": (
        "bool", "take a first-order last step when there are fewer than 15 steps (steadier for few steps)."),
    "euler_at_final": ("bool", "always take a first-order last step."),
    "lambda_min_clipped": (
        "float", "clip the log-SNR lambda from below: timesteps whose lambda is smaller are left out of the grid "
        "(diffusers' fix for the cosine schedule)."),
    "use_lu_lambdas": ("bool", "noise levels uniform in lambda (Lu et al.); not implemented, refused."),
    "variance_type": (
        "str or None", '``"learned"`` / ``"learned_range"`` (models that also predict a variance) are not supported, '
        "refused."),
}, notes={
    **SIGMA_NOTES,
    "final_sigmas_type": "With Karras sigmas the last step then goes from sigma_min to sigma_min and is the "
                         "identity.",
})
class DPMSolverPP(SigmaGrid):
    """diffusers' ``DPMSolverMultistepScheduler`` restricted to DPM-Solver++ of order 1 or 2.

    Args:
        {args}
    """

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, **THRESHOLD_DEFAULTS, "timestep_spacing": "linspace", "solver_order": 2,
                "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                "euler_at_final": False, "use_karras_sigmas": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -math.inf}
    NEUTRAL = {**SIGMA_NEUTRAL, "use_lu_lambdas": False, "variance_type": None}

    def __init__(self, config: dict | None = None, *, name: str | None = None, **overrides):
        merged = {**(config or {}), **overrides}
        # diffusers silently maps these legacy values (see DPMSolverMultistepScheduler.__init__); so do we.
        if merged.get("algorithm_type") == "deis":
            merged["algorithm_type"] = "dpmsolver++"
        if merged.get("solver_type") in ("logrho", "bh1", "bh2"):
            merged["solver_type"] = "midpoint"
        super().__init__(merged, name=name)
        # the canonical name follows the config, so dpmpp_2m + use_karras_sigmas=True is dpmpp_2m_karras
        self.name = "dpmpp_2m_karras" if self["use_karras_sigmas"] else "dpmpp_2m"

    def validate(self) -> None:
        if self["algorithm_type"] != "dpmsolver++":
            raise InvalidInput(f"{self.label()}: algorithm_type={self['algorithm_type']!r} is not supported (the "
                               "SDE variants draw noise, 'dpmsolver' is deprecated); use algorithm_type='dpmsolver++'")
        if self["solver_order"] not in (1, 2):
            raise InvalidInput(f"{self.label()}: solver_order={self['solver_order']!r} is not supported; use "
                               "solver_order=2 (DPM-Solver++ 2M) or 1")
        self._choice("solver_type", ("midpoint", "heun"))
        self._choice("final_sigmas_type", FINAL_SIGMAS_TYPES)

    def _last_timestep(self) -> int:
        import torch

        lam = float(self["lambda_min_clipped"])
        if lam == -math.inf:
            return self["num_train_timesteps"]
        ac = alphas_cumprod_f32(self._config, terminal_floor=True)
        lam_t = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
        clipped = int(torch.searchsorted(torch.flip(lam_t, [0]), lam))
        return self["num_train_timesteps"] - clipped

    def _karras_no_round(self) -> bool:
        return self["beta_schedule"] == "squaredcos_cap_v2"

    def _plan(self, n: int) -> StepPlan:
        ts, sigmas = self.sigma_grid(n)
        s = sigmas.astype(np.float64)
        cfg = self._config
        order2 = cfg["solver_order"] == 2
        first_last = (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                      or cfg["final_sigmas_type"] == "zero")
        rows = Rows(n)
        for i in range(n):
            a0, sg0, l0 = vp_from_sigma(s[i])
            a1, sg1, l1 = vp_from_sigma(s[i + 1])
            px, pm = x0_coefs(cfg["prediction_type"], a0, sg0)
            # A = alpha_{i+1} (1 - e^{-h}); e^{-h} = s_{i+1} / s_i exactly (lambda = -log s).
            ratio = s[i + 1] / s[i]
            A = a1 * (1.0 - ratio)
            out: dict = {"x": sg1 / sg0, "x0": A}
            second = order2 and i > 0 and not (i == n - 1 and first_last)
            if s[i + 1] == s[i]:
                # h = 0 (Karras + sigma_min: last step from sigma_min to sigma_min): prev = x. diffusers' heun
                # update evaluates (e^{-h} - 1) / h there and returns NaN; the h -> 0 limit is the identity.
                out, second = {"x": 1.0}, False
            if second:
                h = l1 - l0
                r = (l0 - vp_from_sigma(s[i - 1])[2]) / h
                if cfg["solver_type"] == "midpoint":
                    k = 0.5 * A
                else:
                    k = a1 * (math.expm1(-h) / h + 1.0)
                # k * D1 = k / r * (x0_i - x0_{i-1})
                out["x0"] += k / r
                out[(i - 1) % HIST_SLOTS] = -k / r
            write = order2 and i < n - 1
            rows.set(i, px, pm, out, wslot=i % HIST_SLOTS if write else -1)
        return self._make_plan(ts, rows)
