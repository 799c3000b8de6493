"""UniPC (Zhao et al., 2023), as diffusers' ``UniPCMultistepScheduler`` with ``predict_x0=True``, solver_type
bh2 (or bh1) and ``solver_order`` 1 or 2.

Notation as in :mod:`fastdiff.schedulers.dpmsolver` (``lambda = -log s``). For a step from noise level a to b with
``h = lambda_b - lambda_a``, ``phi = expm1(-h)`` and ``B = expm1(-h)`` (bh2) or ``-h`` (bh1)::

    base(x, x0_a)  = (sig_b / sig_a) x - alpha_b phi x0_a
    predictor (i -> i+1), order 1:  x_{i+1} = base(xc_i, x0_i)
                          order 2:  x_{i+1} = base(xc_i, x0_i) - alpha B / 2 * (x0_{i-1} - x0_i) / r
    corrector (i-1 -> i), order 1:  xc_i = base(xc_{i-1}, x0_{i-1}) - alpha B / 2 * (x0_i - x0_{i-1})
                          order 2:  xc_i = base(...) - alpha B (rho0 (x0_{i-2} - x0_{i-1}) / r + rho1 (x0_i - x0_{i-1}))

with ``r`` the ratio of lambda gaps and ``(rho0, rho1)`` the solution of ``[[1, 1], [r, 1]] rho = b``,
``b_k = k! h_phi_k / B``. The corrector at step i uses the model output at the predicted x_i and overwrites the
sample the next predictor starts from; diffusers keeps that corrected sample as ``last_sample``. Here it is the
plan's ``saved`` buffer, and since every piece is linear the predictor applied to the corrected sample is
expanded on the host into one row: prev = P_S * xc_i + ..., xc_i = C_S * saved + ....
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.schedulers.base import COMMON_DEFAULTS, THRESHOLD_DEFAULTS, Rows, x0_coefs
from fastdiff.schedulers.docs import SIGMA_NOTES, documented
from fastdiff.schedulers.plan import HIST_SLOTS, StepPlan
from fastdiff.schedulers.sigmas import FINAL_SIGMAS_TYPES, SIGMA_NEUTRAL, SigmaGrid, vp_from_sigma


def _b_coefs(hh: float, order: int, solver_type: str) -> tuple[float, list[float]]:
    """(B_h, [b_1..b_order]) of UniPC's linear system for ``hh = -h``: b_k = k! * h_phi_k / B_h with
    h_phi_1 = phi_1(hh) / hh - 1 and h_phi_{k+1} = h_phi_k / hh - 1 / (k+1)!."""
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1 if solver_type == "bh2" else hh
    h_phi_k, fact, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return b_h, b


@documented(keys={
    "solver_order": (
        "int", "the predictor / corrector order, 2 or 1. fastdiff refuses 3 and more (they need three earlier model "
        "outputs per step)."),
    "predict_x0": (
        "bool", "UniPC on x0 predictions; fastdiff refuses False (UniPC on noise predictions)."),
    "solver_type": (
        "str", 'the B(h) of the UniPC update, ``"bh2"`` (expm1(-h)) or ``"bh1"`` (-h).'),
    "lower_order_final": (
        "bool", "lower the order on the last steps (the last step is first order). With ``solver_order=2`` and "
        '``final_sigmas_type="zero"``, False is refused: the second-order last step to sigma 0 divides by zero '
        "(diffusers returns inf / NaN there)."),
    "disable_corrector": ("list of int", "steps whose corrector is skipped (by step index)."),
    "solver_p": (
        "None", "an external solver for the predictor (diffusers accepts a scheduler object); not supported, "
        "refused."),
    "shift_terminal": (
        "float or None", "stretch the schedule to end at this terminal value; not implemented, refused."),
}, notes={
    **SIGMA_NOTES,
    "sigma_min": "None: the training table's smallest sigma.",
    "sigma_max": "None: the training table's largest sigma.",
    "final_sigmas_type": 'With Karras sigmas ``"sigma_min"`` is the last Karras sigma, so the last step is the '
                         "identity.",
})
class UniPC(SigmaGrid):
    """diffusers' ``UniPCMultistepScheduler`` (predict_x0, bh1 / bh2, order <= 2, optional disable_corrector).

    Args:
        {args}
    """

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    DEFAULTS = {**COMMON_DEFAULTS, **THRESHOLD_DEFAULTS, "timestep_spacing": "linspace", "solver_order": 2,
                "predict_x0": True, "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [],
                "use_karras_sigmas": False, "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None}
    NEUTRAL = {**SIGMA_NEUTRAL, "solver_p": None, "shift_terminal": None}

    def validate(self) -> None:
        if self["solver_order"] not in (1, 2):
            raise InvalidInput(f"{self.label()}: solver_order={self['solver_order']!r} is not supported (order 3 "
                               "needs three earlier model outputs per step); use solver_order=2 or 1")
        if not self["predict_x0"]:
            raise InvalidInput(f"{self.label()}: predict_x0=False (UniPC on noise predictions) is not supported; "
                               "use predict_x0=True")
        self._choice("solver_type", ("bh2", "bh1"))
        self._choice("final_sigmas_type", FINAL_SIGMAS_TYPES)

    def _karras_last(self, sig: np.ndarray, ac) -> float:
        return float(sig[-1])  # UniPC ends Karras grids on the last Karras sigma

    def _plan(self, n: int) -> StepPlan:
        cfg = self._config
        if not cfg["lower_order_final"] and cfg["solver_order"] == 2 and n >= 2 and cfg["final_sigmas_type"] == "zero":
            raise InvalidInput(
                f"{self.label()}: lower_order_final=False with final_sigmas_type='zero' makes the last step a "
                "second-order step to sigma 0, which divides by zero (diffusers returns inf / NaN there); set "
                "lower_order_final=True or final_sigmas_type='sigma_min'")
        ts, sigmas = self.sigma_grid(n)
        vp = [vp_from_sigma(x) for x in sigmas.astype(np.float64)]  # (alpha, sig, lambda) per noise level
        disabled = {int(k) for k in (cfg["disable_corrector"] or [])}
        order = int(cfg["solver_order"])
        # diffusers' this_order: warm-up from 1, and 1 again at the last step with lower_order_final
        orders = [min(order, n - i if cfg["lower_order_final"] else order, i + 1) for i in range(n)]
        rows = Rows(n)
        for i in range(n):
            px, pm = x0_coefs(cfg["prediction_type"], vp[i][0], vp[i][1])
            corrected = i > 0 and (i - 1) not in disabled
            # xc_i = cs * saved + c0 * x0_i + sum_j ch[j] * hist[j]   (or xc_i = x without a corrector)
            cs, c0, ch = self._corrector(vp, i, orders[i - 1]) if corrected else (1.0, 0.0, {})
            ps, p0, pp = self._predictor(vp, i, orders[i])
            # prev = ps * xc_i + p0 * x0_i + pp * x0_{i-1}, expanded
            out: dict = {"x0": p0 + ps * c0, ("saved" if corrected else "x"): ps * cs}
            for j, v in ch.items():
                out[j] = out.get(j, 0.0) + ps * v
            if pp:
                out[_slot(i - 1)] = out.get(_slot(i - 1), 0.0) + pp
            saved = ({"saved": cs, "x0": c0, **ch} if corrected else {"x": 1.0})
            needs_saved = i + 1 < n and i not in disabled  # read by the corrector of step i + 1
            rows.set(i, px, pm, out, saved=saved if needs_saved else None, wslot=_slot(i) if i + 1 < n else -1)
        return self._make_plan(ts, rows)

    def _corrector(self, vp: list, i: int, q: int) -> tuple[float, float, dict]:
        """(cs, c0, {slot: coef}) of the corrected sample xc_i from last_sample (= saved), x0_i and earlier x0s,
        for a corrector of order q over the step i-1 -> i."""
        a_i, sg_i, l_i = vp[i]
        h = l_i - vp[i - 1][2]
        b_h, b = _b_coefs(-h, q, self["solver_type"])
        ch = {_slot(i - 1): -a_i * math.expm1(-h)}
        if q == 1:
            rho_cur = 0.5
        else:
            r = (vp[i - 2][2] - vp[i - 1][2]) / h
            rho0, rho_cur = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array(b))
            ch[_slot(i - 2)] = -a_i * b_h * rho0 / r
            ch[_slot(i - 1)] += a_i * b_h * rho0 / r
        ch[_slot(i - 1)] += a_i * b_h * rho_cur
        return sg_i / vp[i - 1][1], -a_i * b_h * rho_cur, ch

    def _predictor(self, vp: list, i: int, p: int) -> tuple[float, float, float]:
        """(ps, p0, pp) with x_{i+1} = ps * xc_i + p0 * x0_i + pp * x0_{i-1}, a predictor of order p."""
        (a_n, sg_n, l_n), (_, sg_i, l_i) = vp[i + 1], vp[i]
        ps = sg_n / sg_i
        if sg_n == sg_i:
            return ps, 0.0, 0.0  # h = 0 (Karras + sigma_min ends on sigma_min twice): the identity on xc_i
        if sg_n == 0:
            return ps, a_n, 0.0  # h = inf: expm1(-h) = -1, so x_{i+1} = x0_i (p == 1 here, checked in _plan)
        h = l_n - l_i
        phi = math.expm1(-h)
        p0, pp = -a_n * phi, 0.0
        if p == 2:
            b_h = phi if self["solver_type"] == "bh2" else -h
            r = (vp[i - 1][2] - l_i) / h
            pp = -a_n * b_h * 0.5 / r
            p0 -= pp
        return ps, p0, pp


def _slot(j: int) -> int:
    """The history ring slot holding the x0 predicted at step j."""
    return j % HIST_SLOTS
