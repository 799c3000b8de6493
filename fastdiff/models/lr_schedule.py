"""The learning-rate schedule the package's training loops share: linear warm-up, then cosine decay to a floor.

Kept in its own small module (no model, judge or sampler imports) so that any trainer, including the ones the
shapes pipeline imports, can use it without pulling the digits trainer and its evaluation stack along.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, lr: float, warmup: int, floor: float = 0.05) -> float:
    """The rate at ``step`` of ``total``: ``lr * (step + 1) / warmup`` during warm-up, then a cosine decay from
    ``lr`` to ``floor * lr`` at ``total`` (5 % for the model trainers; the shapes judge's trainer decays to 2 %)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def default_warmup(total: int, cap: int) -> int:
    """A tenth of the run (at least one step), never more than ``cap`` steps."""
    return min(cap, total // 10 + 1)


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, lr: float, warmup: int, floor: float = 0.05) -> float:
    """Set every parameter group of ``opt`` to :func:`lr_at` ``(step, total, lr, warmup, floor)``; return that
    rate."""
    rate = lr_at(step, total, lr, warmup, floor)
    for group in opt.param_groups:
        group["lr"] = rate
    return rate
