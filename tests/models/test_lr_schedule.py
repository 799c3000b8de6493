"""The trainers' shared bookkeeping: the learning-rate schedule (warm-up, cosine decay to a floor), set_lr over every
parameter group, and the running mean of the loss."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.models.lr_schedule import default_warmup, lr_at, set_lr
from fastdiff.models.running_mean import running_mean


def test_warmup_rises_linearly_then_the_cosine_ends_at_five_percent():
    lr, total, warmup = 2e-3, 1000, 100
    assert lr_at(0, total, lr, warmup) == pytest.approx(lr / warmup)
    assert lr_at(49, total, lr, warmup) == pytest.approx(lr * 50 / warmup)
    assert lr_at(warmup, total, lr, warmup) == pytest.approx(lr)  # the peak, where the decay starts
    mid = warmup + (total - warmup) // 2
    assert lr_at(mid, total, lr, warmup) == pytest.approx(lr * (0.05 + 0.95 * 0.5))
    assert lr_at(total, total, lr, warmup) == pytest.approx(0.05 * lr)
    rates = [lr_at(s, total, lr, warmup) for s in range(warmup, total + 1)]
    assert all(b <= a for a, b in zip(rates[:-1], rates[1:], strict=True))  # never rises after the warm-up
    assert math.isfinite(lr_at(0, 1, lr, 1))  # a one-step run divides by nothing


@pytest.mark.parametrize(("total", "cap", "expected"),
                         [(10, 100, 2), (500, 100, 51), (5000, 100, 100), (5000, 200, 200)])
def test_default_warmup_is_a_tenth_capped(total, cap, expected):
    assert default_warmup(total, cap) == expected


def test_set_lr_sets_every_group_and_returns_the_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a], "lr": 9.0}, {"params": [b], "lr": 7.0}])
    rate = set_lr(opt, 300, 1000, 1e-3, 100)
    assert rate == pytest.approx(lr_at(300, 1000, 1e-3, 100))
    assert [g["lr"] for g in opt.param_groups] == [rate, rate]


@pytest.mark.parametrize("floor", [0.05, 0.02])
def test_lr_floor_is_where_the_decay_ends(floor):
    total, lr, warmup = 1000, 3e-3, 50
    assert lr_at(total, total, lr, warmup, floor) == pytest.approx(floor * lr)
    assert lr_at(warmup, total, lr, warmup, floor) == pytest.approx(lr)
    mid = warmup + (total - warmup) // 2  # cos(pi/2) = 0 within a step: half-way between lr and the floor
    assert lr_at(mid, total, lr, warmup, floor) == pytest.approx(lr * (1 + floor) / 2, rel=1e-3)


def test_running_mean_starts_at_the_first_value_then_smooths():
    assert running_mean(None, 3.0) == 3.0
    avg = running_mean(None, 5.0)
    for _ in range(500):  # a constant loss afterwards: the mean forgets the first value (0.98^500 ~ 4e-5)
        avg = running_mean(avg, 1.0)
    assert avg == pytest.approx(1.0, abs=1e-3)
    assert running_mean(2.0, 1.0) == 0.98 * 2.0 + 0.02 * 1.0  # one step moves 2 % of the way
