"""Coalescer sampling: every step replaces the sample by the model's output (the point it jumps to).

A coalescer network (:mod:`fastdiff.models.coalescer_net`) maps a point ``x`` to ``x + normalize(direction) *
distance``; step ``i`` calls it at timestep ``i`` (the network ignores it) and takes the result::

    prev = m        (prediction_type "sample")

Under classifier-free guidance the loop extrapolates the two predicted targets first (``m = m_u + g (m_c - m_u)``).
``max_steps`` is the most steps the model was made for and ``prior_scale`` the spread of its starting points
``R = prior_scale * z`` (a model folder's scheduler config states both).
"""

from __future__ import annotations

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import COMMON_DEFAULTS, Rows, Scheduler
from fastdiff.schedulers.docs import documented
from fastdiff.schedulers.plan import StepPlan

_NOT_HERE = ("timestep_spacing", "steps_offset")


@documented(keys={
    "max_steps": ("int", "the most steps the coalescer model supports (more are refused with this limit named)."),
    "prior_scale": ("float", "the starting points are ``prior_scale * z`` for unit noise ``z`` (the model's "
                             "training prior)."),
}, notes={
    "prediction_type": 'Only ``"sample"``: the model returns the point it jumps to.',
})
class Coalescer(Scheduler):
    """``prev = model output`` at every step, timesteps ``0, 1, ...``; at most ``max_steps`` steps.

    Args:
        {args}

    The noise-schedule keys are accepted (a model's config may carry them) and not used.
    """

    name = "coalescer"
    diffusers_class = ""  # no diffusers equivalent
    DEFAULTS = {**{k: v for k, v in COMMON_DEFAULTS.items() if k not in _NOT_HERE}, "prediction_type": "sample",
                "max_steps": 2, "prior_scale": 1.0}
    PREDICTION_TYPES = ("sample",)

    def label(self) -> str:
        return f"scheduler {self.name!r}"

    def validate(self) -> None:
        m = self["max_steps"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InvalidInput(f"{self.label()}: max_steps must be an integer >= 1, got {m!r}")
        p = self["prior_scale"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < float("inf"):
            raise InvalidInput(f"{self.label()}: prior_scale must be a finite number > 0, got {p!r}")

    @property
    def max_steps(self) -> int:
        return int(self["max_steps"])

    def _max_steps_reason(self) -> str:
        return " (the coalescer model was made for at most that many steps)"

    def _plan(self, n: int) -> StepPlan:
        rows = Rows(n)
        for i in range(n):
            rows.set(i, 0.0, 1.0, {"x0": 1.0})
        # unit noise z becomes the starting point R = prior_scale * z (the loop multiplies by init_noise_sigma)
        return self._make_plan(list(range(n)), rows, init_noise_sigma=float(self["prior_scale"]))

    def to_diffusers(self):
        raise InvalidInput("the coalescer scheduler has no diffusers equivalent")
