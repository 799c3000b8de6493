"""Progress for the long phases of an export, and the short report it ends with."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastdiff.export._files import human_size


@dataclass
class ParityResult:
    """onnxruntime (or TensorRT) against PyTorch on one set of random inputs."""

    label: str
    shape: dict[str, int]
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    tol: float
    ok: bool

    def line(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        return (f"{self.label:5s} {dims}: max abs err {self.max_abs:.3e}, max rel err {self.max_rel:.3e} "
                f"(tol {self.tol:.0e}) {'ok' if self.ok else 'FAILED'}")


@dataclass
class ExportReport:
    """What an export produced; ``summary()`` is printed at the end, ``to_dict()`` saved as
    ``export_report.json`` next to the files."""

    model: str
    format: str
    kind: str = "unet"
    profile: str = ""
    precision: str = ""
    opset: int | None = None
    files: list[tuple[str, int]] = field(default_factory=list)
    parity: list[ParityResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    build_time: float | None = None
    notes: list[str] = field(default_factory=list)

    def add_file(self, path: str | Path) -> None:
        p = Path(path)
        self.files.append((str(p), p.stat().st_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def summary(self) -> str:
        lines = [f"fastdiff.export: {self.model} -> {self.format} ({self.kind}, profile {self.profile}, "
                 f"{self.precision}{f', opset {self.opset}' if self.opset else ''})"]
        lines += [f"  file   {path}  ({human_size(size)})" for path, size in self.files]
        lines += [f"  parity {p.line()}" for p in self.parity]
        if self.timings:
            lines.append("  time   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        if self.build_time is not None:
            lines.append(f"  engine build {self.build_time:.1f} s")
        lines += [f"  note   {n}" for n in self.notes]
        return "\n".join(lines)


class Phases:
    """Named phases with a progress line (tqdm, refreshed every half second so a long phase shows its elapsed
    time) and their durations collected into ``timings``."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "export"):
        self.timings: dict[str, float] = {}
        self.enabled = enabled
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (logs get the final report only)
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None,
                             bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(name)
            ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True)
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            if self._bar is not None:
                self._bar.update(1)

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
