"""One table of the fast-model methods on the digits judge, same seeds: teacher, triplet student, coalescer, extras.

Every row is :func:`fastdiff.quality.evaluate.evaluate` (same noise, same judge, warm-up excluded from the time,
network rows counted) except the coalescer's adaptive step count, which the sampler loop cannot express (a sample
stops when its direction is long enough) and is run here through :func:`fastdiff.distill.coalescer.generate` on
the same noise and labels. Training wall time is read from each model's ``config.json`` metadata (``wall_s``) and
left empty where the model does not record it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff._checks import check_int
from fastdiff.errors import InvalidInput
from fastdiff.quality.evaluate import EvalResult, count_network_rows, evaluate, machine_description, score

TEACHER = "digits"
TEACHER_STEPS = (5, 10, 20)
ONESTEP = "digits-onestep"
COALESCER = "digits-coalescer"
COALESCER_STEPS = (1, 2)
CONSISTENCY = "digits-consistency"
CONSISTENCY_STEPS = (1, 2, 4)
#: first-step confidence ``|direction|`` above which a coalescer sample stops after one step: the median of
#: digits-coalescer's confidences on the eval set (docs/notes/coalescer.md: about half the samples take 2 steps)
COALESCER_ADAPTIVE_THRESHOLD = 0.998
#: step counts an extra model (e.g. a consistency student) is sampled at when the command line names none
EXTRA_STEPS = (1, 2, 4)


@dataclass
class CompareJob:
    """One row to measure: ``evaluate`` keyword arguments, or an adaptive coalescer run (``adaptive`` set)."""

    model: str
    method: str
    steps: int
    scheduler: str | None = None
    guidance: float | None = None
    adaptive: float | None = None


def split_model_steps(text: str, default_steps, example: str) -> tuple[str, list[int]]:
    """``"DIR"`` or ``"DIR:1,2,4"`` -> (DIR, step counts; ``default_steps`` when none are named); a count that is
    not a whole number >= 1 is an InvalidInput naming ``example``."""
    path, sep, steps_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep:
        return path, list(default_steps)
    parts = [v.strip() for v in steps_text.split(",")]
    if not all(v.isdigit() and int(v) >= 1 for v in parts):
        raise InvalidInput(f"--extra-model {text!r}: the steps after ':' must be whole numbers >= 1 separated "
                           f"by commas, e.g. {example}")
    return path, [int(v) for v in parts]


def parse_extra_model(text: str) -> tuple[str, list[int]]:
    """``"DIR"`` or ``"DIR:1,2,4"`` -> (DIR, step counts); the folder must exist (checked before any work)."""
    from fastdiff.models.registry import read_config

    path, steps = split_model_steps(text, EXTRA_STEPS, "runs/digits-consistency:1,2,4")
    read_config(path)  # ModelNotFound (one line) for a missing folder or config, before minutes of sampling
    return path, steps


def training_wall_s(model: str) -> float | None:
    """``metadata.wall_s`` of a model's config (seconds of its own training), or None where it is not recorded."""
    from fastdiff.models.registry import read_config

    v = (read_config(model).get("metadata") or {}).get("wall_s")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def default_jobs(extra: Iterable[tuple[str, list[int]]] = (),
                 adaptive_threshold: float = COALESCER_ADAPTIVE_THRESHOLD) -> list[CompareJob]:
    """The issue's rows: teacher (its scheduler and CFG) at 5 / 10 / 20 steps, the one-step student, the coalescer
    at 1 / 2 steps and adaptive (its default CFG), the consistency student at 1 / 2 / 4 steps (lcm, its default
    CFG folded in: one call per step), then each extra model at its step counts (its own scheduler and
    CFG: ``lcm`` with folded guidance for a consistency student)."""
    jobs = [CompareJob(TEACHER, "teacher (dpmpp_2m)", s, scheduler="dpmpp_2m") for s in TEACHER_STEPS]
    jobs.append(CompareJob(ONESTEP, "triplet regression", 1))
    jobs += [CompareJob(COALESCER, "coalescer", s) for s in COALESCER_STEPS]
    jobs.append(CompareJob(COALESCER, "coalescer, adaptive", max(COALESCER_STEPS), adaptive=adaptive_threshold))
    jobs += [CompareJob(CONSISTENCY, "consistency (folded CFG)", s) for s in CONSISTENCY_STEPS]
    jobs += [CompareJob(path, extra_method(path), s) for path, steps in extra for s in steps]
    return jobs


def extra_method(model: str) -> str:
    """The method column of an extra model, read from its config's training metadata: a REPA-trained teacher, a
    consistency student (and its training target), else "extra model"."""
    from fastdiff.models.registry import read_config

    cfg = read_config(model)
    meta = cfg.get("metadata") or {}
    if meta.get("objective") == "consistency":
        return f"consistency ({meta.get('target', 'bootstrap')} target)"
    if meta.get("repa_weight"):
        scheduler = (cfg.get("defaults") or {}).get("scheduler", "its scheduler")
        return f"teacher, REPA λ={meta['repa_weight']:g}, {meta.get('steps_done', '?')} steps ({scheduler})"
    if "steps_done" in meta and not meta.get("objective"):
        return f"teacher, {meta['steps_done']} steps"
    return "extra model"


@torch.no_grad()
def evaluate_adaptive(model, max_steps: int, threshold: float, guidance: float | None = None,
                      num_per_class: int = 100, seed: int = 0) -> EvalResult:
    """A coalescer with the adaptive step count, on ``evaluate``'s noise and labels; ``mean_steps`` measured."""
    from fastdiff.distill.coalescer import generate
    from fastdiff.models import load
    from fastdiff.models.generate import balanced_labels, make_noise, stream_seed

    m = load(model) if isinstance(model, str) else model
    g = float(guidance if guidance is not None else m.defaults.get("guidance_scale", 1.0))
    n = check_int("num_per_class", num_per_class, minimum=1) * m.num_classes
    idx = torch.arange(n)
    labels = balanced_labels(idx, m.num_classes)
    size, c = m.unet.config.sample_size, m.unet.config.in_channels
    noise = make_noise(stream_seed(seed, "eval"), idx, (c, size, size))
    generate(m, labels[:2], noise[:2], max_steps, g, threshold)  # warm-up, as in evaluate
    with count_network_rows(m) as counter:
        t0 = time.perf_counter()
        images, used = generate(m, labels, noise, max_steps, g, threshold)
        dt = time.perf_counter() - t0
    s = score(images, labels, seed)
    return EvalResult(model=str(m.name), scheduler="coalescer-adaptive", steps=max_steps, guidance=g, n=n,
                      sample_s=dt, ms_per_image=1000 * dt / n, device=machine_description("cpu"),
                      calls_per_image=counter.rows / n, mean_steps=float(used.float().mean()), **s)


def compare(jobs: list[CompareJob], num_per_class: int = 50, seed: int = 0, progress: bool = True
            ) -> list[EvalResult]:
    """Measure every job (same seeds and judge), labelled with its method and training wall time."""
    from tqdm.auto import tqdm

    from fastdiff.models import load

    loaded: dict[str, object] = {}
    results = []
    bar = tqdm(jobs, desc="compare", disable=not progress)
    for job in bar:
        bar.set_postfix_str(f"{job.model} {job.method} {job.steps}")
        m = loaded.setdefault(job.model, load(job.model))
        if job.adaptive is not None:
            r = evaluate_adaptive(m, job.steps, job.adaptive, job.guidance, num_per_class=num_per_class, seed=seed)
        else:
            r = evaluate(m, scheduler=job.scheduler, num_inference_steps=job.steps, guidance_scale=job.guidance,
                         num_per_class=num_per_class, seed=seed)
            r.mean_steps = float(job.steps)
        r.method = job.method
        r.train_wall_s = training_wall_s(job.model)
        if Path(job.model).is_dir():  # a folder: its name tells the rows apart (a retrained "digits" is not digits)
            r.model = Path(job.model).name
        results.append(r)
    return results


def format_compare_table(results: list[EvalResult]) -> str:
    """Markdown: model, method, steps, CFG, accuracy, FD, ms / image, network calls / image (counted), training."""
    head = ("| model | method | steps | CFG | accuracy | FD | ms / image | network calls / image "
            "| training wall time |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def steps(r: EvalResult) -> str:
        if r.mean_steps is not None and r.mean_steps != r.steps:
            return f"≤{r.steps} (mean {r.mean_steps:.2f})"
        return str(r.steps)

    def wall(r: EvalResult) -> str:
        return "-" if r.train_wall_s is None else f"{r.train_wall_s / 60:.1f} min"

    calls = ["-" if r.calls_per_image is None else f"{r.calls_per_image:.2f}" for r in results]
    rows = [f"| {r.model} | {r.method or r.scheduler} | {steps(r)} | {r.guidance:g} | {100 * r.accuracy:.1f}% | "
            f"{r.fd:.1f} | {r.ms_per_image:.3f} | {c} | {wall(r)} |" for r, c in zip(results, calls, strict=True)]
    return "\n".join([head, *rows])
