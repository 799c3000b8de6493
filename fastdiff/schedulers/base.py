"""The :class:`Scheduler` base class: a validated diffusers-style config that turns a step count into a StepPlan.

Subclasses declare their config keys with defaults (``DEFAULTS``, equal to the matching diffusers class' defaults,
plus a few of our own such as DDIM's ``eta``), the diffusers keys they only accept at one neutral value
(``NEUTRAL``: options that would change the math in a way we do not implement), and build rows with
:class:`Rows`. Everything here is host-side float64 numpy.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.betas import BETA_SCHEDULES, TIMESTEP_SPACINGS
from fastdiff.schedulers.plan import HIST_SLOTS, Col, StepPlan, Thresholding, empty_coefs

#: plans kept per scheduler object (by step count); a sampler uses one or a few step counts
PLAN_CACHE_SIZE = 16
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
THRESHOLD_DEFAULTS: dict[str, Any] = {
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
}
CLIP_DEFAULTS: dict[str, Any] = {"clip_sample": True, "clip_sample_range": 1.0}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) == list(b or [])
    return a == b


class Scheduler:
    """A sampler's host-side math: ``.plan(n)`` gives the :class:`StepPlan` for ``n`` inference steps.

    Attributes:
        name: canonical fastdiff name (``"ddim"``, ``"dpmpp_2m_karras"``, ...).
        config: diffusers-style config dict with every default filled in (a copy).
        diffusers_class: the diffusers scheduler class whose ``step()`` this reproduces.
    """

    name: str = ""
    diffusers_class: str = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    NEUTRAL: ClassVar[dict[str, Any]] = {}
    # Our own keys: they are arguments of diffusers' step() rather than config entries.
    STEP_KEYS: ClassVar[tuple[str, ...]] = ()
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = PREDICTION_TYPES

    def __init__(self, config: dict | None = None, *, name: str | None = None, **overrides: Any):
        cfg = dict(self.DEFAULTS)
        for key, value in {**(config or {}), **overrides}.items():
            if key in self.NEUTRAL:
                if not _same(value, self.NEUTRAL[key]):
                    raise InvalidInput(
                        f"{self.label()}: {key}={value!r} is not supported by fastdiff (only "
                        f"{key}={self.NEUTRAL[key]!r}); remove it or use a supported option "
                        f"({', '.join(sorted(self.DEFAULTS))})")
                continue
            if key not in self.DEFAULTS:
                raise InvalidInput(f"{self.label()}: unknown config key {key!r}; valid keys: "
                                   f"{', '.join(sorted(self.DEFAULTS))}")
            cfg[key] = value
        self._config = cfg
        self._plan_cache: dict[int, StepPlan] = {}  # plan(n) by n: the config never changes after this
        if name is not None:
            self.name = name
        self._validate_common()
        self.validate()

    # ----- config -----------------------------------------------------------------------------------------------
    def label(self) -> str:
        return f"scheduler {self.name!r} ({self.diffusers_class})"

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the full config (diffusers keys plus our step keys such as DDIM's ``eta``)."""
        return dict(self._config)

    def __getitem__(self, key: str) -> Any:
        return self._config[key]

    def replace(self, **overrides: Any) -> Scheduler:
        """A new scheduler of the same kind with some config keys changed."""
        return type(self)(self._config, name=self.name, **overrides)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._config.items() if not _same(v, self.DEFAULTS.get(k))}
        return f"{type(self).__name__}(name={self.name!r}, {changed})"

    def _choice(self, key: str, allowed: tuple) -> None:
        if self._config[key] not in allowed:
            raise InvalidInput(f"{self.label()}: {key}={self._config[key]!r} is not supported; "
                               f"choose one of {', '.join(map(repr, allowed))}")

    def _validate_common(self) -> None:
        c = self._config
        self._choice("prediction_type", self.PREDICTION_TYPES)
        if "timestep_spacing" in c:
            self._choice("timestep_spacing", TIMESTEP_SPACINGS)
        if c.get("trained_betas") is None:
            self._choice("beta_schedule", BETA_SCHEDULES)
        elif len(c["trained_betas"]) != c["num_train_timesteps"]:
            raise InvalidInput(f"{self.label()}: trained_betas has {len(c['trained_betas'])} values but "
                               f"num_train_timesteps is {c['num_train_timesteps']}; they must match")
        if int(c["num_train_timesteps"]) < 2:
            raise InvalidInput(f"{self.label()}: num_train_timesteps must be >= 2, got {c['num_train_timesteps']}")
        if c.get("thresholding"):
            r = c["dynamic_thresholding_ratio"]
            if not 0 < r <= 1:
                raise InvalidInput(f"{self.label()}: dynamic_thresholding_ratio must be in (0, 1], got {r}")
            if c["sample_max_value"] < 1:
                raise InvalidInput(f"{self.label()}: sample_max_value must be >= 1, got {c['sample_max_value']}")

    def validate(self) -> None:
        """Family-specific config checks (raise InvalidInput)."""

    # ----- planning ---------------------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        """The largest ``num_inference_steps`` this config allows."""
        return int(self._config["num_train_timesteps"])

    def plan(self, num_inference_steps: int) -> StepPlan:
        """The StepPlan for ``num_inference_steps`` steps (timesteps + one coefficient row per step)."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise InvalidInput(f"{self.label()}: num_inference_steps must be an int, got {type(n).__name__} {n!r}")
        n = int(n)
        cache = self._plan_cache
        if n in cache:
            return cache[n]
        if n < 1 or n > self.max_steps:
            raise InvalidInput(f"{self.label()}: num_inference_steps={n} is out of range; this config allows 1 to "
                               f"{self.max_steps} steps{self._max_steps_reason()}")
        plan = self._plan(n)
        bad = np.argwhere(~np.isfinite(plan.coefs))
        if len(bad):
            step, col = int(bad[0][0]), Col(int(bad[0][1])).name
            raise InvalidInput(
                f"{self.label()}: step {step} (timestep {plan.timesteps[step]:g}) has a non-finite coefficient "
                f"({col}); with prediction_type={self['prediction_type']!r} this config divides by zero there "
                "(e.g. epsilon prediction at a zero-SNR timestep from rescale_betas_zero_snr: use v_prediction)")
        # A scheduler's config does not change after construction (``replace`` makes a new one), so its plans are
        # kept: building one costs 0.3-1 ms of float64 host math (DPM-Solver++ / UniPC at 20 steps, 2-core CPU),
        # paid by every sampling call otherwise -- 25-50 us per step of a 20-step loop, more than the loop's own
        # per-step host time, and per request when serving. Callers share the returned plan and must not modify it.
        if len(cache) >= PLAN_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[n] = plan
        return plan

    def _max_steps_reason(self) -> str:
        return f" (num_train_timesteps={self['num_train_timesteps']})"

    def _plan(self, n: int) -> StepPlan:
        raise NotImplementedError

    def _check_timesteps(self, ts: np.ndarray) -> None:
        T = self["num_train_timesteps"]
        if ts.max() >= T or ts.min() < 0:
            raise InvalidInput(
                f"{self.label()}: with timestep_spacing={self._config.get('timestep_spacing')!r} and steps_offset="
                f"{self._config.get('steps_offset')}, {len(ts)} steps give timesteps outside [0, {T - 1}] "
                f"(max {ts.max():g}); lower steps_offset or num_inference_steps")

    def clip_and_threshold(self) -> tuple[float | None, Thresholding | None]:
        """(clip_range, thresholding) for the plan: thresholding wins over clip_sample, as in diffusers."""
        c = self._config
        if c.get("thresholding"):
            return None, Thresholding(float(c["dynamic_thresholding_ratio"]), float(c["sample_max_value"]))
        if c.get("clip_sample"):
            return float(c["clip_sample_range"]), None
        return None, None

    def _make_plan(self, timesteps: np.ndarray, rows: Rows, *, timestep_dtype: str = "int64",
                   init_noise_sigma: float = 1.0, input_scale0: float = 1.0) -> StepPlan:
        clip_range, thresholding = self.clip_and_threshold()
        coefs = rows.table(fold=clip_range is None and thresholding is None)
        return StepPlan(
            scheduler=self.name, timesteps=np.asarray(timesteps, dtype=np.float64), coefs=coefs,
            init_noise_sigma=float(init_noise_sigma), input_scale0=float(input_scale0),
            prediction_type=self["prediction_type"], hist_slots=rows.hist_slots(), uses_saved=rows.uses_saved(),
            clip_range=clip_range, thresholding=thresholding, timestep_dtype=timestep_dtype, config=self.config)

    # ----- diffusers --------------------------------------------------------------------------------------------
    def diffusers_config(self) -> dict[str, Any]:
        """The config of the equivalent diffusers scheduler (our step keys removed)."""
        return {k: v for k, v in self._config.items() if k not in self.STEP_KEYS}

    def to_diffusers(self):
        """The equivalent diffusers scheduler object (needs diffusers installed). Step arguments that diffusers
        takes in ``step()`` rather than in its config (DDIM's ``eta``) are in :attr:`step_kwargs`."""
        import diffusers

        return getattr(diffusers, self.diffusers_class)(**self.diffusers_config())

    @property
    def step_kwargs(self) -> dict[str, Any]:
        """Keyword arguments to pass to the diffusers scheduler's ``step()`` to match this scheduler."""
        return {k: self._config[k] for k in self.STEP_KEYS}


def x0_coefs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(PX, PM) with x0 = PX * x + PM * m for a sample x = alpha * x0 + sigma * eps (VP form).

    epsilon: x0 = (x - sigma m) / alpha; v_prediction: x0 = alpha x - sigma m (needs alpha^2 + sigma^2 = 1);
    sample: x0 = m."""
    if prediction_type == "epsilon":
        return (1.0 / alpha if alpha > 0 else math.inf), (-sigma / alpha if alpha > 0 else -math.inf)
    if prediction_type == "v_prediction":
        return alpha, -sigma
    return 0.0, 1.0


class Rows:
    """Builds a StepPlan coefficient table row by row.

    Per row the x0 prediction is ``PX x + PM m``; the update ``prev`` and the saved-sample update are given as
    dicts over the terms ``"x"``, ``"m"``, ``"x0"``, ``"saved"``, ``"noise"`` and ring slots ``0..2`` (earlier x0s).
    """

    _OUT = {"x": Col.OX, "m": Col.OM, "x0": Col.O0, "saved": Col.OS, "noise": Col.ON}
    _SAV = {"x": Col.SX, "m": Col.SM, "x0": Col.S0, "saved": Col.SS}

    def __init__(self, n: int):
        self.c = empty_coefs(n)
        self.n = n

    def set(self, i: int, px: float, pm: float, out: dict, *, saved: dict | None = None, wslot: int = -1,
            in_next: float = 1.0, noise: bool = False) -> None:
        r = self.c[i]
        r[Col.PX], r[Col.PM] = px, pm
        for key, v in out.items():
            r[Col.OH0 + key if isinstance(key, int) else self._OUT[key]] += v
        for key, v in (saved or {}).items():
            r[Col.SH0 + key if isinstance(key, int) else self._SAV[key]] += v
        r[Col.WSLOT] = wslot
        r[Col.IN_NEXT] = in_next
        r[Col.NOISE] = 1.0 if noise else 0.0

    def hist_slots(self) -> int:
        used = self.c[:, Col.WSLOT]
        return int(used.max()) + 1 if (used >= 0).any() else 0

    def uses_saved(self) -> bool:
        cols = [Col.OS, Col.SX, Col.SM, Col.S0, Col.SS, Col.SH0, Col.SH1, Col.SH2]
        return bool((self.c[:, cols] != 0).any())

    def table(self, fold: bool) -> np.ndarray:
        """The (n, NCOEF) table. With ``fold`` (no clamp of x0), the x0 terms are rewritten in terms of x and m:
        fewer roundings, and no cancellation between a large x0 and x at high noise."""
        c = self.c.copy()
        if fold and np.isfinite(c).all():
            for o0, ox, om in ((Col.O0, Col.OX, Col.OM), (Col.S0, Col.SX, Col.SM)):
                c[:, ox] += c[:, o0] * c[:, Col.PX]
                c[:, om] += c[:, o0] * c[:, Col.PM]
                c[:, o0] = 0.0
        assert HIST_SLOTS >= self.hist_slots()
        return c
