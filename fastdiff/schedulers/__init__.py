"""Schedulers as host-side math: a scheduler config + a step count -> :class:`StepPlan`."""

from fastdiff.schedulers.plan import HIST_SLOTS, NCOEF, Col, StepPlan, Thresholding, empty_coefs

__all__ = ["Col", "StepPlan", "Thresholding", "empty_coefs", "NCOEF", "HIST_SLOTS"]
