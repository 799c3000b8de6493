"""What several benchmark files share."""

from __future__ import annotations


def digits_model():
    """The digits teacher; with its weights missing, the same architecture freshly initialised (timings do not
    depend on the weights' values)."""
    from fastdiff.errors import ModelNotFound
    from fastdiff.models import load

    try:
        return load("digits")
    except ModelNotFound:
        from fastdiff.models.digits import build_model

        return build_model(seed=0).eval().requires_grad_(False)
