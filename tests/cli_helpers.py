"""The CLI's error contract, shared by the CLI tests: a refused command exits non-zero with one ``error: ...`` line."""

from __future__ import annotations

from fastdiff.cli import main


def one_line_error(argv: list[str], capsys) -> str:
    """Run ``python -m fastdiff *argv`` in process; assert it failed with a single ``error:`` line; return it."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse exits from inside main
        status = e.code
    err = capsys.readouterr().err
    assert status not in (0, None)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
