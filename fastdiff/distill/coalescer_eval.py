"""Judge a coalescer at several settings: steps, guidance and the adaptive step count, on the judge's samples.

The images are those :func:`fastdiff.quality.evaluate.evaluate` draws (sample ``i`` asks for digit ``i % 10`` from
noise seeded by ``(stream_seed(seed, "eval"), i)``), so a fixed-step row equals ``python -m fastdiff eval --model
<coalescer> --steps N`` and the numbers compare with every other model's. Per row: accuracy, Fréchet distance,
mean steps taken per image, network calls per image (steps, doubled under guidance) and sampling time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from fastdiff.distill.coalescer import generate
from fastdiff.models.generate import balanced_labels, make_noise, stream_seed


@dataclass
class CoalescerResult:
    model: str
    steps: int
    adaptive: float | None
    guidance: float
    n: int
    accuracy: float
    fd: float
    mean_steps: float
    calls_per_image: float
    ms_per_image: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_settings(model, steps: list[int], guidance: list[float], adaptive: list[float] = (),
                      num_per_class: int = 100, seed: int = 0) -> list[CoalescerResult]:
    """One row per (steps, guidance) and per (adaptive threshold, guidance) with at most ``max(steps)`` steps."""
    from fastdiff.models import load
    from fastdiff.quality.evaluate import score

    m = load(model) if isinstance(model, str) else model
    n = num_per_class * m.num_classes
    idx = torch.arange(n)
    labels = balanced_labels(idx, m.num_classes)
    size, c = m.unet.config.sample_size, m.unet.config.in_channels
    noise = make_noise(stream_seed(seed, "eval"), idx, (c, size, size))
    settings = [(s, None) for s in steps] + [(max(steps), t) for t in adaptive]
    rows = []
    for g in guidance:
        for s, thr in settings:
            generate(m, labels[:2], noise[:2], s, g, thr)  # warm-up
            t0 = time.perf_counter()
            images, used = generate(m, labels, noise, s, g, thr)
            dt = time.perf_counter() - t0
            sc = score(images, labels, seed)
            mean_steps = float(used.float().mean())
            rows.append(CoalescerResult(model=str(m.name), steps=s, adaptive=thr, guidance=float(g), n=n,
                                        accuracy=sc["accuracy"], fd=sc["fd"], mean_steps=mean_steps,
                                        calls_per_image=mean_steps * (1 if g == 1.0 else 2),
                                        ms_per_image=1000 * dt / n))
    return rows


def format_table(rows: list[CoalescerResult]) -> str:
    head = ("| model | steps | adaptive | CFG | accuracy | FD | mean steps | calls / image | ms / image |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r.model} | {r.steps} | {'-' if r.adaptive is None else f'{r.adaptive:g}'} | {r.guidance:g} | "
            f"{100 * r.accuracy:.1f}% | {r.fd:.1f} | {r.mean_steps:.2f} | {r.calls_per_image:.2f} | "
            f"{r.ms_per_image:.3f} |" for r in rows]
    return "\n".join([head, *body])
