"""``eval --compare --model shapes``: rows measured on the same prompts / seeds / judge, calls counted, the
training time read from each model's metadata, the table / JSON / plot written, bad input refused before work.

The rows run on a tiny randomly initialised pipeline (as an extra folder) and on two prompts x one seed, so the
judge's numbers mean nothing here; what is checked is that each row is what it says it is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.quality import shapes_compare as SC
from tests.export.tiny_models import tiny_shapes_pipeline, tiny_shapes_unet_config

PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_shapes_pipeline(tmp_path_factory.mktemp("shapes_tiny"), tiny_shapes_unet_config())


def test_rows_count_calls_and_match_a_direct_evaluation(tiny_dir):
    from fastdiff.quality.shapes_eval import evaluate

    jobs = [SC.ShapesCompareJob(str(tiny_dir), "tiny", 2), SC.ShapesCompareJob(str(tiny_dir), "tiny", 3,
                                                                               guidance=1.0)]
    rows = SC.compare(jobs, seeds=(0, 1), prompts=PROMPTS, progress=False)
    assert [r.steps for r in rows] == [2, 3] and all(r.images == 4 for r in rows)
    # CFG 5 (the folder's default) runs a batch of 2 per image per step; guidance 1 one row
    assert rows[0].calls_per_image == pytest.approx(2 * 2) and rows[1].calls_per_image == pytest.approx(3)
    assert rows[0].guidance == 5.0 and rows[1].guidance == 1.0
    direct = evaluate(str(tiny_dir), 2, None, (0, 1), prompts=PROMPTS, progress=False)
    assert (rows[0].one_object, rows[0].two_object) == (direct.one_object, direct.two_object)
    assert rows[0].frechet == pytest.approx(direct.frechet, rel=1e-6)
    assert rows[0].train_wall_s is None  # the tiny folder records no training time


def test_default_rows_and_training_time():
    jobs = SC.default_jobs()
    assert [(j.model, j.steps) for j in jobs[:4]] == [("shapes", 5), ("shapes", 10), ("shapes", 20),
                                                      ("shapes-onestep", 1)]
    assert SC.training_wall_s({"wall_s": 100.0, "data_wall_s": 20}) == 120.0
    assert SC.training_wall_s({"wall_s": 100.0}) == 100.0 and SC.training_wall_s({}) is None
    assert SC.training_wall_s({"wall_s": True}) is None
    # the shipped student records its triplets' time apart from its own training
    onestep = SC._pipeline_meta("shapes-onestep")
    assert SC.training_wall_s(onestep) == pytest.approx(onestep["wall_s"] + onestep["data_wall_s"])
    assert SC.extra_method("shapes-onestep") == "triplet regression"


def test_one_image_is_refused():
    with pytest.raises(InvalidInput, match="at least 2 images"):
        SC.compare(SC.default_jobs(), seeds=(0,), prompts=PROMPTS[:1], progress=False)


def test_parse_extra_pipeline(tiny_dir, tmp_path):
    assert SC.parse_extra_pipeline(str(tiny_dir)) == (str(tiny_dir), [1, 2, 4])
    assert SC.parse_extra_pipeline(f"{tiny_dir}:1,3") == (str(tiny_dir), [1, 3])
    with pytest.raises(InvalidInput, match="whole numbers"):
        SC.parse_extra_pipeline(f"{tiny_dir}:1,x")
    with pytest.raises(ModelNotFound):
        SC.parse_extra_pipeline(str(tmp_path / "nothing"))


def test_write_results(tiny_dir, tmp_path):
    rows = SC.compare([SC.ShapesCompareJob(str(tiny_dir), "tiny", 1)], seeds=(0,), prompts=PROMPTS, progress=False)
    paths = SC.write_results(rows, tmp_path, note="note.")
    assert [p.name for p in paths] == ["compare_shapes.md", "compare_shapes.json", "compare_shapes.png"]
    assert "| shapes_tiny" in paths[0].read_text().replace("shapes_tiny0", "shapes_tiny")
    data = json.loads(paths[1].read_text())
    assert data[0]["calls_per_image"] == pytest.approx(2.0) and data[0]["images"] == 2
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def _args(*argv):
    import argparse

    from fastdiff.cli import eval as cli_eval

    parser = argparse.ArgumentParser()
    cli_eval.add_parser(parser.add_subparsers(dest="command"))
    return cli_eval, parser.parse_args(["eval", *argv])


def test_cli_refuses_bad_input_before_work(tmp_path, tiny_dir):
    r = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--compare", "--model", "shapes", "--steps", "3"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 2 and "does not combine with --compare" in r.stderr  # one line, exit 2
    for argv, error, match in (
            (["--out", str(tmp_path / "missing")], InvalidInput, "--out"),
            (["--extra-model", str(tmp_path / "nope")], ModelNotFound, "nope"),
            (["--guidance", "2"], InvalidInput, "does not combine"),
    ):
        cli_eval, args = _args("--compare", "--model", "shapes", "--out", str(tmp_path), *argv)
        with pytest.raises(error, match=match):
            cli_eval.run(args)
    cli_eval, args = _args("--compare", "--model", str(tiny_dir), "--out", str(tmp_path))
    with pytest.raises(InvalidInput, match="--extra-model"):
        cli_eval.run(args)
    assert not list(tmp_path.glob("compare_shapes*"))


def test_cli_compare_with_an_extra_pipeline(tmp_path, tiny_dir, monkeypatch):
    """The CLI path end to end on two prompts x one seed (the shipped rows are measured by the real run)."""
    calls = []

    def fake_jobs(extra, threshold):
        calls.append((extra, threshold))
        return [SC.ShapesCompareJob(path, "extra", s) for path, steps in extra for s in steps]

    real_compare = SC.compare

    def fake_compare(jobs, seeds=None):
        return real_compare(jobs, seeds=(0,), prompts=PROMPTS, progress=False)

    monkeypatch.setattr(SC, "default_jobs", fake_jobs)
    monkeypatch.setattr(SC, "compare", fake_compare)
    cli_eval, args = _args("--compare", "--model", "shapes", "--extra-model", f"{tiny_dir}:1", "--out", str(tmp_path))
    assert cli_eval.run(args) == 0
    assert calls == [([(str(tiny_dir), [1])], None)]
    assert (tmp_path / "compare_shapes.md").read_text().startswith("| model | method")
    assert torch.tensor(json.loads((tmp_path / "compare_shapes.json").read_text())[0]["calls_per_image"]) == 2.0
