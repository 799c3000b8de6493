"""Scheduler lookup: our names (``get_scheduler("dpmpp_2m_karras")``) and diffusers schedulers / configs
(``from_diffusers(pipe.scheduler)``, a config dict or a ``scheduler_config.json``).

A name with no overrides equals the diffusers class with its default config (``"ddim"`` is ``DDIMScheduler()``,
clip_sample=True included), except the presets: ``dpmpp_2m_karras`` (Karras sigmas), ``onestep`` (prediction
"sample", no clipping) and ``onestep_euler_a`` (Euler-ancestral with trailing spacing, as SD-Turbo runs it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastdiff._checks import check_int, check_number
from fastdiff.errors import InvalidInput, UnknownScheduler
from fastdiff.schedulers.base import Scheduler
from fastdiff.schedulers.coalescer import Coalescer
from fastdiff.schedulers.ddim import DDIM
from fastdiff.schedulers.ddpm import DDPM
from fastdiff.schedulers.dpmsolver import DPMSolverPP
from fastdiff.schedulers.euler import Euler, EulerAncestral
from fastdiff.schedulers.lcm import LCM
from fastdiff.schedulers.onestep import OneStep
from fastdiff.schedulers.unipc import UniPC

# name -> (class, preset config that wins over a base config but not over explicit overrides)
NAMES: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddpm": (DDPM, {}),
    "ddim": (DDIM, {}),
    "euler": (Euler, {}),
    "euler_a": (EulerAncestral, {}),
    "dpmpp_2m": (DPMSolverPP, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverPP, {"use_karras_sigmas": True}),
    "unipc": (UniPC, {}),
    "lcm": (LCM, {}),
    "onestep": (OneStep, {}),
    "onestep_euler_a": (EulerAncestral, {"timestep_spacing": "trailing"}),
    "coalescer": (Coalescer, {}),
}

DIFFUSERS_CLASSES: dict[str, type[Scheduler]] = {
    "DDPMScheduler": DDPM,
    "DDIMScheduler": DDIM,
    "EulerDiscreteScheduler": Euler,
    "EulerAncestralDiscreteScheduler": EulerAncestral,
    "DPMSolverMultistepScheduler": DPMSolverPP,
    "UniPCMultistepScheduler": UniPC,
    "LCMScheduler": LCM,
}
#: fastdiff schedulers with no diffusers class, by the ``_class_name`` a model folder's config gives them
OWN_CLASSES: dict[str, type[Scheduler]] = {"CoalescerScheduler": Coalescer}


def _known_keys(cls: type[Scheduler]) -> set[str]:
    return set(cls.DEFAULTS) | set(cls.NEUTRAL)


def _filter(cls: type[Scheduler], config: dict) -> dict:
    """The keys of a diffusers config that ``cls`` understands; others (``_class_name``, ``skip_prk_steps``, options
    of other schedulers) do not change this scheduler's math and are dropped, as diffusers' from_config does."""
    return {k: v for k, v in config.items() if k in _known_keys(cls)}


def _check_values(cls: type[Scheduler], config: dict) -> None:
    """Each value of a key ``cls`` knows has its default's type: a number where a number is expected (``"0.1"``
    or ``true`` as beta_start would fail deep in the noise-schedule math), a bool, a string or a list. Keys whose
    default is None (``trained_betas``, ``sigma_min``) take several types and are left to the scheduler."""
    for key, value in config.items():
        default = cls.DEFAULTS.get(key)
        name, hint = f"scheduler config {key!r}", "fix it in the config (or the keyword override)"
        if default is None:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise InvalidInput(f"{name} must be true or false, got {value!r}; {hint}")
        elif isinstance(default, int):
            check_int(name, value, hint=hint)
        elif isinstance(default, float):
            check_number(name, value, hint=hint, finite=False)
        elif not isinstance(value, type(default)):
            raise InvalidInput(f"{name} must be a {type(default).__name__}, got {value!r} ({type(value).__name__}); "
                               f"{hint}")


def _make(cls: type[Scheduler], config: dict, overrides: dict, name: str | None = None) -> Scheduler:
    """``cls(config, **overrides)`` with every value type-checked. The scheduler's own checks speak first (they
    know the ranges, e.g. "eta must be a number in [0, 1]"); a value they let through or choke on untyped is
    then named by :func:`_check_values`."""
    try:
        scheduler = cls(config, name=name, **overrides) if name is not None else cls(config, **overrides)
    except InvalidInput:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError):
        _check_values(cls, {**config, **overrides})
        raise
    _check_values(cls, {**config, **overrides})
    return scheduler


def _load_config(source: Any, class_name: str | None = None) -> tuple[dict, str | None]:
    """(config dict, diffusers class name or None) from a diffusers scheduler object, a config dict, or a path to
    a scheduler_config.json / a folder holding one (or a ``scheduler/`` subfolder with one)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        candidates = [path] if path.is_file() else [path / "scheduler_config.json",
                                                     path / "scheduler" / "scheduler_config.json"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise InvalidInput(f"no scheduler config at {str(path)!r} (looked for "
                               f"{', '.join(str(p) for p in candidates)}); pass a scheduler_config.json, a folder "
                               "holding one, or a model folder with a scheduler/ subfolder")
        try:
            config = json.loads(found.read_text())
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read scheduler config {str(found)!r}: {e}") from e
        if not isinstance(config, dict):
            raise InvalidInput(f"scheduler config {str(found)!r} must hold a JSON object (a diffusers "
                               f"scheduler_config.json), it holds a {type(config).__name__}")
        return config, class_name or config.get("_class_name")
    if isinstance(source, dict):
        return dict(source), class_name or source.get("_class_name")
    if hasattr(source, "config") and hasattr(source, "step"):  # a diffusers scheduler object
        return dict(source.config), class_name or type(source).__name__
    raise InvalidInput(f"cannot read a scheduler config from a {type(source).__name__}; pass a diffusers scheduler, "
                       "its config dict or a path to scheduler_config.json")


def _supported_text() -> str:
    return (f"supported diffusers schedulers: {', '.join(DIFFUSERS_CLASSES)}; fastdiff names: {', '.join(NAMES)}")


def from_diffusers(source: Any, class_name: str | None = None, **overrides: Any) -> Scheduler:
    """The fastdiff scheduler equivalent to a diffusers scheduler.

    Args:
        source: a diffusers scheduler object, its config dict (with ``_class_name``, or pass ``class_name``), or a
            path to ``scheduler_config.json`` / a folder holding one / a model folder with ``scheduler/``.
        class_name: the diffusers class name when ``source`` is a dict without ``_class_name``.
        overrides: config keys to change (e.g. ``prediction_type="v_prediction"``).

    Raises:
        UnknownScheduler: the diffusers class is not supported.
        InvalidInput: an option that changes the math in a way fastdiff does not implement (e.g.
            ``use_exponential_sigmas``, ``algorithm_type="sde-dpmsolver++"``, ``solver_order=3``).
    """
    config, cls_name = _load_config(source, class_name)
    if not cls_name:
        raise InvalidInput("the scheduler config has no '_class_name'; pass class_name='DDIMScheduler' (or the "
                           f"class it belongs to). {_supported_text()}")
    cls = DIFFUSERS_CLASSES.get(cls_name) or OWN_CLASSES.get(cls_name)
    if cls is None:
        raise UnknownScheduler(
            f"diffusers scheduler {cls_name!r} is not supported; {_supported_text()}. To sample with a supported "
            "scheduler and this model's noise schedule, use get_scheduler('<name>', config=<this config>).")
    return _make(cls, _filter(cls, config), overrides)


def get_scheduler(spec: Any, config: Any = None, **overrides: Any) -> Scheduler:
    """A scheduler from a fastdiff name, a diffusers scheduler / config / config path, or a Scheduler.

    Args:
        spec: one of :data:`NAMES` (``"ddpm"``, ``"ddim"``, ``"euler"``, ``"euler_a"``, ``"dpmpp_2m"``,
            ``"dpmpp_2m_karras"``, ``"unipc"``, ``"lcm"``, ``"onestep"``, ``"onestep_euler_a"``), anything
            :func:`from_diffusers` takes, or a :class:`Scheduler` (returned as is, or a copy with ``overrides``).
        config: with a name, a base diffusers config (dict, scheduler object or path) whose keys the named
            scheduler understands are taken first, like diffusers' ``XScheduler.from_config(model_config)``:
            e.g. the model's betas and prediction type with another sampler.
        overrides: config keys (``prediction_type``, ``timestep_spacing``, ``beta_schedule``, ``eta``, ...).
    """
    if isinstance(spec, Scheduler):
        if config is not None:
            raise InvalidInput("config= is only for scheduler names; pass overrides as keywords instead")
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, str) and spec in NAMES:
        cls, preset = NAMES[spec]
        base = {}
        if config is not None:
            loaded = _load_config(config)[0]
            # like diffusers' from_config: keys the source only had at its class default are not carried over
            defaulted = set(loaded.get("_use_default_values", []))
            base = {k: v for k, v in _filter(cls, loaded).items() if k not in defaulted}
        return _make(cls, {**base, **preset}, overrides, name=spec)
    if isinstance(spec, str) and not (os.sep in spec or spec.endswith(".json") or os.path.exists(spec)):
        raise UnknownScheduler(f"unknown scheduler {spec!r}; choose one of: {', '.join(NAMES)} (or pass a diffusers "
                               "scheduler, its config dict or a path to scheduler_config.json)")
    if config is not None:
        raise InvalidInput("config= is only for scheduler names; pass overrides as keywords instead")
    if isinstance(spec, (str, os.PathLike, dict)) or hasattr(spec, "config"):
        return from_diffusers(spec, **overrides)
    raise UnknownScheduler(f"cannot make a scheduler from a {type(spec).__name__}; pass a name ({', '.join(NAMES)}), "
                           "a diffusers scheduler, its config dict or a path to scheduler_config.json")
