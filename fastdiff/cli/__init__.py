"""``python -m fastdiff`` (also the ``fastdiff`` script): the package's one command line.

    python -m fastdiff sample   [--model M] [--labels 0-9] [--seed S] [--device D] [--out grid.png] ...
    python -m fastdiff eval     [--model M] [--sweep] [--seed S] [--device D] [--out DIR] ...
    python -m fastdiff info
    python -m fastdiff export   MODEL --format onnx|tensorrt --out DIR ...
    python -m fastdiff distill  generate|train ... [--seed S] [--threads N] --out DIR
    python -m fastdiff train    digits [--seed S] [--threads N] [--out DIR] ...
    python -m fastdiff serve    [--model M] [--http-port P] [--grpc-port P] [--max-batch N] ...
    python -m fastdiff request  [--url U] --labels L | --prompt P [--seed S] --out x.png

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args) -> exit status``. ``export``,
``distill`` and ``train`` take their options from the modules that own them (``fastdiff.export``,
``fastdiff.distill``, ``fastdiff.models.train_digits``), so ``python -m fastdiff.export ...`` and
``python -m fastdiff.distill ...`` keep working as aliases with the same flags. Shared flags have one name
everywhere: ``--model``, ``--device``, ``--seed``, ``--out``, ``--threads``. Every error is one line,
``error: ...`` on stderr, with a non-zero exit status (2 for bad arguments or inputs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastdiff.errors import FastDiffError

#: subcommand -> its module under fastdiff.cli (imported by name: "eval" would shadow the builtin as a name here)
COMMANDS = ("sample", "eval", "info", "export", "distill", "train", "serve", "request")


def resolve_device(device: str | None) -> str:
    """A ``--device`` value as torch takes it: ``auto`` (every command's default) is ``cuda`` when a CUDA device is
    available, else ``cpu``; anything else is passed on as given."""
    if device is None or device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``--device`` flag (default ``auto``; see :func:`resolve_device`)."""
    from fastdiff._checks import cli_device

    def device(text: str) -> str:  # "auto" is resolved later; anything else must be usable here
        return text if text == "auto" else cli_device(text)

    parser.add_argument("--device", type=device, default="auto", help="auto (CUDA when available, else CPU; the "
                        "default), cpu, cuda, cuda:1")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``--compile`` flag (``fastdiff.Sampler(..., compile=True)``)."""
    parser.add_argument("--compile", action="store_true", help="run the network torch.compile'd (compiles on "
                        "first use: tens of seconds; falls back to eager with a warning where it cannot)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: ...``, exit status 2) instead of the usage block; sub-parsers
    created with ``add_parser`` inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fastdiff", description="fastdiff: fused sampling for diffusion models -- "
                     "sample, evaluate, export, distill and train from one command line.",
                     epilog="run 'python -m fastdiff COMMAND --help' for a command's options")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The top-level parser has no options of its own, so the command is argv[0] and the rest is its argv: the
    # subcommands that hand their arguments on to another module's entry point (export) need them as given.
    args.command_argv = argv[1:]
    try:
        return args.run(args)
    except FastDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
