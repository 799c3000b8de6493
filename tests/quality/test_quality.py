"""Quality measurement: Fréchet distance math, the judge classifier, evaluate / sweep / the eval CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.cli import main as cli
from fastdiff.models import digits
from fastdiff.quality import evaluate, format_table, frechet_distance, score
from fastdiff.quality.classifier import train_classifier
from fastdiff.quality.sweep import plot, sweep, write_table


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)  # covariances equal: |mu1 - mu2|^2
    # N(0, I) vs N(0, 4 I) in 4-d: tr(I) + tr(4I) - 2 tr(2I) = 4
    b = 2 * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.15)


def test_frechet_distance_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(200, 6, generator=g, dtype=torch.float64) + 0.5
    m1, m2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    ref = ((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * scipy_linalg.sqrtm(s1 @ s2).real.trace()
    assert frechet_distance(a, b) == pytest.approx(float(ref), rel=1e-6)


def test_judge_is_accurate_on_held_out_real_digits():
    _, acc = train_classifier(0)
    assert acc >= 0.95


def test_score_real_digits_and_wrong_labels():
    x, y = digits.load_digits_tensors()
    _, te = digits.split_indices(x.shape[0], 0.25, seed=0)
    good = score(x[te], y[te])
    assert good["accuracy"] >= 0.95
    assert good["fd"] < 3 * good["fd_real_floor"]
    wrong = score(x[te], (y[te] + 1) % 10)
    assert wrong["accuracy"] < 0.1
    noise = score(torch.rand(200, 1, 16, 16) * 2 - 1, torch.arange(200) % 10)
    assert noise["fd"] > 20 * good["fd"]


def test_evaluate_sweep_table_and_plot(tiny_dir, tmp_path):
    r = evaluate(str(tiny_dir), scheduler="ddim", num_inference_steps=2, guidance_scale=2.0, num_per_class=2)
    assert r.n == 20 and r.steps == 2 and r.scheduler == "ddim" and 0.0 <= r.accuracy <= 1.0
    assert r.fd > 0 and r.sample_s > 0 and len(r.per_class_accuracy) == 10 and r.device.startswith("cpu")
    again = evaluate(str(tiny_dir), scheduler="ddim", num_inference_steps=2, guidance_scale=2.0, num_per_class=2)
    assert (again.accuracy, again.fd) == (r.accuracy, r.fd)  # fixed per-sample seeds
    rs = sweep(str(tiny_dir), ["dpmpp_2m", "euler"], [1, 2], num_per_class=2, progress=False,
               extra=[{"model": str(tiny_dir), "scheduler": "onestep", "num_inference_steps": 1}])
    assert [(x.scheduler, x.steps) for x in rs] == [("dpmpp_2m", 1), ("dpmpp_2m", 2), ("euler", 1), ("euler", 2),
                                                    ("onestep", 1)]
    md = write_table(rs, tmp_path / "sweep.md")
    text = md.read_text()
    assert "| dpmpp_2m | 2 |" in text and "Machine: cpu" in text
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 5
    png = plot(rs, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert format_table(rs).count("\n") == 6


def test_cli_eval(tiny_dir, tmp_path, capsys):
    assert cli(["eval", "--model", str(tiny_dir), "--steps", "2", "--num-per-class", "2",
                "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "judge held-out accuracy" in out
    assert json.loads((tmp_path / "r.json").read_text())[0]["steps"] == 2
    assert cli(["eval", "--model", str(tiny_dir), "--sweep", "--schedulers", "ddim", "--steps-list", "1,2",
                "--num-per-class", "2", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "sweep.md").exists()
    md = (tmp_path / "sweep.md").read_text()
    assert f"torch {torch.__version__}" in md and "--schedulers ddim --steps-list 1,2 --num-per-class 2" in md
    assert cli(["eval", "--model", str(tiny_dir), "--sweep", "--out", str(tmp_path / "missing")]) == 2
    assert cli(["eval", "--model", "nope"]) == 2
    assert "'digits'" in capsys.readouterr().err


def test_evaluate_refuses_zero_steps(tiny_dir):
    from fastdiff.errors import InvalidInput

    with pytest.raises(InvalidInput, match="num_inference_steps"):  # 0 used to run the default 20, labelled 0
        evaluate(str(tiny_dir), num_inference_steps=0, num_per_class=2)


def test_cli_sweep_without_matplotlib_writes_the_table(tiny_dir, tmp_path, capsys, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli(["eval", "--model", str(tiny_dir), "--sweep", "--schedulers", "ddim", "--steps-list", "1",
                "--num-per-class", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sweep.md").exists() and (tmp_path / "sweep.json").exists()
    assert not (tmp_path / "sweep.png").exists()
    assert "skipped the plot: matplotlib is not installed" in capsys.readouterr().err
