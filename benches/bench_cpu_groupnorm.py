"""GroupNorm+SiLU on CPU: PyTorch's ``F.silu(F.group_norm(x + temb))`` vs fastdiff's C++ kernel
(``fastdiff.ops.groupnorm.group_norm(..., backend="cpp")``, csrc/cpu/groupnorm.cpp), fp32, NCHW and channels-last,
at the digits model's shapes (CFG batch 20) and SD1.5's (CFG batch 2), with the ResnetBlock's time-embedding add.

    OMP_NUM_THREADS=2 pytest benches/bench_cpu_groupnorm.py --benchmark-only -p no:cacheprovider   # ~1 min

GB/s in extra_info: x read once + y written once over the median time (the floor of the op).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ext

SHAPES = {  # name -> ((N, C, H, W), groups)
    "digits-16x16": ((20, 32, 16, 16), 8), "digits-8x8": ((20, 64, 8, 8), 8),
    "sd15-64x64": ((2, 320, 64, 64), 32), "sd15-16x16": ((2, 1280, 16, 16), 32),
}

pytestmark = pytest.mark.skipif(not _ext.cpu_available(), reason=f"fastdiff._C_cpu is not built: {_ext.cpu_error()}")


@pytest.mark.parametrize("provider", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_groupnorm_silu_cpu(benchmark, record, case, layout, provider):
    from fastdiff.ops.groupnorm import group_norm

    shape, groups = SHAPES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w, b, temb = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g), torch.randn(shape[:2])
    if provider == "torch":
        def run():
            return F.silu(F.group_norm(x + temb[:, :, None, None], groups, w, b, 1e-5))
    else:
        def run():
            return group_norm(x, groups, w, b, 1e-5, silu=True, add=temb, backend="cpp")

    with torch.no_grad():
        benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=3)
    nbytes = 2 * math.prod(shape) * 4
    record("groupnorm_silu_cpu", f"{case} {layout} fp32", provider, benchmark, threads=torch.get_num_threads(),
           gbps=nbytes / benchmark.stats.stats.median / 1e9)
