"""The compiled CUDA kernels under NVIDIA compute-sanitizer: a small driver, since the whole test suite under
memcheck would take far longer than a device call allows.

Run as ``compute-sanitizer --tool memcheck|racecheck --error-exitcode 1 python3 benches/gpu_sanitize.py``
(``benches/gpu_run.sh sanitize`` does both). Every launch is also checked against the reference, so a run that
the sanitizer passes also says the kernels still agree. Steps: the CUDA C++ and Triton fused step over every
scheduler-like feature set and dtype, on an odd shape (blocks cut at the end and straddling samples), fp16 with
an in-place ``out``; GroupNorm(+SiLU, + per-channel add): the CUDA C++ and Triton kernels on odd and SD-like shapes,
NCHW and channels-last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.step_cases

from fastdiff.ops import availability  # noqa: E402
from fastdiff.ops.groupnorm import group_norm  # noqa: E402
from tests.step_cases import DTYPES, FEATURE_SETS, StepCase, check_case  # noqa: E402


def step_launches(backends: list[str]) -> int:
    n = 0
    for backend in backends:
        for features in FEATURE_SETS.values():
            for dtype in DTYPES:
                inplace = dtype == torch.float16  # out = x once per feature set
                check_case(StepCase(shape=(3, 4, 97, 61), dtype=dtype, inplace=inplace, seed=7, **features), backend,
                           device="cuda")
                n += 1
    return n


def group_norm_launches(backends: list[str]) -> int:
    n = 0
    gen = torch.Generator("cuda").manual_seed(0)
    for backend in backends:
        for shape, groups in (((2, 320, 64, 64), 32), ((3, 40, 9, 7), 8), ((1, 1280, 8, 8), 32)):
            for dtype in DTYPES:
                for channels_last in (False, True):
                    x = torch.randn(shape, generator=gen, device="cuda").to(dtype)
                    if channels_last:
                        x = x.to(memory_format=torch.channels_last)
                    c = shape[1]
                    w, b = (torch.randn(c, generator=gen, device="cuda").to(dtype) for _ in range(2))
                    add = torch.randn(shape[0], c, generator=gen, device="cuda").to(dtype)
                    got = group_norm(x, groups, w, b, silu=True, add=add, backend=backend)
                    ref = group_norm(x.double(), groups, w.double(), b.double(), silu=True, add=add.double(),
                                     backend="torch")
                    err = (got.double() - ref).abs().max().item()
                    # A loose bound (the tests hold the kernels to the tolerance table): here it only catches a kernel
                    # that reads or writes the wrong memory.
                    assert err <= (1e-4 if dtype == torch.float32 else 0.05), (backend, shape, dtype, err)
                    n += 1
    return n


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device", file=sys.stderr)
        return 2
    t = time.perf_counter()
    step_ok = [b for b in ("cuda", "triton") if not availability("cuda")[b]]
    gn_ok = [b for b in ("cuda", "triton") if b in step_ok]
    n = step_launches(step_ok) + group_norm_launches(gn_ok)
    torch.cuda.synchronize()
    print(f"gpu_sanitize: {n} checked launches ({', '.join(step_ok)}) in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
