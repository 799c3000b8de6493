"""The benchmark ratio table (benches/conftest.py) compares time per call, whatever each provider's round length."""

from __future__ import annotations

import types

import pytest

conftest = pytest.importorskip("benches.conftest")


def _bench(round_median_s: float, calls: int | None):
    info = {} if calls is None else {"calls_per_round": calls}
    return types.SimpleNamespace(stats=types.SimpleNamespace(stats=types.SimpleNamespace(median=round_median_s)),
                                 extra_info=info)


@pytest.fixture
def results(monkeypatch):
    fresh = conftest.defaultdict(dict)
    monkeypatch.setattr(conftest, "RESULTS", fresh)
    return fresh


def test_rounds_of_different_lengths_compare_per_call(results):
    # diffusers: 200 calls of 10 us in a 2 ms round; fastdiff: 40 calls of 5 us in a 0.2 ms round -> 2.00x faster
    conftest.record_result("op", "shape1", "diffusers", _bench(2e-3, 200))
    conftest.record_result("op", "shape1", "fastdiff", _bench(2e-4, 40))
    assert results[("op", "shape1")]["diffusers"][0] == pytest.approx(1e-5)
    assert results[("op", "shape1")]["fastdiff"][0] == pytest.approx(5e-6)
    text, suites = conftest.ratio_table()
    assert suites == ["op"]
    row = next(line for line in text.splitlines() if line.startswith("| shape1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["10.0", "5.0", "2.00x"]  # diffusers us, fastdiff us, fastdiff vs diffusers


def test_single_call_rounds_and_best_of_column(results):
    for provider, seconds in {"sdpa-flash": 4e-6, "sdpa-cudnn": 3e-6, "fastdiff": 2e-6, "diffusers": 3e-6}.items():
        conftest.record_result("attention-graph", "s", provider, _bench(seconds, None), tflops=1.0)
    text, _ = conftest.ratio_table()
    row = next(line for line in text.splitlines() if line.startswith("| s |"))
    assert "1.50x (sdpa-cudnn)" in row  # best rival 3 us / fastdiff 2 us
    assert "fastdiff: 1 TFLOP/s" in row
