"""``python -m fastdiff export``: the same command as ``python -m fastdiff.export`` (its parser, its entry point)."""

from __future__ import annotations

import argparse

from fastdiff.errors import InvalidInput
from fastdiff.export.__main__ import build_parser, main


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` with fastdiff.export's own options (copied from its parser, so they cannot drift)."""
    own = build_parser()
    return subparsers.add_parser("export", parents=[own], add_help=False,
                                 help="export a UNet (or a whole few-step sampler) to ONNX / TensorRT",
                                 description=own.description, epilog=own.epilog,
                                 formatter_class=own.formatter_class)


def run(args: argparse.Namespace) -> int:
    """Check what fastdiff.export's entry point would report as a usage block, then hand it the arguments."""
    if not args.list_profiles and not (args.model and args.out):
        raise InvalidInput("MODEL and --out are required (or --list-profiles)")
    return main(args.command_argv)
