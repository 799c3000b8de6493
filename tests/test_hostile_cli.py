"""Hostile command lines: each is refused with one ``error: ...`` line and a non-zero exit status, before any
model is built or file written (argparse types do the checking, so the messages name the flag)."""

from __future__ import annotations

import pytest
import torch

from tests.cli_helpers import one_line_error

CUDA = torch.cuda.is_available()

# (argv, message fragment)
CASES = [
    (["sample", "--device", "cuda"], "argument --device: 'cuda' needs CUDA"),
    (["sample", "--device", "gpu0"], "argument --device: 'gpu0' is not a device name"),
    (["sample", "--cell", "0"], "argument --cell: must be an integer in [1, 1024], got 0"),
    (["sample", "--cell", "100000"], "argument --cell: must be an integer in [1, 1024]"),
    (["sample", "--num-per-label", "0"], "argument --num-per-label: must be an integer >= 1"),
    (["sample", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["sample", "--steps", "2.5"], "argument --steps: must be an integer, got '2.5'"),
    (["sample", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["sample", "--guidance", "high"], "argument --guidance: must be a number, got 'high'"),
    (["sample", "--seed", "x"], "argument --seed: must be an integer"),
    (["sample", "--labels", "0-9999999"], "got the range '0-9999999'"),
    (["sample", "--labels", "3.7"], "--labels must be comma-separated integers"),
    (["sample", "--labels", "12"], "--labels must be digits in [0, 9]"),
    (["eval", "--sweep", "--steps-list", "0"], "argument --steps-list: each step count must be an integer >= 1"),
    (["eval", "--sweep", "--steps-list", "5,x"], "argument --steps-list: each step count must be an integer"),
    (["eval", "--sweep", "--steps-list", ","], "argument --steps-list: give at least one step count"),
    (["eval", "--num-per-class", "1"], "argument --num-per-class: must be an integer >= 2"),
    (["eval", "--device", "cuda:0"], "argument --device: 'cuda:0' needs CUDA"),
    (["distill", "generate", "--out", "o", "-n", "0"], "argument -n/--num-samples: must be an integer >= 1"),
    (["distill", "generate", "--out", "o", "--shard-size", "0"], "argument --shard-size: must be an integer >= 1"),
    (["distill", "generate", "--out", "o", "--steps", "-1"], "argument --steps: must be an integer >= 1"),
    (["distill", "generate", "--out", "o", "--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["distill", "train", "--triplets", "t", "--out", "o", "--batch-size", "0"], "argument --batch-size"),
    (["distill", "train", "--triplets", "t", "--out", "o", "--lr", "inf"], "argument --lr: must be a finite"),
    (["train", "digits", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["train", "digits", "--label-dropout", "2"], "argument --label-dropout: must be a number in [0.0, 1.0]"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_with_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    if CUDA and "needs CUDA" in needle:
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)  # nothing may be written; if something were, it lands here
    err = one_line_error(argv, capsys)
    assert needle in err
    assert len(err) < 400  # no 10-million-entry messages
    assert not list(tmp_path.iterdir())
