"""``eval --compare``: network rows counted (CFG 2 per image, none 1, adaptive measured), the table / JSON / plot
written atomically, bad inputs refused with one line before any sampling."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fastdiff.cli import main as cli
from fastdiff.models import load
from fastdiff.quality import compare as compare_mod
from fastdiff.quality import evaluate
from fastdiff.quality.compare import (
    CompareJob,
    compare,
    default_jobs,
    evaluate_adaptive,
    format_compare_table,
    training_wall_s,
)
from fastdiff.quality.evaluate import count_network_rows
from fastdiff.quality.sweep import plot, write_table
from tests.cli_helpers import one_line_error


def test_counter_counts_rows_and_restores_the_network(tiny_dir):
    m = load(str(tiny_dir))
    x = torch.randn(5, 1, 16, 16)
    with count_network_rows(m) as c:
        m(x, torch.tensor([10] * 5), torch.arange(5))
        m(x[:3], torch.tensor([10] * 3), torch.arange(3))
    assert (c.rows, c.calls) == (8, 2)
    assert "forward" not in m.unet.__dict__  # the wrapper is gone: later calls are not counted
    m(x, torch.tensor([10] * 5), torch.arange(5))
    assert c.rows == 8


@pytest.mark.parametrize("guidance, per_step", [(2.0, 2), (1.0, 1)])
def test_evaluate_counts_two_rows_per_image_per_step_with_cfg(tiny_dir, guidance, per_step):
    # a CFG batch is the conditional and the unconditional row of every image: 2 per image per step; a counter that
    # counted calls, or images, instead of rows would give 1 here under CFG
    r = evaluate(str(tiny_dir), scheduler="ddim", num_inference_steps=3, guidance_scale=guidance, num_per_class=2)
    assert r.calls_per_image == 3 * per_step


def test_adaptive_coalescer_counts_its_measured_steps():
    m = load("digits-coalescer")
    always_two = evaluate_adaptive(m, 2, math.inf, guidance=1.5, num_per_class=2)
    assert always_two.mean_steps == 2 and always_two.calls_per_image == 4
    mixed = evaluate_adaptive(m, 2, compare_mod.COALESCER_ADAPTIVE_THRESHOLD, guidance=1.5, num_per_class=4)
    assert 1 <= mixed.mean_steps <= 2
    assert mixed.calls_per_image == pytest.approx(2 * mixed.mean_steps)  # CFG: two rows per sample per step
    unguided = evaluate_adaptive(m, 2, 0.0, guidance=1.0, num_per_class=2)  # every sample stops after one step
    assert unguided.mean_steps == 1 and unguided.calls_per_image == 1


def test_training_wall_time_read_not_invented():
    assert training_wall_s("digits") == pytest.approx(3267.7)
    assert training_wall_s("digits-onestep") is None  # not recorded in its config
    table = format_compare_table(compare([CompareJob("digits-onestep", "triplet regression", 1)], num_per_class=2,
                                         progress=False))
    assert table.splitlines()[-1].endswith("| 1.00 | - |")


def test_default_jobs_are_the_issue_rows(tiny_dir):
    jobs = default_jobs([(str(tiny_dir), [1, 4])], 0.99)
    got = [(j.model, j.steps, j.adaptive) for j in jobs]
    assert got == [("digits", 5, None), ("digits", 10, None), ("digits", 20, None), ("digits-onestep", 1, None),
                   ("digits-coalescer", 1, None), ("digits-coalescer", 2, None), ("digits-coalescer", 2, 0.99),
                   ("digits-consistency", 1, None), ("digits-consistency", 2, None), ("digits-consistency", 4, None),
                   (str(tiny_dir), 1, None), (str(tiny_dir), 4, None)]


@pytest.fixture
def small_jobs(monkeypatch, tiny_dir):
    """The CLI's jobs cut to seconds: the tiny model (CFG 2, 2 steps), the adaptive coalescer, then the extras."""
    def jobs(extra=(), threshold=0.998):
        return ([CompareJob(str(tiny_dir), "teacher", 2, scheduler="ddim", guidance=2.0),
                 CompareJob("digits-coalescer", "coalescer, adaptive", 2, adaptive=threshold)]
                + [CompareJob(p, "extra model", s) for p, steps in extra for s in steps])
    monkeypatch.setattr(compare_mod, "default_jobs", jobs)


def test_cli_compare_writes_table_json_and_plot(small_jobs, tiny_dir, tmp_path, capsys):
    assert cli(["eval", "--compare", "--num-per-class", "2", "--out-dir", str(tmp_path),
                "--extra-model", f"{tiny_dir}:1"]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    # the tiny model's default CFG is 1.5: 2 rows per image per step for the teacher row and the extra row alike
    assert [(r["method"], r["steps"], r["guidance"], r["calls_per_image"]) for r in rows][::2] == [
        ("teacher", 2, 2.0, 4.0), ("extra model", 1, 1.5, 2.0)]
    assert 2 <= rows[1]["calls_per_image"] <= 4 and rows[1]["mean_steps"] is not None
    md = (tmp_path / "compare.md").read_text()
    assert "network calls / image" in md and "--extra-model" in md and md.count("\n| ") == 3  # three data rows
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_outputs_are_written_atomically(tiny_dir, tmp_path, monkeypatch):
    results = compare([CompareJob(str(tiny_dir), "teacher", 1, scheduler="ddim")], num_per_class=2, progress=False)
    for name in ("compare.md", "compare.json", "compare.png"):
        (tmp_path / name).write_text("old")

    def crash(*a, **k):  # dies after the temporary file is written, before it replaces the target
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_table(results, tmp_path / "compare.md", formatter=format_compare_table)
    with pytest.raises(OSError, match="simulated"):
        plot(results, tmp_path / "compare.png")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: "old" for n in
                                                                   ("compare.md", "compare.json", "compare.png")}


@pytest.mark.parametrize("argv, needle", [
    (["--extra-model", "no/such/folder"], "no/such/folder"),
    (["--extra-model", "digits-onestep:1,x"], "whole numbers"),
    (["--extra-model", "digits-onestep:0"], "whole numbers"),
    (["--out-dir", "no/such/dir"], "--out"),
    (["--sweep"], "not allowed"),
    (["--compile"], "--compare"),
])
def test_cli_compare_bad_inputs_one_line(argv, needle, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("inputs must be checked before any sampling")

    monkeypatch.setattr(compare_mod, "compare", no_work)
    assert needle in one_line_error(["eval", "--compare", *argv], capsys)


def test_extra_models_are_named_by_folder_and_training(tmp_path, tiny_dir):
    """An extra model's row says what it is (from its config's metadata) and is named by its folder, so two
    retrained teachers that both call themselves "digits" stay apart."""
    import shutil

    from fastdiff.quality.compare import extra_method

    assert extra_method(str(tiny_dir)) == "extra model"
    for name, meta, want in (("repa", {"repa_weight": 0.5, "steps_done": 1200}, "teacher, REPA λ=0.5, 1200 steps"),
                             ("plain", {"steps_done": 1200}, "teacher, 1200 steps"),
                             ("cm", {"objective": "consistency", "target": "trajectory"},
                              "consistency (trajectory target)")):
        d = tmp_path / name
        shutil.copytree(tiny_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["metadata"] = meta
        (d / "config.json").write_text(json.dumps(cfg))
        assert extra_method(str(d)).startswith(want)
    r = compare([CompareJob(str(tmp_path / "repa"), extra_method(str(tmp_path / "repa")), 1)], num_per_class=2,
                progress=False)[0]
    assert r.model == "repa" and r.method.startswith("teacher, REPA")
