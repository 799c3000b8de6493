"""Sweep schedulers x step counts (plus extra fixed settings such as a one-step student), write a Markdown table
and a quality-against-time plot (PNG)."""

from __future__ import annotations

import datetime
import io
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text
from fastdiff.quality.evaluate import EvalResult, evaluate, format_table, machine_description


def sweep(model="digits", schedulers: Iterable[str] = ("dpmpp_2m", "ddim", "euler", "unipc"),
          steps: Iterable[int] = (5, 10, 20, 50), guidance_scale: float | None = None,
          extra: Iterable[dict] = (), num_per_class: int = 50, seed: int = 0, backend: str = "auto",
          progress: bool = True) -> list[EvalResult]:
    """``evaluate`` for each scheduler x step count of ``model``, then for each dict in ``extra`` (keyword
    arguments of ``evaluate``, e.g. ``{"model": "digits-onestep"}``)."""
    from tqdm.auto import tqdm

    jobs = [dict(model=model, scheduler=s, num_inference_steps=n, guidance_scale=guidance_scale)
            for s in schedulers for n in steps]
    jobs += [dict(e) for e in extra]
    results = []
    bar = tqdm(jobs, desc="sweep", disable=not progress)
    for job in bar:
        bar.set_postfix_str(f"{job.get('model')} {job.get('scheduler') or 'default'} {job.get('num_inference_steps')}")
        job = {"num_per_class": num_per_class, "seed": seed, "backend": backend, **job}
        results.append(evaluate(**job))
    return results


def plot(results: list[EvalResult], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy and FD against ms per image, one line per (model, scheduler), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple[str, str], list[EvalResult]] = {}
    for r in results:
        groups.setdefault((r.model, r.scheduler), []).append(r)
    for (model, sched), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.steps)
        xs = [r.ms_per_image for r in rs]
        label = f"{model} / {sched}"
        style = dict(marker="*", markersize=14, linestyle="none") if len(rs) == 1 else dict(marker="o")
        axes[0].plot(xs, [100 * r.accuracy for r in rs], label=label, **style)
        axes[1].plot(xs, [r.fd for r in rs], label=label, **style)
        for r in rs:
            # an adaptive step count is labelled with the mean it measured, not its maximum
            text = str(r.steps) if r.mean_steps in (None, r.steps) else f"{r.mean_steps:.2f}"
            axes[0].annotate(text, (r.ms_per_image, 100 * r.accuracy), fontsize=7,
                             textcoords="offset points", xytext=(3, 3))
            axes[1].annotate(text, (r.ms_per_image, r.fd), fontsize=7, textcoords="offset points",
                             xytext=(3, 3))
    for ax, ylab in zip(axes, ("conditional accuracy (%)", "Fréchet distance (judge features)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("sampling time per image (ms, log)")
        ax.set_ylabel(ylab)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    if results:
        fig.suptitle(title or f"quality vs time (labels: steps) on {results[0].device}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()  # rendered in memory, then written atomically (savefig to a path writes in place)
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_table(results: list[EvalResult], path: str | os.PathLike, note: str = "",
                formatter: Callable[[list[EvalResult]], str] = format_table) -> Path:
    """Markdown table (with machine, judge accuracy and the real-vs-real FD floor) + a JSON twin. ``formatter``
    makes the table from the results (``compare`` has its own columns)."""
    p = Path(path)
    lines = [formatter(results), ""]
    if results:
        r0 = results[0]
        lines.append(f"Machine: {r0.device if r0.device else machine_description()}. Judge: CNN trained on 75% of the "
                     f"real digits, held-out accuracy {100 * r0.classifier_accuracy:.1f}%. FD of real vs real "
                     f"(two halves): {r0.fd_real_floor:.1f}. {r0.n} images per row.")
        lines.append(f"Made {datetime.date.today().isoformat()} with torch {torch.__version__}.")
    if note:
        lines.append(note)
    atomic_write_text(p.with_suffix(".json"), json.dumps([r.as_dict() for r in results], indent=1) + "\n")
    atomic_write_text(p, "\n".join(lines) + "\n")
    return p
