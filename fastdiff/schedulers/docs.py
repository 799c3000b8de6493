"""The ``Args:`` sections of the scheduler class docstrings, built from one description per config key.

Most config keys mean the same in every scheduler, so their text lives once in :data:`KEY_DOCS`; the
:func:`documented` class decorator writes a class' ``Args:`` entries from it in the order of the class' own
``DEFAULTS`` then ``NEUTRAL``, and takes each entry's "(type, default X)" / "(type, only X)" head from those
dicts, so a documented default cannot drift from the real one. A class passes its own keys and any key whose
meaning differs for it as ``keys`` (a full replacement), and class-specific remarks on a shared key as ``notes``
(appended to the shared text).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

# key -> (type as shown in the docs, description without the "(type, default X)" head).
KEY_DOCS: dict[str, tuple[str, str]] = {
    "num_train_timesteps": (
        "int", "number of diffusion steps the model was trained with (the length of the beta table); at least 2."),
    "beta_start": ("float", "first beta of the training schedule."),
    "beta_end": ("float", "last beta of the training schedule."),
    "beta_schedule": (
        "str", 'how betas go from ``beta_start`` to ``beta_end``: ``"linear"``, ``"scaled_linear"`` (linear in '
        'sqrt(beta), Stable Diffusion\'s) or ``"squaredcos_cap_v2"`` (cosine, Nichol & Dhariwal; ignores the beta '
        'range). Not used when ``trained_betas`` is given. fastdiff refuses diffusers\' ``"sigmoid"`` schedule.'),
    "trained_betas": (
        "list of float or None",
        "explicit betas instead of a schedule; their number must equal ``num_train_timesteps``."),
    "prediction_type": (
        "str", 'what the model predicts: ``"epsilon"`` (the model predicts the noise), ``"v_prediction"`` (velocity, '
        'Salimans & Ho 2022) or ``"sample"`` (the model predicts x0).'),
    "timestep_spacing": (
        "str", 'how the inference timesteps are picked from the training ones: ``"linspace"``, ``"leading"`` or '
        '``"trailing"`` (Table 2 of arXiv:2305.08891).'),
    "steps_offset": (
        "int", 'added to every ``"leading"`` timestep (Stable Diffusion uses 1); other spacings ignore it. A grid '
        "shifted past the last training timestep is refused."),
    "rescale_betas_zero_snr": (
        "bool", "rescale the betas to zero terminal SNR (Algorithm 1 of arXiv:2305.08891). A plan whose coefficients "
        'would be non-finite (epsilon prediction at zero SNR) is refused; use ``"v_prediction"`` there.'),
    "clip_sample": (
        "bool", "clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]`` (overridden by "
        "``thresholding``)."),
    "clip_sample_range": ("float", "the bound of ``clip_sample``."),
    "thresholding": (
        "bool", "dynamic thresholding of the predicted x0 (Imagen, Saharia et al. 2022): per sample, s = "
        "clamp(quantile(|x0|, ratio), 1, sample_max_value) and x0 = clamp(x0, -s, s) / s. Only for pixel-space "
        "models."),
    "dynamic_thresholding_ratio": (
        "float", "the quantile of ``thresholding``; must be in (0, 1] (fastdiff refuses other values, diffusers does "
        "not check)."),
    "sample_max_value": (
        "float", "the largest threshold s of ``thresholding``; must be >= 1 (fastdiff refuses smaller values, "
        "diffusers does not check)."),
    "set_alpha_to_one": (
        "bool", "the alphas_cumprod used past the start of the grid: 1 or alphas_cumprod[0]."),
    "use_karras_sigmas": (
        "bool", "Karras et al. (2022) noise levels (rho = 7) between sigma_min and sigma_max instead of the training "
        "sigmas at the spaced timesteps; timesteps are mapped back from them."),
    # What None means differs between the schedulers, so each adds that as a note.
    "sigma_min": ("float or None", "the smallest Karras sigma (read only with ``use_karras_sigmas``)."),
    "sigma_max": ("float or None", "the largest Karras sigma (read only with ``use_karras_sigmas``)."),
    "final_sigmas_type": (
        "str", 'the noise level after the last step: ``"zero"`` (the last step returns the x0 prediction) or '
        '``"sigma_min"`` (the training schedule\'s smallest sigma).'),
    "use_exponential_sigmas": (
        "bool", "diffusers' exponential noise levels; not implemented, so fastdiff refuses True."),
    "use_beta_sigmas": ("bool", "diffusers' beta-distributed noise levels; not implemented, refused."),
    "use_flow_sigmas": (
        "bool", "flow-matching noise levels (with diffusers' ``flow_shift``); not implemented, refused. "
        "``from_diffusers`` drops ``flow_shift`` and ``time_shift_type``, which only act with flow sigmas / dynamic "
        "shifting."),
    "use_dynamic_shifting": ("bool", "resolution-dependent timestep shifting; not implemented, refused."),
}

# Remarks that hold for every scheduler stepping in sigma form (Euler, Euler-ancestral, DPM-Solver++, UniPC).
SIGMA_NOTES: dict[str, str] = {
    "rescale_betas_zero_snr": "The terminal ``alphas_cumprod`` of 0 is replaced by ``2**-24`` so sigma stays "
                              "finite, as in diffusers.",
}

# The one remark on thresholding that depends on the class having clip_sample too.
_CLIP_NOTE = "It wins over ``clip_sample``."

_WIDTH = 120
_ARGS_LINE = re.compile(r"^[ ]*\{args\}[ ]*$", re.MULTILINE)

C = TypeVar("C", bound=type)


def _value(value: Any) -> str:
    """A default as the docs show it (and as the docstring test reads it back with ast.literal_eval)."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return repr(value)


def _entry(key: str, type_: str, kind: str, value: Any, text: str) -> str:
    return textwrap.fill(f"{key} ({type_}, {kind} {_value(value)}): {text}", width=_WIDTH, initial_indent=" " * 8,
                         subsequent_indent=" " * 12, break_long_words=False, break_on_hyphens=False)


def args_section(cls: type, keys: dict[str, tuple[str, str]], notes: dict[str, str]) -> str:
    """The ``Args:`` entries of ``cls`` (one per key of its DEFAULTS, then NEUTRAL), indented for its docstring."""
    entries = []
    accepted = [(k, "default", v) for k, v in cls.DEFAULTS.items()] + [(k, "only", v) for k, v in cls.NEUTRAL.items()]
    for key, kind, value in accepted:
        # A key without a description fails here, at import, rather than leaving a hole in help().
        type_, text = keys[key] if key in keys else KEY_DOCS[key]
        extra = [notes[key]] if key in notes else []
        if key == "thresholding" and "clip_sample" in cls.DEFAULTS:
            extra.insert(0, _CLIP_NOTE)
        entries.append(_entry(key, type_, kind, value, " ".join([text, *extra])))
    unused = (set(keys) | set(notes)) - {k for k, _, _ in accepted}
    if unused:
        raise TypeError(f"{cls.__name__}: documented keys it does not accept: {', '.join(sorted(unused))}")
    return "\n".join(entries)


def documented(keys: dict[str, tuple[str, str]] | None = None, notes: dict[str, str] | None = None
               ) -> Callable[[C], C]:
    """Class decorator: replace the ``{args}`` line of the class docstring with its generated ``Args:`` entries.

    ``keys`` maps a key to ``(type, text)`` for keys this class documents itself (its own keys, or shared ones
    whose meaning differs here); ``notes`` maps a shared key to a remark appended to the shared text.
    """
    def decorate(cls: C) -> C:
        doc = cls.__dict__.get("__doc__") or ""
        if not _ARGS_LINE.search(doc):
            raise TypeError(f"{cls.__name__}: the docstring has no {{args}} line to fill")
        section = args_section(cls, keys or {}, notes or {})
        # A function replacement, so backslashes in the generated text are not read as regex escapes.
        cls.__doc__ = _ARGS_LINE.sub(lambda _: section, doc, count=1)
        return cls
    return decorate
