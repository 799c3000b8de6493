"""Evaluate the ``shapes`` text-to-image pipeline with its judge: ``python -m fastdiff eval --model shapes``.

Prompt adherence, GenEval-style: every prompt of :func:`~fastdiff.quality.shapes_judge.eval_prompts` (37
one-object, 74 two-object, canonical wording) is sampled once per seed of
:data:`~fastdiff.quality.shapes_judge.EVAL_SEEDS` (image ``k`` of a prompt starts from the noise of
``torch.Generator().manual_seed(k)``, exactly as ``pipe(prompt, generator=that generator)`` draws it), through
``fastdiff.Sampler`` (the fused step; the pipeline's own text encoder and VAE). The judge (a detector trained on
renders only, never on generated images) says per image whether it is *fully correct*; the result is the fraction
of one-object and of two-object prompts' images fully correct, plus a Fréchet distance in the detector's feature
space against renders of the same prompts. ``--sweep`` repeats it over guidance scales (CFG 1-9) into a table and a
plot.
"""

from __future__ import annotations

import io
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text

#: the guidance scales of the sweep (the issue's CFG 1-9)
SWEEP_GUIDANCE = (1.0, 2.0, 3.0, 5.0, 7.0, 9.0)
#: the teacher's goals on this judge (fraction fully correct), from the issue
GOALS = {"one_object": 0.95, "two_object": 0.70}
#: the goals of other embedded pipelines (issue 15: the one-step student ``shapes-onestep``; issue 16: the consistency
#: student ``shapes-consistency``, held to the one-step student's goals)
MODEL_GOALS = {"shapes-onestep": {"one_object": 0.85, "two_object": 0.55},
               "shapes-consistency": {"one_object": 0.85, "two_object": 0.55}}


def goals_for(model) -> dict:
    """The goals a model is judged against: its own (:data:`MODEL_GOALS`, by embedded name) or the teacher's."""
    return MODEL_GOALS.get(model, GOALS) if isinstance(model, str) else GOALS


@dataclass
class ShapesEvalResult:
    """One evaluation: fractions fully correct, Fréchet distance, time, and the settings that produced them."""

    model: str
    steps: int
    guidance: float
    one_object: float
    two_object: float
    size_accuracy: float
    frechet: float
    ms_per_image: float
    images: int
    backend: str
    device: str
    #: why images failed: ``ShapesScore.error_rates()`` (fractions of one- / two-object images per error kind)
    errors: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The fields, NaN (no prompt named a size) as None so the JSON is standard."""
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}


def _pipeline(model, device=None):
    from fastdiff.models import load_pipeline
    from fastdiff.pipelines import is_diffusers_pipeline

    return model if is_diffusers_pipeline(model) else load_pipeline(model, device=device)


def generate(pipe, prompts: list[str], seeds=None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, backend: str = "auto", batch_size: int = 64,
             progress: bool = True) -> tuple[torch.Tensor, list[str], float]:
    """Images ``(len(prompts) * len(seeds), 3, 64, 64)`` in [0, 1] (prompt-major: all seeds of prompt 0 first),
    the prompt of each image, and the sampling wall time in seconds."""
    import fastdiff
    from fastdiff.quality.shapes_judge import EVAL_SEEDS

    seeds = tuple(EVAL_SEEDS if seeds is None else seeds)
    sampler = fastdiff.Sampler(pipe, backend=backend)
    jobs = [(p, k) for p in prompts for k in seeds]
    kwargs = {}
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    out, seconds = [], 0.0
    from tqdm.auto import tqdm

    for s in tqdm(range(0, len(jobs), batch_size), desc="sample shapes", disable=not progress, leave=False):
        part = jobs[s:s + batch_size]
        gens = [torch.Generator().manual_seed(k) for _, k in part]
        t0 = time.perf_counter()
        out.append(sampler.sample(prompt=[p for p, _ in part], generator=gens, output_type="pt", progress=False,
                                  **kwargs).float().cpu())
        seconds += time.perf_counter() - t0
    return torch.cat(out), [p for p, _ in jobs], seconds


def evaluate(model="shapes", num_inference_steps: int | None = None, guidance_scale: float | None = None,
             seeds=None, prompts: list[str] | None = None, backend: str = "auto", progress: bool = True,
             name: str | None = None, device=None) -> ShapesEvalResult:
    """Sample the evaluation prompts with ``model`` (``"shapes"``, a folder, or a pipeline) and judge them.
    ``None`` steps / guidance: the model's defaults; ``device``: where a model loaded by name runs."""
    from fastdiff.quality import shapes_judge as J

    pipe = _pipeline(model, device)
    defaults = getattr(pipe, "fastdiff_defaults", {}) or {}
    steps = int(num_inference_steps if num_inference_steps is not None else defaults.get("num_inference_steps", 50))
    g = float(guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 7.5))
    prompts = J.eval_prompts() if prompts is None else list(prompts)
    images, image_prompts, seconds = generate(pipe, prompts, seeds, steps, g, backend=backend, progress=progress)
    judge = J.shipped()
    sc = J.score(judge, images, image_prompts)  # images come back on the CPU
    fd = J.frechet(judge, images, J.reference_images(image_prompts))
    label = name or (model if isinstance(model, str) else "pipeline")
    return ShapesEvalResult(model=str(label), steps=steps, guidance=g, one_object=sc.one_object,
                            two_object=sc.two_object, size_accuracy=sc.size_accuracy, frechet=fd,
                            ms_per_image=1000 * seconds / len(image_prompts), images=len(image_prompts),
                            backend=backend, device=_device_name(), errors=sc.error_rates())


def sweep(model="shapes", guidances=SWEEP_GUIDANCE, num_inference_steps: int | None = None, seeds=None,
          backend: str = "auto", progress: bool = True, device=None) -> list[ShapesEvalResult]:
    """:func:`evaluate` at each guidance scale (one pipeline load)."""
    pipe = _pipeline(model, device)
    name = model if isinstance(model, str) else "pipeline"
    return [evaluate(pipe, num_inference_steps, g, seeds, backend=backend, progress=progress, name=name)
            for g in guidances]


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()} x{os.cpu_count()}, {torch.get_num_threads()} threads"


def format_table(results: list[ShapesEvalResult]) -> str:
    """A Markdown table: one row per evaluation."""
    rows = ["| model | steps | CFG | one object fully correct | two objects fully correct | size (named) | FD | "
            "ms / image | images |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        size = "-" if r.size_accuracy != r.size_accuracy else f"{100 * r.size_accuracy:.1f} %"
        rows.append(f"| {r.model} | {r.steps} | {r.guidance:g} | {100 * r.one_object:.1f} % | "
                    f"{100 * r.two_object:.1f} % | {size} | {r.frechet:.1f} | "
                    f"{r.ms_per_image:.1f} | {r.images} |")
    return "\n".join(rows)


def format_errors(results: list[ShapesEvalResult]) -> str:
    """A Markdown table of why images failed: per evaluation and prompt kind, the percentage of images failing for
    each error kind of the judge (:data:`~fastdiff.quality.shapes_judge.ERROR_KINDS`); "" when no result has them."""
    from fastdiff.quality.shapes_judge import ERROR_KINDS

    rows = [f"| model | CFG | prompts | {' | '.join(ERROR_KINDS)} |", "|---|---|---|" + "---|" * len(ERROR_KINDS)]
    for r in results:
        for key, rates in r.errors.items():
            cells = " | ".join(f"{100 * rates.get(k, 0.0):.1f} %" for k in ERROR_KINDS)
            rows.append(f"| {r.model} | {r.guidance:g} | {key.replace('_', ' ')} | {cells} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def write_results(results: list[ShapesEvalResult], out: str | os.PathLike, stem: str, note: str = "") -> list[Path]:
    """``out/stem.md`` (table, why images failed, note) and ``out/stem.json``; ``out/stem.png`` too for a sweep
    (several scales)."""
    import json

    out = Path(out)
    errors = format_errors(results)
    text = format_table(results) + (f"\n\nWhy images failed (share of all images of that prompt kind):\n\n{errors}"
                                    if errors else "") + ("\n\n" + note if note else "") + "\n"
    written = [atomic_write_text(out / f"{stem}.md", text),
               atomic_write_text(out / f"{stem}.json", json.dumps([r.as_dict() for r in results], indent=1) + "\n")]
    if len(results) > 1:
        written.append(plot_sweep(results, out / f"{stem}.png"))
    return written


def plot_sweep(results: list[ShapesEvalResult], path: str | os.PathLike) -> Path:
    """Prompt adherence (one / two objects) and FD against the guidance scale, the goals as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(results, key=lambda r: r.guidance)
    xs = [r.guidance for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(xs, [100 * r.one_object for r in rs], marker="o", label="one object")
    axes[0].plot(xs, [100 * r.two_object for r in rs], marker="o", label="two objects")
    for key, color in (("one_object", "C0"), ("two_object", "C1")):
        axes[0].axhline(100 * GOALS[key], color=color, linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("prompts fully correct (%)")
    axes[0].legend(fontsize=8)
    axes[1].plot(xs, [r.frechet for r in rs], marker="o", color="C2")
    axes[1].set_ylabel("Fréchet distance (judge features)")
    for ax in axes:
        ax.set_xlabel("guidance scale")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"shapes: {rs[0].steps} steps, {rs[0].images} images per point; dashed: goals; {rs[0].device}",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
