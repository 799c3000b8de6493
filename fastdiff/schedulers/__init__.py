"""Schedulers as host-side math: a scheduler config + a step count -> :class:`StepPlan`.

    from fastdiff.schedulers import get_scheduler, from_diffusers
    plan = get_scheduler("dpmpp_2m_karras", prediction_type="v_prediction").plan(25)
    plan = from_diffusers(pipe.scheduler).plan(30)
"""

from fastdiff.schedulers.base import Scheduler
from fastdiff.schedulers.ddim import DDIM
from fastdiff.schedulers.ddpm import DDPM
from fastdiff.schedulers.dpmsolver import DPMSolverPP
from fastdiff.schedulers.euler import Euler, EulerAncestral
from fastdiff.schedulers.lcm import LCM
from fastdiff.schedulers.onestep import OneStep
from fastdiff.schedulers.plan import HIST_SLOTS, NCOEF, Col, StepPlan, Thresholding, empty_coefs
from fastdiff.schedulers.registry import DIFFUSERS_CLASSES, NAMES, from_diffusers, get_scheduler
from fastdiff.schedulers.unipc import UniPC

__all__ = [
    "Col", "StepPlan", "Thresholding", "empty_coefs", "NCOEF", "HIST_SLOTS",
    "Scheduler", "get_scheduler", "from_diffusers", "NAMES", "DIFFUSERS_CLASSES",
    "DDPM", "DDIM", "Euler", "EulerAncestral", "DPMSolverPP", "UniPC", "LCM", "OneStep",
]
