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
from fastdiff.schedulers.docs import documented
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


@documented(keys={
    "eta": (
        "float", "fastdiff's own key for the ``eta`` argument of diffusers' ``step()``: the noise weight in [0, 1] "
        "(0 = deterministic DDIM, 1 = DDPM-like ancestral noise). Not part of the diffusers config (see "
        ":attr:`step_kwargs`)."),
    "use_clipped_model_output": (
        "bool", "fastdiff's own key for that ``step()`` argument: recompute the noise direction from the clipped x0. "
        "Not part of the diffusers config either."),
}, notes={
    "set_alpha_to_one": 'Here that is the "previous" alphas_cumprod of the last step, so 1 makes the last step '
                        "return x0.",
})
class DDIM(Scheduler):
    """diffusers' ``DDIMScheduler``; ``eta`` and ``use_clipped_model_output`` are its step() arguments.

    Args:
        {args}
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
