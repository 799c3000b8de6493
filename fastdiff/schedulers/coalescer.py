"""Coalescer sampling: every step replaces the sample by the model's output (the point it jumps to).

A coalescer network (:mod:`fastdiff.models.coalescer_net`) maps a point ``x`` to ``x + normalize(direction) *
distance``; step ``i`` calls it at timestep ``i`` (the network ignores it) and takes the result::

    prev = m        (prediction_type "sample")

Under classifier-free guidance the loop extrapolates the two predicted targets first (``m = m_u + g (m_c - m_u)``).
``max_steps`` is the most steps the model was made for (a model folder's scheduler config states it).
"""

from __future__ import annotations

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import COMMON_DEFAULTS, Rows, Scheduler
from fastdiff.schedulers.plan import StepPlan

_NOT_HERE = ("timestep_spacing", "steps_offset")


class Coalescer(Scheduler):
    """``prev = model output`` at every step, timesteps ``0, 1, ...``; at most ``max_steps`` steps."""

    name = "coalescer"
    diffusers_class = ""  # no diffusers equivalent
    DEFAULTS = {**{k: v for k, v in COMMON_DEFAULTS.items() if k not in _NOT_HERE}, "prediction_type": "sample",
                "max_steps": 2}
    PREDICTION_TYPES = ("sample",)

    def label(self) -> str:
        return f"scheduler {self.name!r}"

    def validate(self) -> None:
        m = self["max_steps"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InvalidInput(f"{self.label()}: max_steps must be an integer >= 1, got {m!r}")

    @property
    def max_steps(self) -> int:
        return int(self["max_steps"])

    def _max_steps_reason(self) -> str:
        return " (the coalescer model was made for at most that many steps)"

    def _plan(self, n: int) -> StepPlan:
        rows = Rows(n)
        for i in range(n):
            rows.set(i, 0.0, 1.0, {"x0": 1.0})
        return self._make_plan(list(range(n)), rows)

    def to_diffusers(self):
        raise InvalidInput("the coalescer scheduler has no diffusers equivalent")
