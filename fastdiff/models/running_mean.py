"""The smoothed loss every trainer of the package prints in its progress bar and saves in its metadata.

Its own module, with no imports, for the same reason as :mod:`fastdiff.models.lr_schedule`: any trainer can use
it without import cycles.
"""

from __future__ import annotations


def running_mean(avg: float | None, value: float) -> float:
    """``value`` itself at the first step (``avg`` None), then the exponential moving average
    ``0.98 * avg + 0.02 * value`` (about the last 50 steps). The two constants are written out rather than as
    ``decay`` and ``1 - decay``, which would differ from 0.02 in the last bit and move every saved value."""
    return value if avg is None else 0.98 * avg + 0.02 * value
