"""One table of the fast-model methods on the ``shapes`` judge: ``python -m fastdiff eval --compare --model shapes``.

The text-to-image counterpart of :mod:`fastdiff.quality.compare` (digits): the teacher at 5 / 10 / 20 steps, the
triplet-regression student (1 step), the consistency student (1 / 2 / 4 steps, CFG folded in) and the coalescer
(1 / 2 steps, adaptive) where they are shipped, plus extra pipeline folders; every row on the same prompts
(:func:`~fastdiff.quality.shapes_judge.eval_prompts`), the same seeds (image ``k`` of a prompt starts from the noise
of ``torch.Generator().manual_seed(k)``) and the same judge: the fraction of one- and two-object prompts' images
fully correct, a Fréchet distance in the judge's features, ms per image (after a warm-up batch), network calls per
image (counted: rows the UNet or the coalescer network evaluated / images; a CFG batch counts 2 per image per step)
and the training wall time each model records (its own training and the data it made for it; the VAE, which every
row shares, is not counted).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text
from fastdiff.errors import InvalidInput

TEACHER = "shapes"
TEACHER_STEPS = (5, 10, 20)
ONESTEP = "shapes-onestep"
CONSISTENCY = "shapes-consistency"
CONSISTENCY_STEPS = (1, 2, 4)
COALESCER = "shapes-coalescer"
COALESCER_STEPS = (1, 2)
#: step counts of an extra pipeline folder when the command line names none
EXTRA_STEPS = (1, 2, 4)


@dataclass
class ShapesCompareJob:
    """One row to measure. ``kind``: ``"pipeline"`` (sampled by ``fastdiff.Sampler``) or ``"coalescer"``;
    ``adaptive``: a coalescer sample stops once its confidence reaches ``threshold`` (None: the model's own)."""

    model: str
    method: str
    steps: int
    kind: str = "pipeline"
    guidance: float | None = None
    adaptive: bool = False
    threshold: float | None = None


@dataclass
class ShapesCompareRow:
    """A measured row: the judge's numbers and what it cost."""

    model: str
    method: str
    steps: int
    mean_steps: float
    guidance: float
    one_object: float
    two_object: float
    frechet: float
    ms_per_image: float
    calls_per_image: float
    train_wall_s: float | None
    images: int
    device: str
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}


def _shipped(name: str) -> bool:
    from fastdiff.models.registry import WEIGHTS_DIR

    return (WEIGHTS_DIR / name).is_dir()


def default_jobs(extra: list[tuple[str, list[int]]] = (), adaptive_threshold: float | None = None
                 ) -> list[ShapesCompareJob]:
    """The issue's rows for ``shapes``: teacher 5 / 10 / 20 steps (its scheduler and CFG), ``shapes-onestep``,
    and where shipped ``shapes-consistency`` (1 / 2 / 4) and ``shapes-coalescer`` (1 / 2, adaptive); then each
    extra pipeline folder at its step counts (its own scheduler and guidance)."""
    jobs = [ShapesCompareJob(TEACHER, "teacher (DPM-Solver++, CFG)", s) for s in TEACHER_STEPS]
    jobs.append(ShapesCompareJob(ONESTEP, "triplet regression", 1))
    if _shipped(CONSISTENCY):
        jobs += [ShapesCompareJob(CONSISTENCY, "consistency (folded CFG)", s) for s in CONSISTENCY_STEPS]
    if _shipped(COALESCER):
        jobs += [ShapesCompareJob(COALESCER, "coalescer", s, kind="coalescer") for s in COALESCER_STEPS]
        jobs.append(ShapesCompareJob(COALESCER, "coalescer, adaptive", max(COALESCER_STEPS), kind="coalescer",
                                     adaptive=True, threshold=adaptive_threshold))
    for path, steps in extra:
        jobs += _extra_jobs(path, steps, adaptive_threshold)
    return jobs


def _extra_jobs(path: str, steps: list[int], adaptive_threshold: float | None) -> list[ShapesCompareJob]:
    """An extra folder's rows: a text coalescer at its step counts (1 or 2) and adaptive, else a pipeline."""
    from fastdiff.models.text_coalescer_net import is_text_coalescer

    if not is_text_coalescer(path):
        return [ShapesCompareJob(path, extra_method(path), s) for s in steps]
    jobs = [ShapesCompareJob(path, "coalescer", s, kind="coalescer") for s in steps]
    return jobs + [ShapesCompareJob(path, "coalescer, adaptive", max(steps), kind="coalescer", adaptive=True,
                                    threshold=adaptive_threshold)]


def parse_extra_pipeline(text: str) -> tuple[str, list[int]]:
    """``"DIR"`` or ``"DIR:1,2,4"`` -> (DIR, step counts); the folder must be a pipeline or a text coalescer
    (checked before any sampling: minutes; a coalescer's steps default to 1, 2)."""
    from fastdiff.models.shapes.pipeline import verify
    from fastdiff.models.text_coalescer_net import is_text_coalescer, resolve
    from fastdiff.quality.compare import split_model_steps

    coalescer = is_text_coalescer(text.rpartition(":")[0] if ":" in text else text)
    path, steps = split_model_steps(text, COALESCER_STEPS if coalescer else EXTRA_STEPS,
                                    "runs/shapes-consistency:1,2,4")
    if coalescer:
        resolve(path)  # ModelNotFound for a folder without its weights
        if max(steps) > max(COALESCER_STEPS):
            raise InvalidInput(f"--extra-model {text!r}: a coalescer takes 1 or 2 steps")
    else:
        verify(path)  # ModelNotFound (one line) for a missing or damaged pipeline folder
    return path, steps


def _pipeline_meta(model: str) -> dict:
    from fastdiff.models.registry import EMBEDDED_PIPELINES, WEIGHTS_DIR
    from fastdiff.models.shapes.pipeline import PIPELINE_DIR, metadata

    path = PIPELINE_DIR if model == TEACHER else WEIGHTS_DIR / model if model in EMBEDDED_PIPELINES else Path(model)
    return metadata(path)


def extra_method(model: str) -> str:
    """The method column of an extra pipeline folder, from its training metadata."""
    meta = _pipeline_meta(model)
    if meta.get("objective") == "consistency":
        return f"consistency ({meta.get('target', '?')} target)"
    if "teacher" in meta and (meta.get("limits") or {}).get("max_inference_steps") == 1:
        return "triplet regression"
    if "teacher" not in meta:
        return f"teacher, {meta.get('steps', '?')} steps"
    return "extra pipeline"


def training_wall_s(meta: dict) -> float | None:
    """``wall_s`` (the model's own training) + ``data_wall_s`` (triplets or trajectories made for it, when recorded
    apart), or None when the model records no training time."""
    parts = [meta.get(k) for k in ("wall_s", "data_wall_s")]
    parts = [float(v) for v in parts if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return sum(parts) if parts else None


def _judge(images: torch.Tensor, prompts: list[str]):
    from fastdiff.quality import shapes_judge as J

    judge = J.shipped()
    return J.score(judge, images, prompts), J.frechet(judge, images, J.reference_images(prompts))


def _measure_pipeline(job: ShapesCompareJob, pipe, prompts: list[str], seeds: tuple[int, ...],
                      progress: bool) -> ShapesCompareRow:
    from fastdiff.quality.evaluate import count_network_rows
    from fastdiff.quality.shapes_eval import _device_name, generate

    defaults = getattr(pipe, "fastdiff_defaults", {}) or {}
    g = float(job.guidance if job.guidance is not None else defaults.get("guidance_scale", 7.5))
    generate(pipe, prompts[:2], seeds[:1], job.steps, g, progress=False)  # warm-up: first-call costs untimed
    with count_network_rows(pipe) as counter:
        images, image_prompts, seconds = generate(pipe, prompts, seeds, job.steps, g, progress=progress)
    sc, fd = _judge(images, image_prompts)
    n = len(image_prompts)
    meta = _pipeline_meta(job.model)
    return ShapesCompareRow(model=Path(job.model).name, method=job.method, steps=job.steps,
                            mean_steps=float(job.steps), guidance=g, one_object=sc.one_object,
                            two_object=sc.two_object, frechet=fd, ms_per_image=1000 * seconds / n,
                            calls_per_image=counter.rows / n, train_wall_s=training_wall_s(meta), images=n,
                            device=_device_name())


def _measure_coalescer(job: ShapesCompareJob, model, prompts: list[str], seeds: tuple[int, ...]
                       ) -> ShapesCompareRow:
    from fastdiff.distill import text_coalescer as C
    from fastdiff.quality.evaluate import count_network_rows
    from fastdiff.quality.shapes_eval import _device_name

    threshold = (job.threshold if job.threshold is not None else C.default_threshold(model)) if job.adaptive else None
    C.sample_images(model, prompts[:2], list(seeds[:1]), job.steps, job.guidance, threshold)  # warm-up
    with count_network_rows(model.net if hasattr(model, "net") else model) as counter:
        images, used, seconds = C.sample_images(model, prompts, list(seeds), job.steps, job.guidance, threshold)
    image_prompts = [p for p in prompts for _ in seeds]
    sc, fd = _judge(images, image_prompts)
    n = len(image_prompts)
    meta = C.metadata(model)
    g = float(job.guidance if job.guidance is not None else (meta.get("defaults") or {}).get("guidance_scale", 1.0))
    return ShapesCompareRow(model=Path(job.model).name, method=job.method, steps=job.steps,
                            mean_steps=float(used.float().mean()),
                            guidance=g, one_object=sc.one_object, two_object=sc.two_object, frechet=fd,
                            ms_per_image=1000 * seconds / n, calls_per_image=counter.rows / n,
                            train_wall_s=training_wall_s(meta), images=n, device=_device_name(),
                            extra={} if threshold is None else {"threshold": threshold})


def compare(jobs: list[ShapesCompareJob], seeds: tuple[int, ...] | None = None, prompts: list[str] | None = None,
            progress: bool = True) -> list[ShapesCompareRow]:
    """Measure every job on the same prompts, seeds and judge (each model loaded once)."""
    from tqdm.auto import tqdm

    from fastdiff.models import load_pipeline
    from fastdiff.quality import shapes_judge as J

    seeds = tuple(J.EVAL_SEEDS if seeds is None else seeds)
    prompts = J.eval_prompts() if prompts is None else list(prompts)
    if len(prompts) * len(seeds) < 2:
        raise InvalidInput(f"compare needs at least 2 images per row (the Fréchet distance needs a covariance): "
                           f"{len(prompts)} prompts x {len(seeds)} seeds")
    loaded: dict[str, object] = {}
    rows = []
    bar = tqdm(jobs, desc="compare shapes", disable=not progress)
    for job in bar:
        bar.set_postfix_str(f"{job.model} {job.steps}")
        if job.kind == "coalescer":
            from fastdiff.distill import text_coalescer as C

            model = loaded.setdefault(job.model, C.load(job.model))
            rows.append(_measure_coalescer(job, model, prompts, seeds))
        elif job.kind == "pipeline":
            pipe = loaded.setdefault(job.model, load_pipeline(job.model))
            rows.append(_measure_pipeline(job, pipe, prompts, seeds, progress=False))
        else:
            raise InvalidInput(f"unknown compare job kind {job.kind!r}")
    return rows


def format_table(rows: list[ShapesCompareRow]) -> str:
    """Markdown: model, method, steps, CFG, one- and two-object fully correct, FD, ms / image, calls, training."""
    head = ("| model | method | steps | CFG | one object | two objects | FD | ms / image | network calls / image "
            "| training wall time |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def steps(r: ShapesCompareRow) -> str:
        return f"≤{r.steps} (mean {r.mean_steps:.2f})" if r.mean_steps != r.steps else str(r.steps)

    def wall(r: ShapesCompareRow) -> str:
        return "-" if r.train_wall_s is None else f"{r.train_wall_s / 60:.0f} min"

    lines = [f"| {r.model} | {r.method} | {steps(r)} | {r.guidance:g} | {100 * r.one_object:.1f} % | "
             f"{100 * r.two_object:.1f} % | {r.frechet:.1f} | {r.ms_per_image:.1f} | {r.calls_per_image:.2f} | "
             f"{wall(r)} |" for r in rows]
    return "\n".join([head, *lines])


def plot(rows: list[ShapesCompareRow], path: str | os.PathLike, title: str = "") -> Path:
    """Two panels against ms per image (log scale): two-object prompts fully correct, and FD; one marker style
    per method, points labelled with their step count. Written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(f"{r.model}: {r.method}" for r in rows))
    markers = "osD^v<>ph*"
    for i, m in enumerate(methods):
        pts = [r for r in rows if f"{r.model}: {r.method}" == m]
        x = [r.ms_per_image for r in pts]
        for ax, y in ((ax_a, [100 * r.two_object for r in pts]), (ax_f, [r.frechet for r in pts])):
            ax.plot(x, y, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none", label=m)
            for r, xv, yv in zip(pts, x, y, strict=True):
                label = f"{r.steps}" if r.mean_steps == r.steps else f"≤{r.steps} (mean {r.mean_steps:.2f})"
                ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_a.set_ylabel("two-object prompts fully correct (%)")
    ax_f.set_ylabel("Fréchet distance (judge features; lower is better)")
    for ax in (ax_a, ax_f):
        ax.set_xscale("log")
        ax.set_xlabel("ms per image (log)")
        ax.grid(True, alpha=0.3)
    ax_a.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "fast models on the shapes judge (labels: steps)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_results(rows: list[ShapesCompareRow], out: str | os.PathLike, stem: str = "compare_shapes",
                  note: str = "") -> list[Path]:
    """``out/stem.md`` (table + note), ``out/stem.json`` and ``out/stem.png``, each atomically."""
    out = Path(out)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    md = atomic_write_text(out / f"{stem}.md", f"{format_table(rows)}\n\n{note}\nMeasured {stamp} on "
                           f"{rows[0].device}.\n")
    js = atomic_write_text(out / f"{stem}.json", json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
    png = plot(rows, out / f"{stem}.png", title=f"fast models on the shapes judge (labels: steps), {rows[0].device}")
    return [md, js, png]
