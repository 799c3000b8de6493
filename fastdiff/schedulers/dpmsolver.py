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
from fastdiff.schedulers.plan import HIST_SLOTS, StepPlan
from fastdiff.schedulers.sigmas import FINAL_SIGMAS_TYPES, SIGMA_NEUTRAL, SigmaGrid, vp_from_sigma


class DPMSolverPP(SigmaGrid):
    """diffusers' ``DPMSolverMultistepScheduler`` restricted to DPM-Solver++ of order 1 or 2.

    Args:
        num_train_timesteps (int, default 1000): number of diffusion steps the model was trained with (the length of the
            beta table); at least 2.
        beta_start (float, default 0.0001): first beta of the training schedule.
        beta_end (float, default 0.02): last beta of the training schedule.
        beta_schedule (str, default "linear"): how betas go from ``beta_start`` to ``beta_end``: ``"linear"``,
            ``"scaled_linear"`` (linear in sqrt(beta), Stable Diffusion's) or ``"squaredcos_cap_v2"`` (cosine, Nichol &
            Dhariwal; ignores the beta range). Not used when ``trained_betas`` is given.
        trained_betas (list of float or None, default None): explicit betas instead of a schedule; their number must
            equal ``num_train_timesteps``.
        prediction_type (str, default "epsilon"): what the model predicts: ``"epsilon"`` (the model predicts the noise),
            ``"v_prediction"`` (velocity, Salimans & Ho 2022) or ``"sample"`` (the model predicts x0).
        timestep_spacing (str, default "linspace"): how the inference timesteps are picked from the training ones:
            ``"linspace"``, ``"leading"`` or ``"trailing"`` (Table 2 of arXiv:2305.08891).
        steps_offset (int, default 0): added to every ``"leading"`` timestep (Stable Diffusion uses 1); other spacings
            ignore it. A grid shifted past the last training timestep is refused.
        rescale_betas_zero_snr (bool, default False): rescale the betas to zero terminal SNR (Algorithm 1 of
            arXiv:2305.08891). The terminal ``alphas_cumprod`` of 0 is replaced by ``2**-24`` so sigma stays finite, as
            in diffusers. A plan whose coefficients would be non-finite (epsilon prediction at zero SNR) is refused; use
            ``"v_prediction"`` there.
        thresholding (bool, default False): dynamic thresholding of the predicted x0 (Imagen, Saharia et al. 2022): per
            sample, s = clamp(quantile(|x0|, ratio), 1, sample_max_value) and x0 = clamp(x0, -s, s) / s. Only for
            pixel-space models.
        dynamic_thresholding_ratio (float, default 0.995): the quantile of ``thresholding``; must be in (0, 1] (fastdiff
            refuses other values, diffusers does not check).
        sample_max_value (float, default 1.0): the largest threshold s of ``thresholding``; must be >= 1 (fastdiff
            refuses smaller values, diffusers does not check).
        solver_order (int, default 2): 2 (DPM-Solver++ 2M, which uses the previous x0 prediction) or 1 (first order,
            DDIM-like). fastdiff refuses 3 (diffusers' order for unconditional sampling).
        algorithm_type (str, default "dpmsolver++"): only ``"dpmsolver++"``; fastdiff refuses the noise-drawing
            ``"sde-dpmsolver++"`` / ``"sde-dpmsolver"`` and the deprecated ``"dpmsolver"``. ``"deis"`` is mapped to
            ``"dpmsolver++"``, as diffusers does.
        solver_type (str, default "midpoint"): the second-order update, ``"midpoint"`` or ``"heun"``; ``"logrho"``,
            ``"bh1"`` and ``"bh2"`` are mapped to ``"midpoint"``, as diffusers does.
        lower_order_final (bool, default True): take a first-order last step when there are fewer than 15 steps
            (steadier for few steps).
        euler_at_final (bool, default False): always take a first-order last step.
        use_karras_sigmas (bool, default False): Karras et al. (2022) noise levels (rho = 7) between sigma_min and
            sigma_max instead of the training sigmas at the spaced timesteps; timesteps are mapped back from them.
        final_sigmas_type (str, default "zero"): the noise level after the last step: ``"zero"`` (the last step returns
            the x0 prediction) or ``"sigma_min"`` (the training schedule's smallest sigma; with Karras sigmas the last
            step then goes from sigma_min to sigma_min and is the identity).
        lambda_min_clipped (float, default -inf): clip the log-SNR lambda from below: timesteps whose lambda is smaller
            are left out of the grid (diffusers' fix for the cosine schedule).
        use_exponential_sigmas (bool, only False): diffusers' exponential noise levels; not implemented, so fastdiff
            refuses True.
        use_beta_sigmas (bool, only False): diffusers' beta-distributed noise levels; not implemented, refused.
        use_flow_sigmas (bool, only False): flow-matching noise levels (with diffusers' ``flow_shift``); not
            implemented, refused. ``from_diffusers`` drops ``flow_shift`` and ``time_shift_type``, which only act with
            flow sigmas / dynamic shifting.
        use_dynamic_shifting (bool, only False): resolution-dependent timestep shifting; not implemented, refused.
        use_lu_lambdas (bool, only False): noise levels uniform in lambda (Lu et al.); not implemented, refused.
        variance_type (str or None, only None): ``"learned"`` / ``"learned_range"`` (models that also predict a
            variance) are not supported, refused.
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
