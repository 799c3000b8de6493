"""Noise schedules and timestep grids shared by every scheduler family.

The *training* noise schedule of a model is, in practice, diffusers' float32 table: ``betas`` built with
``torch.linspace`` in float32, ``alphas_cumprod = cumprod(1 - betas)`` in float32. We rebuild that table bit for
bit (with torch on the CPU, so linspace and cumprod round exactly as diffusers does; numpy's versions differ in the
last bit) and do every later computation in float64. Building the table the same way also makes derived integer
timesteps (Karras ``sigma -> t`` rounding) identical to diffusers'.

Timestep grids (``timestep_spacing``), per Table 2 of "Common Diffusion Noise Schedules and Sample Steps are
Flawed" (arXiv:2305.08891), with ``T = num_train_timesteps`` and ``n`` steps:

- ``linspace``: ``round(linspace(0, T - 1, n))`` reversed,
- ``leading``:  ``arange(n) * (T // n) + steps_offset`` reversed,
- ``trailing``: ``round(arange(T, 0, -T / n)) - 1``.
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.errors import InvalidInput

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal): 1 - abar(t2) / abar(t1), capped at max_beta."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]


def _rescale_zero_terminal_snr(betas):
    """Algorithm 1 of arXiv:2305.08891 on a float32 torch tensor: shift / scale sqrt(alphas_cumprod) so that the last
    one is exactly 0 (zero terminal SNR) and the first is unchanged, then convert back to betas."""
    import torch

    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt -= last
    abar_sqrt *= first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(config: dict):
    """The (T,) float32 torch tensor of betas diffusers builds for ``config`` (keys ``num_train_timesteps``,
    ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``, ``rescale_betas_zero_snr``)."""
    import torch

    n = int(config["num_train_timesteps"])
    start, end, schedule = config["beta_start"], config["beta_end"], config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = torch.tensor(np.asarray(config["trained_betas"], dtype=np.float64), dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = torch.tensor(_cosine_betas(n), dtype=torch.float32)
    else:
        raise InvalidInput(f"beta_schedule {schedule!r} is not supported; choose one of {', '.join(BETA_SCHEDULES)} "
                           "(or pass trained_betas)")
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_f32(config: dict, terminal_floor: bool = False):
    """(T,) float32 torch tensor ``cumprod(1 - betas)`` exactly as diffusers stores it.

    ``terminal_floor``: the sigma-based schedulers (Euler, DPM-Solver, UniPC) replace an exactly-zero terminal
    ``alphas_cumprod`` (``rescale_betas_zero_snr``) by ``2**-24`` so that sigma stays finite."""
    import torch

    ac = torch.cumprod(1.0 - make_betas(config), dim=0)
    if terminal_floor and config.get("rescale_betas_zero_snr"):
        ac[-1] = 2**-24
    return ac


def alphas_cumprod(config: dict) -> np.ndarray:
    """(T,) float64 copy of diffusers' float32 ``alphas_cumprod`` table (no terminal floor: DDPM / DDIM / LCM)."""
    return alphas_cumprod_f32(config).numpy().astype(np.float64)


def sigma_table_f32(config: dict) -> np.ndarray:
    """(T,) float32 ``sqrt((1 - abar) / abar)`` over training timesteps 0..T-1, as diffusers' sigma schedulers
    compute it (float32, with the zero-SNR terminal floor)."""
    ac = alphas_cumprod_f32(config, terminal_floor=True)
    return np.array(((1 - ac) / ac) ** 0.5)


def timestep_grid(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0, *,
                  plus_one: bool = False, float32: bool = False, last_timestep: int | None = None) -> np.ndarray:
    """Descending timesteps for ``n`` steps (see the module docstring), as diffusers' ``set_timesteps`` builds them.

    Args:
        plus_one: the multistep solvers (DPM-Solver, UniPC) space ``n + 1`` points for linspace / leading and drop
            the last one (t = 0).
        float32: Euler-type schedulers keep linspace values unrounded, as float32.
        last_timestep: DPM-Solver's ``lambda_min_clipped`` shortens the trained range to ``[0, last_timestep)``.

    Returns (n,) int64, or float32 with ``float32=True``.

    diffusers' trailing spacing ``arange(T, 0, -T / n)`` sometimes yields ``n + 1`` values (float error leaves a
    value just above 0, e.g. n = 61 with T = 1000), i.e. a spurious extra timestep -1. We keep the first ``n``.
    """
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        if plus_one:
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif float32:
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        else:
            ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        if plus_one:
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1]
        else:
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1]
        ts = ts.astype(np.float32 if float32 else np.int64) + steps_offset
        return ts.astype(np.float32) if float32 else ts
    elif spacing == "trailing":
        ts = np.round(np.arange(last, 0, -T / n))[:n] - 1
    else:
        raise InvalidInput(f"timestep_spacing {spacing!r} is not supported; "
                           f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
    return ts.astype(np.float32) if float32 else ts.copy().astype(np.int64)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose log-sigma matches ``log(sigma)``, by linear interpolation in log-sigma
    over the (T,) float32 ``log_sigmas`` table (the same arithmetic as diffusers, so rounding agrees)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """(n,) float64 Karras et al. (2022) noise levels: (smax^(1/rho) + i/(n-1) * (smin^(1/rho) - smax^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
