"""``python -m fastdiff``: every subcommand answers ``--help``, aliases keep working, errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.cli import COMMANDS, main
from tests.cli_helpers import one_line_error

ROOT = Path(__file__).parents[1]
NESTED = [["distill", "generate"], ["distill", "train"], ["train", "digits"]]


@pytest.mark.parametrize("argv", [[], *([c] for c in COMMANDS), *NESTED], ids=lambda a: " ".join(a) or "top")
def test_every_subcommand_answers_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastdiff" + "".join(f" {a}" for a in argv))


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {c} " in out for c in COMMANDS)


@pytest.mark.parametrize("module_argv", [["fastdiff", "export"], ["fastdiff.export"], ["fastdiff", "distill"],
                                         ["fastdiff.distill"], ["fastdiff.models.train_digits"]],
                         ids=" ".join)
def test_help_in_a_fresh_process_and_the_module_aliases(module_argv):
    """``python -m fastdiff export`` and the documented ``python -m fastdiff.export`` show the same options."""
    r = subprocess.run([sys.executable, "-m", *module_argv, "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: python -m " + " ".join(module_argv))
    if "export" in module_argv[-1]:
        assert "--format {onnx,tensorrt,triton}" in r.stdout and "--list-profiles" in r.stdout


@pytest.mark.parametrize("argv", [[], ["nope"], ["sample", "--bogus"], ["sample", "--out", "grid.jpg"],
                                  ["eval", "--num-per-class", "1"], ["info", "extra"], ["export"],
                                  ["export", "digits", "--format", "png"], ["distill"], ["distill", "train"],
                                  ["train"], ["train", "mnist"], ["train", "digits", "--steps", "x"]],
                         ids=lambda a: " ".join(a) or "none")
def test_errors_are_one_line_with_a_non_zero_status(argv, capsys):
    one_line_error(argv, capsys)


def test_script_entry_point_is_the_cli():
    import fastdiff.__main__

    assert fastdiff.__main__.main is main  # pyproject's `fastdiff = "fastdiff.__main__:main"`


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_device_defaults_to_auto_and_compile_is_a_flag(command):
    from fastdiff.cli import build_parser

    args = build_parser().parse_args([command])
    assert args.device == "auto" and args.compile is False
    assert build_parser().parse_args([command, "--compile", "--device", "cpu"]).compile is True


@pytest.mark.parametrize("available,expected", [(True, "cuda"), (False, "cpu")])
def test_device_auto_is_cuda_when_available_else_cpu(monkeypatch, available, expected):
    import torch

    from fastdiff.cli import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


def test_eval_compile_does_not_combine_with_sweep(capsys):
    from fastdiff.cli import main

    assert main(["eval", "--sweep", "--compile"]) == 2
    assert "--compile measures one setting" in capsys.readouterr().err
