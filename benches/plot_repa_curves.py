"""Plot quality-vs-step curves of digits or shapes teachers trained with and without REPA, and say how many steps
each took to reach the baseline's final quality.

``python -m benches.plot_repa_curves BASELINE.json RUN.json [RUN.json ...] --out docs/repa_curves.png``

Each JSON is a ``--curve`` file of ``python -m fastdiff train digits|shapes --eval-every K`` (the points hold
``step``, ``train_s``, ``fd`` and ``accuracy`` of the EMA weights; for shapes ``accuracy`` is the two-object
score). The summary (printed, and written next to the plot as ``.summary.json``) gives, per run, the first evaluated
step whose FD is at or below the baseline's final FD.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastdiff._atomic import atomic_write_text, check_writable


def label(curve: dict) -> str:
    lam = curve.get("repa_weight")
    return f"REPA lambda={lam:g} ({curve.get('repa_layer')})" if lam else "baseline (no alignment)"


def first_reaching(points: list[dict], fd: float) -> dict | None:
    """The first point whose FD is <= ``fd`` (None if none)."""
    return next((p for p in points if p["fd"] <= fd), None)


def summarize(baseline: dict, runs: list[dict]) -> dict:
    target = baseline["points"][-1]
    out = {"target": {"fd": target["fd"], "accuracy": target["accuracy"], "step": target["step"],
                      "train_s": target["train_s"]}, "runs": []}
    for c in [baseline, *runs]:
        hit = first_reaching(c["points"], target["fd"])
        last = c["points"][-1]
        out["runs"].append({
            "label": label(c), "final_step": last["step"], "final_fd": last["fd"], "final_accuracy": last["accuracy"],
            "final_train_s": last["train_s"], "steps_to_target": hit["step"] if hit else None,
            "train_s_to_target": hit["train_s"] if hit else None,
            "step_speedup": round(target["step"] / hit["step"], 2) if hit else None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.plot_repa_curves", description=__doc__.split("\n")[0])
    p.add_argument("baseline")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="docs/repa_curves.png")
    a = p.parse_args(argv)
    out = check_writable(a.out, "file")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [json.loads(Path(f).read_text()) for f in [a.baseline, *a.runs]]
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for c in curves:
        steps = [pt["step"] for pt in c["points"]]
        ax_fd.plot(steps, [pt["fd"] for pt in c["points"]], marker="o", ms=3, label=label(c))
        ax_acc.plot(steps, [100 * pt["accuracy"] for pt in c["points"]], marker="o", ms=3, label=label(c))
    target = curves[0]["points"][-1]["fd"]
    ax_fd.axhline(target, color="grey", ls=":", lw=1, label=f"baseline final FD {target:.1f}")
    shapes = curves[0].get("accuracy_is") == "two_object"  # a `train shapes --curve` file
    xlabel = f"training step (batch {curves[0].get('batch_size', 128)})"
    ax_fd.set(xlabel=xlabel, ylabel="Frechet distance (judge features)", yscale="log",
              title=f"{'shapes' if shapes else 'digits'} teacher: FD of the EMA weights")
    ax_acc.set(xlabel=xlabel, ylabel="two-object prompts fully correct (%)" if shapes else "conditional accuracy (%)",
               title="prompt adherence (judge)" if shapes else "accuracy (judge)")
    for ax in (ax_fd, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if shapes:
        seeds = curves[0].get("eval_seeds", [])
        note = (f"each point: the judge's 111 prompts x {len(seeds)} seeds, DPM-Solver++ "
                f"{curves[0].get('eval_steps')} steps, CFG 5")
    else:
        note = (f"each point: {curves[0].get('eval_per_class') or 20} samples per digit, DPM-Solver++ 10 steps, "
                "CFG 1.5")
    fig.suptitle(f"same seed, same data order; {note}", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    from fastdiff._atomic import atomic_write_bytes

    atomic_write_bytes(out, buf.getvalue())
    summary = summarize(curves[0], curves[1:])
    atomic_write_text(out.with_suffix(".summary.json"), json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
