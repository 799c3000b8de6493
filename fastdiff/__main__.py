"""``python -m fastdiff``: the command line, defined in :mod:`fastdiff.cli`."""

from fastdiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
