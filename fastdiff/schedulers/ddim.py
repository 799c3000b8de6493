"""DDIM (Song et al., 2021), as diffusers' ``DDIMScheduler`` with its ``step(eta=..., use_clipped_model_output=...)``.

With ``a = abar_t``, ``a_p = abar_{t - T//n}`` (``final_alpha_cumprod`` = 1 or abar_0 past the start)::

    eps  = model epsilon (from the unclipped x0), or (x - sqrt(a) x0c) / sqrt(1 - a) with use_clipped_model_output
    var  = (1 - a_p) / (1 - a) * (1 - a / a_p);   std = eta * sqrt(var)
    prev = sqrt(a_p) x0c + sqrt(1 - a_p - std^2) eps + std z          (z drawn whenever eta > 0)

Note diffusers' previous timestep is always ``t - T // n``, whatever the spacing (also for trailing / linspace,
where it is not the next timestep of the grid). We do the same.
"""

from __future__ import annotations

import math

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import CLIP_DEFAULTS, COMMON_DEFAULTS, THRESHOLD_DEFAULTS, Rows, Scheduler, x0_coefs
from fastdiff.schedulers.betas import alphas_cumprod, timestep_grid
from fastdiff.schedulers.plan import StepPlan


def eps_coefs(prediction_type: str, sa: float, sb: float) -> tuple[float, float]:
    """(EX, EM) with the model's epsilon = EX * x + EM * m, where x = sa * x0 + sb * eps."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sb, sa
    return 1.0 / sb, -sa / sb


def ddim_update(prediction_type: str, a: float, a_p: float, std: float, use_clipped: bool) -> dict:
    """The DDIM update ``prev`` as {term: coefficient} over x, m, x0 (x0 = the possibly clipped x0)."""
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    c_dir = math.sqrt(1 - a_p - std**2) if 1 - a_p - std**2 >= 0 else math.nan
    out = {"x0": math.sqrt(a_p)}
    if use_clipped:
        out["x"] = c_dir / sb
        out["x0"] -= c_dir * sa / sb
    else:
        ex, em = eps_coefs(prediction_type, sa, sb)
        out["x"], out["m"] = c_dir * ex, c_dir * em
    return out


class DDIM(Scheduler):
    """diffusers' ``DDIMScheduler``; ``eta`` and ``use_clipped_model_output`` are its step() arguments.

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
        timestep_spacing (str, default "leading"): how the inference timesteps are picked from the training ones:
            ``"linspace"``, ``"leading"`` or ``"trailing"`` (Table 2 of arXiv:2305.08891).
        steps_offset (int, default 0): added to every ``"leading"`` timestep (Stable Diffusion uses 1); other spacings
            ignore it. A grid shifted past the last training timestep is refused.
        rescale_betas_zero_snr (bool, default False): rescale the betas to zero terminal SNR (Algorithm 1 of
            arXiv:2305.08891). A plan whose coefficients would be non-finite (epsilon prediction at zero SNR) is
            refused; use ``"v_prediction"`` there.
        clip_sample (bool, default True): clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]``
            (overridden by ``thresholding``).
        clip_sample_range (float, default 1.0): the bound of ``clip_sample``.
        thresholding (bool, default False): dynamic thresholding of the predicted x0 (Imagen, Saharia et al. 2022): per
            sample, s = clamp(quantile(|x0|, ratio), 1, sample_max_value) and x0 = clamp(x0, -s, s) / s. Only for
            pixel-space models; wins over ``clip_sample``.
        dynamic_thresholding_ratio (float, default 0.995): the quantile of ``thresholding``; must be in (0, 1] (fastdiff
            refuses other values, diffusers does not check).
        sample_max_value (float, default 1.0): the largest threshold s of ``thresholding``; must be >= 1 (fastdiff
            refuses smaller values, diffusers does not check).
        set_alpha_to_one (bool, default True): the "previous" alphas_cumprod of the last step: 1 (the last step returns
            x0) or alphas_cumprod[0].
        eta (float, default 0.0): fastdiff's own key for the ``eta`` argument of diffusers' ``step()``: the noise weight
            in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like ancestral noise). Not part of the diffusers config (see
            :attr:`step_kwargs`).
        use_clipped_model_output (bool, default False): fastdiff's own key for that ``step()`` argument: recompute the
            noise direction from the clipped x0. Not part of the diffusers config either.
    """

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, **CLIP_DEFAULTS, **THRESHOLD_DEFAULTS, "set_alpha_to_one": True,
                "eta": 0.0, "use_clipped_model_output": False}
    STEP_KEYS = ("eta", "use_clipped_model_output")

    def validate(self) -> None:
        eta = self["eta"]
        if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
            raise InvalidInput(f"{self.label()}: eta must be a number in [0, 1] (0 = deterministic DDIM, "
                               f"1 = DDPM-like), got {eta!r}")

    def _plan(self, n: int) -> StepPlan:
        ac = alphas_cumprod(self._config)
        T = self["num_train_timesteps"]
        ts = timestep_grid(self["timestep_spacing"], T, n, self["steps_offset"])
        self._check_timesteps(ts)
        final = 1.0 if self["set_alpha_to_one"] else ac[0]
        eta = float(self["eta"])
        rows = Rows(n)
        for i, t in enumerate(ts):
            prev_t = int(t) - T // n
            a = ac[t]
            a_p = ac[prev_t] if prev_t >= 0 else final
            var = (1 - a_p) / (1 - a) * (1 - a / a_p)
            std = eta * math.sqrt(var)
            px, pm = x0_coefs(self["prediction_type"], math.sqrt(a), math.sqrt(1 - a))
            out = ddim_update(self["prediction_type"], a, a_p, std, bool(self["use_clipped_model_output"]))
            out["noise"] = std
            rows.set(i, px, pm, out, noise=eta > 0)
        return self._make_plan(ts, rows)
