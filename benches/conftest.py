"""Benchmark session plumbing: environment facts in every result, and a ratio table written at the end.

Run: ``pytest benches/bench_step.py --benchmark-only`` (add ``--benchmark-json=...`` to keep raw numbers).
At session end a markdown table of ratios (competitor median / fastdiff median, measured in the same run) goes to
``benches/results/<device>-<date>-step.md`` when ``FASTDIFF_BENCH_SAVE=1``, and is printed.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS: dict = defaultdict(dict)  # (suite, case) -> {provider: (median_s, extra)}
# Suites whose goal is set against the best of several competitors rather than the base provider: suite ->
# (competitors, ours). The table gets a column: the fastest competitor that ran / ours (>= 1.0x meets the goal).
BEST_OF = {"attention": (("sdpa-flash", "sdpa-cudnn"), "fastdiff"),
           "attention-graph": (("sdpa-flash", "sdpa-cudnn"), "fastdiff"),
           "attention-tune": (("sdpa-flash", "sdpa-cudnn"), "fastdiff-tuned"),
           "digits": (("diffusers-compile",), "fastdiff-compile")}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment() -> dict:
    env = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = "none"
    return env


def record_result(suite: str, case: str, provider: str, benchmark, **extra) -> None:
    """Store the median time of one call for the session's ratio table. A bench whose rounds run several calls says
    how many in ``benchmark.extra_info["calls_per_round"]`` (bench_model's ``time_loop`` sizes rounds per provider,
    so round medians alone are not comparable)."""
    median = benchmark.stats.stats.median / benchmark.extra_info.get("calls_per_round", 1)
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(extra)
    RESULTS[(suite, case)][provider] = (median, extra)


@pytest.fixture
def record():
    """record(suite, case, provider, benchmark, **extra): :func:`record_result`."""
    return record_result


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    text, suites = ratio_table()
    print("\n" + text)
    if os.environ.get("FASTDIFF_BENCH_SAVE") == "1":
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        tag = device_name().replace(" ", "_").replace("/", "_")
        path = out / f"{tag}-{datetime.date.today().isoformat()}-{'-'.join(sorted(suites))}.md"
        path.write_text(text + "\n")


def ratio_table() -> tuple[str, list[str]]:
    """The Markdown ratio tables of everything recorded (one per suite) and the suites' names."""
    lines = [f"# fastdiff benchmark ratios: {environment()}", ""]
    by_suite = defaultdict(list)
    for (suite, case), provs in RESULTS.items():
        by_suite[suite].append((case, provs))
    for suite, rows in by_suite.items():
        providers = sorted({p for _, provs in rows for p in provs})
        # the competitor every ratio is taken against: the first of these present, else the first provider
        base = next((b for b in ("diffusers", "diffusers-eager", "eager", "torch", "loop-torch", "copy")
                     if b in providers), providers[0])
        rivals, ours = BEST_OF.get(suite, ((), None))
        best_col = [f"{ours} vs best of {' / '.join(rivals)}"] if rivals else []
        lines += [f"## {suite}", "", "| case | " + " | ".join(f"{p} (us)" for p in providers)
                  + " | " + " | ".join([*(f"{p} speed-up vs {base}" for p in providers if p != base), *best_col])
                  + " | notes |",
                  "|" + "---|" * (2 * len(providers) + 1 + len(best_col))]  # case, times, ratios (one fewer), notes
        for case, provs in sorted(rows):
            # per-step time when the bench recorded one (loops of several steps), else the median call
            times = [f"{provs[p][1].get('per_step_us', provs[p][0] * 1e6):.1f}" if p in provs else "-"
                     for p in providers]
            ratios = [f"{provs[base][0] / provs[p][0]:.2f}x" if p in provs and base in provs else "-"
                      for p in providers if p != base]
            if rivals:
                ran = [r for r in rivals if r in provs]
                best = min(ran, key=lambda r: provs[r][0]) if ran else None
                ratios.append(f"{provs[best][0] / provs[ours][0]:.2f}x ({best})" if best and ours in provs else "-")
            notes = "; ".join([*(f"{p}: {provs[p][1]['gbps']:.0f} GB/s" for p in providers
                                 if p in provs and "gbps" in provs[p][1]),
                               *(f"{p}: {provs[p][1]['tflops']:.0f} TFLOP/s" for p in providers
                                 if p in provs and "tflops" in provs[p][1])])
            lines.append(f"| {case} | " + " | ".join(times) + " | " + " | ".join(ratios) + f" | {notes} |")
        lines.append("")
    return "\n".join(lines), list(by_suite)
