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
from fastdiff.schedulers.plan import StepPlan

_NOT_HERE = ("timestep_spacing", "steps_offset")


class OneStep(Scheduler):
    """One step at t = T - 1 returning the x0 prediction.

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
        prediction_type (str, default "sample"): what the model predicts: ``"epsilon"`` (the model predicts the noise),
            ``"v_prediction"`` (velocity, Salimans & Ho 2022) or ``"sample"`` (the model predicts x0). The default is
            ``"sample"`` (distilled one-step models predict x0), where diffusers' DDIMScheduler defaults to
            ``"epsilon"``.
        rescale_betas_zero_snr (bool, default False): rescale the betas to zero terminal SNR (Algorithm 1 of
            arXiv:2305.08891). A plan whose coefficients would be non-finite (epsilon prediction at zero SNR) is
            refused; use ``"v_prediction"`` there.
        clip_sample (bool, default False): clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]``
            (overridden by ``thresholding``). Off here, where diffusers' DDIMScheduler defaults to True.
        clip_sample_range (float, default 1.0): the bound of ``clip_sample``.
        thresholding (bool, default False): dynamic thresholding of the predicted x0 (Imagen, Saharia et al. 2022): per
            sample, s = clamp(quantile(|x0|, ratio), 1, sample_max_value) and x0 = clamp(x0, -s, s) / s. Only for
            pixel-space models; wins over ``clip_sample``.
        dynamic_thresholding_ratio (float, default 0.995): the quantile of ``thresholding``; must be in (0, 1] (fastdiff
            refuses other values, diffusers does not check).
        sample_max_value (float, default 1.0): the largest threshold s of ``thresholding``; must be >= 1 (fastdiff
            refuses smaller values, diffusers does not check).

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
