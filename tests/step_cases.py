"""Shared cases for testing a fused-step backend against the torch reference (``backend="torch"``).

Any backend / device can reuse them::

    import pytest
    from tests.step_cases import CASES, check_case

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_my_backend(case):
        check_case(case, backend="triton", device="cuda")

``check_case`` draws fresh inputs from ``case.seed``, runs :func:`fastdiff.ops.fused_step` once with the reference and
once with ``backend`` on identical copies, and compares every output (``out``, ``next_in``, ``hist``, ``saved``,
``flag``) with the per-dtype tolerance of :mod:`tests.tolerances`. Along the way it:

- draws a random coefficient row for every column (``zeros`` sets the chance that a term coefficient is exactly 0);
- fills every input whose coefficients are all zero with NaN ("zero coefficient => term not read");
- poisons ``out`` and ``next_in`` with NaN before the call (an unwritten element fails);
- with ``layout`` != "contig", passes transposed / sliced views, or contiguous views at a 1-element storage offset
  (misaligned for 16-byte vector access); with ``inplace``, passes ``out=x``;
- with ``nan_model_out``, puts a NaN into the model output and checks that ``flag[STEP]`` is raised.

``CASES`` is the full list (a few hundred milliseconds on CPU for a compiled backend); ``quick_cases()`` a small
subset for slow backends (e.g. an interpreter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastdiff import _ext
from fastdiff.kernels.compiled_args import DTYPE_CODES
from fastdiff.ops import fused_step
from fastdiff.schedulers.plan import HIST_SLOTS, NCOEF, Col
from tests.tolerances import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd shapes: N not a multiple of any vector width; batch 5 with N = 3 (vectors straddle samples); B*N a multiple of
# 8 while N is odd (the vector path with per-element sample indices); one bigger than a CPU work chunk.
SHAPES = ((3, 4, 97, 61), (1, 4, 7, 5), (5, 3, 1, 1), (8, 3, 5, 7), (2, 4, 64, 72))
# Odd shapes small enough for an interpreter (milliseconds per program): one sample, N = 3 with batch 5, odd H x W.
SMALL_SHAPES = ((1, 4, 7, 5), (5, 3, 1, 1), (2, 3, 9, 11))
FLAG_LEN = 6
TERM_COLS = [c for c in Col if c < Col.WSLOT]  # every coefficient column that multiplies a tensor
LAYOUTS = ("contig", "transposed", "sliced", "offset")


@dataclass(frozen=True)
class StepCase:
    """One fused-step configuration. Inputs are drawn from ``seed``, so a case is reproducible by its id."""

    shape: tuple = (2, 4, 7, 5)
    dtype: torch.dtype = torch.float32
    cfg: bool = False
    hist: bool = False
    saved: bool = False
    noise: bool = False
    next_in: bool = False
    m_scale: bool = False
    clamp: str = "none"  # "none" | "clip" | "threshold"
    flag: bool = False
    wslot: int = -1
    zeros: float = 0.0  # chance that each term coefficient is exactly zero
    layout: str = "contig"  # one of LAYOUTS, applied to every tensor argument
    inplace: bool = False  # out=x
    nan_model_out: bool = False
    # For a backend that truncates fp32 -> bf16 where torch rounds to nearest even (the Triton interpreter): a bf16
    # case gets a power-of-two IN_NEXT, so next_in (scaled from the stored bf16 sample, then rounded again) is exact
    # rather than up to 2 bf16 ulps off.
    exact_in_next: bool = False
    guidance: float = 4.5
    seed: int = 0

    def __str__(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if f.type == "bool" and getattr(self, f.name)]
        return "-".join([str(self.dtype).split(".")[-1], "x".join(map(str, self.shape)), *on, self.clamp,
                         f"w{self.wslot}", f"z{self.zeros}", self.layout, f"s{self.seed}"])


ALL_ON = dict(cfg=True, hist=True, saved=True, noise=True, next_in=True, m_scale=True, clamp="threshold", flag=True,
              wslot=1)
# Feature sets of the real schedulers (plus the extremes); coefficients are random, so each also tests the math.
FEATURE_SETS = {
    "bare": dict(),
    "euler_cfg": dict(cfg=True, next_in=True),
    "euler_a": dict(cfg=True, noise=True, next_in=True, flag=True),
    "ddpm_clip": dict(noise=True, clamp="clip"),
    "ddim_threshold": dict(cfg=True, clamp="threshold"),
    "dpm2m": dict(cfg=True, hist=True, wslot=0, next_in=True),
    "unipc": dict(cfg=True, hist=True, saved=True, wslot=2, next_in=True, flag=True),
    "rescale": dict(cfg=True, m_scale=True, next_in=True),
    "rescale_nocfg": dict(m_scale=True, clamp="threshold", next_in=True),
    "lcm": dict(noise=True, next_in=True, clamp="clip"),
    "all": ALL_ON,
}


def _all_cases() -> list[StepCase]:
    cases = []
    seed = 0

    def add(**kw):
        nonlocal seed
        seed += 1
        cases.append(StepCase(seed=seed, **kw))

    for dtype in DTYPES:
        for i, feats in enumerate(FEATURE_SETS.values()):
            add(dtype=dtype, shape=SHAPES[i % len(SHAPES)], **feats)
        for shape in SHAPES:
            add(dtype=dtype, shape=shape, **ALL_ON)
        for zeros in (0.5, 1.0):
            for wslot in (-1, 0, 1, 2):
                add(dtype=dtype, shape=(2, 4, 7, 5), zeros=zeros, **{**ALL_ON, "wslot": wslot})
        for layout in LAYOUTS[1:]:
            add(dtype=dtype, shape=(3, 4, 97, 61), layout=layout, **ALL_ON)
            add(dtype=dtype, shape=(2, 3, 9, 11), layout=layout, cfg=True, noise=True, next_in=True)
        for feats in (ALL_ON, FEATURE_SETS["bare"], FEATURE_SETS["unipc"]):
            add(dtype=dtype, shape=(1, 4, 7, 5), inplace=True, **feats)
        add(dtype=dtype, shape=(3, 4, 97, 61), inplace=True, layout="transposed", **ALL_ON)
        for cfg in (False, True):
            add(dtype=dtype, shape=(2, 4, 7, 5), nan_model_out=True, cfg=cfg, flag=True, next_in=True)
        add(dtype=dtype, shape=(2, 4, 7, 5), nan_model_out=True, **ALL_ON)
    add(shape=(2, 4, 7, 5), guidance=1.0, cfg=True, next_in=True)  # g = 1: the conditional half only
    add(shape=(2, 4, 7, 5), guidance=0.0, cfg=True, next_in=True)  # g = 0: the unconditional half only
    return cases


CASES = _all_cases()


def quick_cases() -> list[StepCase]:
    """One case per feature set / layout / special input, small shapes only (for slow backends)."""
    small = [c for c in CASES if c.dtype == torch.float32 and c.shape in ((1, 4, 7, 5), (5, 3, 1, 1), (2, 4, 7, 5))]
    return small + [dataclasses.replace(c, dtype=d) for c in small[:3] for d in DTYPES[1:]]


# ---- inputs ------------------------------------------------------------------------------------------------


def make_row(case: StepCase, gen: torch.Generator) -> torch.Tensor:
    """A float32 (NCOEF,) row: every term column in [-1, 1] (some exactly 0 with ``case.zeros``)."""
    row = torch.zeros(NCOEF, dtype=torch.float64)
    row[TERM_COLS] = torch.rand(len(TERM_COLS), generator=gen, dtype=torch.float64) * 2 - 1
    drop = torch.rand(len(TERM_COLS), generator=gen, dtype=torch.float64) < case.zeros
    row[[c for c, d in zip(TERM_COLS, drop.tolist(), strict=True) if d]] = 0.0
    if case.nan_model_out:
        row[Col.OM] = 0.75  # the NaN must reach prev
    row[Col.WSLOT] = case.wslot
    row[Col.IN_NEXT] = 0.5 + torch.rand((), generator=gen, dtype=torch.float64).item()
    if case.exact_in_next and case.dtype == torch.bfloat16:
        row[Col.IN_NEXT] = (0.5, 1.0, 2.0)[case.seed % 3]
    row[Col.NOISE] = 1.0
    row[Col.STEP] = int(torch.randint(0, FLAG_LEN, (), generator=gen))
    return row.to(torch.float32)


def _arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``t``, in the given memory layout."""
    if layout == "contig":
        return t
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.empty(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
        big[..., :t.shape[-1]] = t
        return big[..., :t.shape[-1]]
    if layout == "offset":  # contiguous, but 1 element past an aligned address
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


def make_inputs(case: StepCase, device="cpu") -> dict:
    """Fresh keyword arguments for ``fused_step`` (contiguous, float32 masters converted to ``case.dtype``)."""
    gen = torch.Generator().manual_seed(case.seed)
    batch, rest = case.shape[0], case.shape[1:]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    row = make_row(case, gen)
    kw = dict(
        model_out=randn(2 * batch if case.cfg else batch, *rest), x=randn(*case.shape), coef=row,
        out=torch.full(case.shape, float("nan")), guidance_scale=case.guidance, cfg=case.cfg,
        hist=randn(HIST_SLOTS, *case.shape) if case.hist else None,
        saved=randn(*case.shape) if case.saved else None,
        noise=randn(*case.shape) if case.noise else None,
        next_in=torch.full((2 * batch if case.cfg else batch, *rest), float("nan")) if case.next_in else None,
        m_scale=torch.rand(batch, generator=gen) + 0.5 if case.m_scale else None,
        clip_range=0.8 if case.clamp == "clip" else None,
        x0_limit=torch.rand(batch, generator=gen) * 1.5 + 0.5 if case.clamp == "threshold" else None,
        flag=torch.zeros(FLAG_LEN, dtype=torch.int32) if case.flag else None,
    )
    if case.flag:
        kw["flag"][(int(row[Col.STEP]) + 1) % FLAG_LEN] = 1  # a flag raised at another step must stay raised
    # A term whose coefficients are all zero is not read: make reading it visible.
    if kw["noise"] is not None and row[Col.ON] == 0:
        kw["noise"].fill_(float("nan"))
    if kw["saved"] is not None and row[Col.OS] == 0 and row[Col.SS] == 0:
        kw["saved"].fill_(float("nan"))
    if kw["hist"] is not None:
        for j in range(HIST_SLOTS):
            if row[Col.OH0 + j] == 0 and (kw["saved"] is None or row[Col.SH0 + j] == 0):
                kw["hist"][j].fill_(float("nan"))
    if case.nan_model_out:
        kw["model_out"].view(-1)[kw["model_out"].numel() - 7] = float("nan")
    for k in ("model_out", "x", "out", "hist", "saved", "noise", "next_in"):
        if kw[k] is not None:
            kw[k] = kw[k].to(case.dtype)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _clone(kw: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _lay_out(kw: dict, layout: str, inplace: bool) -> dict:
    kw = dict(kw)
    for k in ("model_out", "x", "out", "hist", "saved", "noise", "next_in"):
        if kw[k] is not None:
            kw[k] = _arrange(kw[k], layout)
    if inplace:
        kw["out"] = kw["x"]
    return kw


# ---- compiled modules ----------------------------------------------------------------------------------------


def assert_module_constants_match_python(mod) -> None:
    """A compiled step module (``fastdiff._C_cpu`` / ``_C_cuda``) was built from the Python side's layout: ABI version,
    coefficient row width and columns, history slots, dtype codes."""
    assert mod.ABI_VERSION == _ext.ABI_VERSION
    assert mod.NCOEF == NCOEF and mod.HIST_SLOTS == HIST_SLOTS
    for name, idx in mod.COLUMNS.items():
        assert Col[name] == idx, name
    assert mod.DTYPES == {str(k).removeprefix("torch."): v for k, v in DTYPE_CODES.items()}


# ---- comparison ----------------------------------------------------------------------------------------------


def assert_close_nan(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """assert_close with the table's tolerance, where NaN must meet NaN (unread inputs, NaN-injected cases)."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        where = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(f"{msg}: NaN positions differ (first at {where}); actual has {int(nan_a.sum())} NaN, "
                             f"expected {int(nan_e.sum())}")
    zero = torch.zeros((), dtype=a.dtype)
    assert_close(torch.where(nan_a, zero, a), torch.where(nan_e, zero, e), dtype=dtype, msg=msg)


def assert_equal_nan(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Bit for bit (NaN meets NaN; -0.0 equals 0.0); says how many elements differ and by how much."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not bool(same.all()):
        diff = (a.double() - e.double()).abs().nan_to_num(float("inf"))
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{msg}: {int((~same).sum())} of {same.numel()} elements differ, by up to "
                             f"{diff.max().item():.3g} (at {where}: {a[where].item()!r} vs {e[where].item()!r})")


def check_case(case: StepCase, backend: str, device="cpu", exact: bool = False) -> None:
    """Run ``case`` with ``backend`` on ``device`` and with the torch reference; compare every output (within the
    tolerance table, or bit for bit with ``exact``)."""
    base = make_inputs(case, device)
    results = {}
    for name in ("torch", backend):
        kw = _lay_out(_clone(base), case.layout, case.inplace)
        returned = fused_step(**kw, backend=name)
        assert returned is kw["out"], f"{name}: fused_step must return out"
        results[name] = kw
    ref, got = results["torch"], results[backend]
    for k in ("out", "next_in", "hist", "saved"):
        if ref[k] is not None:
            assert got[k].dtype == case.dtype
            if exact:
                assert_equal_nan(got[k], ref[k], msg=f"{case} [{backend} vs torch] {k}")
            else:
                assert_close_nan(got[k], ref[k], case.dtype, msg=f"{case} [{backend} vs torch] {k}")
    if case.flag:
        assert torch.equal(got["flag"].cpu(), ref["flag"].cpu()), (
            f"{case}: flag {got['flag'].tolist()} != reference {ref['flag'].tolist()}")
        if case.nan_model_out:
            step = int(base["coef"][Col.STEP])
            assert int(got["flag"][step]) == 1, f"{case}: NaN in model_out did not raise flag[{step}]"
