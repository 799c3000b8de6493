"""``python -m fastdiff distill generate|train``: the same command as ``python -m fastdiff.distill``."""

from __future__ import annotations

import argparse

from fastdiff.distill.__main__ import __doc__ as distill_doc
from fastdiff.distill.__main__ import add_arguments, run


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``distill`` with fastdiff.distill's own subcommands and options."""
    p = subparsers.add_parser("distill", help="generate teacher triplets / train a one-step or consistency student",
                              description=distill_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


__all__ = ["add_parser", "run"]
