"""Child process of the kill / race tests: runs a fastdiff command line with every write slowed down, so another
process can SIGKILL it, or race it, while a file is half written.

    python -m tests.slow_writes PAUSE_S -- fastdiff-cli-args...

Each ``os.fdopen(..., "wb")`` file writes half of what it is given, flushes it to the disk, prints ``HALF`` on
stdout, sleeps ``PAUSE_S`` and writes the rest. This is the file object every atomic write goes through; a
command that wrote in place (PIL's ``save(path)``) would instead truncate its target right away.
"""

from __future__ import annotations

import os
import sys
import time


class _SlowFile:
    def __init__(self, f, pause: float):
        self._f, self._pause = f, pause

    def write(self, data) -> int:
        half = len(data) // 2
        n = self._f.write(data[:half])
        self._f.flush()
        os.fsync(self._f.fileno())
        print("HALF", flush=True)
        time.sleep(self._pause)
        return n + self._f.write(data[half:])

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def main(argv: list[str]) -> int:
    pause = float(argv[0])
    args = argv[argv.index("--") + 1:]
    fdopen = os.fdopen

    def slow_fdopen(fd, mode="r", *a, **k):
        f = fdopen(fd, mode, *a, **k)
        return _SlowFile(f, pause) if "w" in mode else f

    os.fdopen = slow_fdopen
    if args[0] == "distill":
        from fastdiff.distill.__main__ import main as cli
        args = args[1:]
    else:
        from fastdiff.cli import main as cli
    return cli(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
