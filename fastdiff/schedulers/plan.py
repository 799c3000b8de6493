"""StepPlan: a scheduler reduced to host-side numbers.

Every supported sampler step is a per-element linear map. Per step ``i`` the plan holds one
row of float64 coefficients, ``plan.coefs[i]``, and the fused step computes, for every element::

    m      = u + g * (c - u)                       # CFG on the 2B model batch (or m = model_out without CFG)
    m      = m * m_scale[b]                        # guidance rescale, per sample (optional reduction pass)
    x0     = PX * x + PM * m                       # x0 prediction (epsilon / v / sample are all linear)
    x0     = clamp(x0, -r, r)                      # clip_sample (scalar r) ...
       or  = clamp(x0, -s[b], s[b]) / s[b]         # ... or dynamic thresholding (per-sample s, reduction pass)
    saved' = SX*x + SM*m + S0*x0 + SS*saved + sum_j SH[j]*hist[j]             (UniPC's corrected "last sample")
    prev   = OX*x + OM*m + O0*x0 + OS*saved + ON*noise + sum_j OH[j]*hist[j]
    hist[WSLOT] = x0                               # when WSLOT >= 0 (multistep solvers keep old x0s in a ring)
    next_in[:] = prev * IN_NEXT                    # the next model input, written into both CFG halves
    flag[STEP] = 1 if prev is not finite           # non-finite guard, checked once after the loop

``x`` is the current sample (as the scheduler holds it, e.g. sigma-scaled for Euler), ``m`` the guided model
output, ``hist`` a ring of ``HIST_SLOTS`` earlier x0 predictions and ``saved`` one extra sample buffer (UniPC).
A term whose coefficient is exactly zero is not read by the kernels. Reads of ``saved`` use the value from the
previous step; ``saved'`` is written after all reads, so ``saved`` may be updated in place.

The ``NOISE`` column says whether diffusers draws fresh noise at this step (it sometimes draws noise that it then
multiplies by zero; we draw it too, so a seeded generator stays in step with diffusers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

HIST_SLOTS = 3


class Col(IntEnum):
    """Column indices of a StepPlan coefficient row (see module docstring for the math)."""

    PX = 0
    PM = 1
    OX = 2
    OM = 3
    O0 = 4
    OS = 5
    ON = 6
    OH0 = 7
    OH1 = 8
    OH2 = 9
    SX = 10
    SM = 11
    S0 = 12
    SS = 13
    SH0 = 14
    SH1 = 15
    SH2 = 16
    WSLOT = 17
    IN_NEXT = 18
    NOISE = 19
    STEP = 20


NCOEF = 24  # padded: rows stay 96-byte aligned in fp32, room for later columns


def empty_coefs(num_steps: int) -> np.ndarray:
    """A (num_steps, NCOEF) float64 table with neutral values: no history write, step index filled in."""
    c = np.zeros((num_steps, NCOEF), dtype=np.float64)
    c[:, Col.WSLOT] = -1.0
    c[:, Col.STEP] = np.arange(num_steps, dtype=np.float64)
    return c


@dataclass(frozen=True)
class Thresholding:
    """Dynamic thresholding (Imagen): s = clamp(quantile(|x0|, ratio), 1, max_value); x0 = clamp(x0, -s, s) / s."""

    ratio: float = 0.995
    max_value: float = 1.0


@dataclass(frozen=True)
class StepPlan:
    """Everything the sampling loop needs from a scheduler, for a fixed number of steps.

    Attributes:
        scheduler: canonical scheduler name (e.g. ``"euler_a"``).
        timesteps: (N,) float64, the timestep values the model sees, identical to diffusers' ``timesteps``.
        coefs: (N, NCOEF) float64 coefficient table, columns indexed by :class:`Col`.
        init_noise_sigma: unit-variance starting noise is multiplied by this (diffusers' ``init_noise_sigma``).
        input_scale0: the first model input is ``x * input_scale0`` (later ones come from ``Col.IN_NEXT``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (already folded into PX / PM).
        hist_slots: how many ring slots of earlier x0 predictions the plan uses (0..HIST_SLOTS).
        uses_saved: whether the plan reads / writes the ``saved`` sample buffer (UniPC corrector).
        clip_range: ``r`` of ``clip_sample`` or None.
        thresholding: dynamic thresholding settings or None.
        timestep_dtype: dtype diffusers hands the model (``"int64"`` or ``"float32"``); values are the same.
        config: the scheduler config this plan came from (diffusers-style keys), for export metadata.
    """

    scheduler: str
    timesteps: np.ndarray
    coefs: np.ndarray
    init_noise_sigma: float = 1.0
    input_scale0: float = 1.0
    prediction_type: str = "epsilon"
    hist_slots: int = 0
    uses_saved: bool = False
    clip_range: float | None = None
    thresholding: Thresholding | None = None
    timestep_dtype: str = "int64"
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.timesteps)
        if self.coefs.shape != (n, NCOEF):
            raise ValueError(f"coefs must be ({n}, {NCOEF}), got {self.coefs.shape}")
        if not 0 <= self.hist_slots <= HIST_SLOTS:
            raise ValueError(f"hist_slots must be in [0, {HIST_SLOTS}], got {self.hist_slots}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def noise_steps(self) -> np.ndarray:
        """Boolean (N,): steps at which fresh noise is drawn (in diffusers' order)."""
        return self.coefs[:, Col.NOISE] != 0

    def needs_noise(self) -> bool:
        return bool(self.noise_steps().any())

    def device_table(self, device, dtype=None):
        """The coefficient table as a float32 tensor on ``device`` (moved once per sampling call)."""
        import torch

        host = torch.as_tensor(self.coefs, dtype=dtype or torch.float32)
        device = torch.device(device)
        if device.type == "cuda":  # pinned + non_blocking: the upload does not synchronize the host
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def device_timesteps(self, device):
        """The timesteps as a float32 tensor on ``device`` (what the model is called with)."""
        import torch

        host = torch.as_tensor(self.timesteps, dtype=torch.float32)
        device = torch.device(device)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)
