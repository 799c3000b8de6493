"""The Triton fused step against the torch reference (``fused_step(backend="triton")`` vs ``backend="torch"``).

The same checks run twice: under the Triton interpreter on CPU tensors (marker ``triton_interpret``; the
``TRITON_INTERPRET=1`` it needs is set per test, which works whatever imported triton first, because
the kernel of :mod:`fastdiff.kernels.triton.step` is a :class:`~fastdiff.kernels.triton.twin.Twin`, which picks
compiled vs interpreted at launch), and compiled on a GPU (marker ``cuda``,
skipped without one). Interpreter cases are small: the interpreter costs milliseconds per program. Case type,
feature sets, inputs and the reference comparison are :mod:`tests.step_cases`' (shared with the C++ and CUDA steps).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdiff.ops import fused_step
from fastdiff.schedulers.plan import HIST_SLOTS, NCOEF, Col
from tests.kernel_helpers import assert_follows_env_at_launch, cuda_only, interpret_only
from tests.step_cases import (
    ALL_ON,
    DTYPES,
    FEATURE_SETS,
    SMALL_SHAPES,
    StepCase,
    assert_close_nan,
    check_case,
    make_inputs,
    make_row,
)
from tests.tolerances import poison

pytest.importorskip("triton", reason="triton is not installed")

_MUTATED = ("hist", "saved", "next_in", "flag")


def clone_inputs(kw: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) and k in _MUTATED else v) for k, v in kw.items()}


def run(kw: dict, backend: str, out: torch.Tensor | None = None, copy: bool = True) -> dict:
    """Run one step of :func:`tests.step_cases.make_inputs`' arguments (on private copies of the mutated buffers
    unless ``copy=False``) into ``out`` (default: a fresh NaN-filled buffer); returns every buffer the step writes."""
    if copy:
        kw = clone_inputs(kw)
    if out is None:
        out = poison(torch.empty_like(kw["x"]))
    result = fused_step(**{**kw, "out": out}, backend=backend)
    assert result is out
    return {"out": out, **{k: kw[k] for k in _MUTATED if kw.get(k) is not None}}


def launch_direct(kw: dict, fn) -> dict:
    """Call a launcher with ``step_reference``'s signature on copies of the buffers; returns the written buffers."""
    a = clone_inputs(kw)
    a["out"] = poison(torch.empty_like(kw["x"]))
    names = ("model_out", "x", "coef", "out", "guidance_scale", "cfg", "hist", "saved", "noise", "next_in", "m_scale",
             "clip_range", "x0_limit", "flag")
    fn(*[a.get(k) for k in names])
    return {k: a[k] for k in ("out", *_MUTATED) if a.get(k) is not None}


def assert_same(actual: dict, expected: dict, dtype: torch.dtype, what: str = "") -> None:
    """Every written buffer matches the reference's; NaNs (inputs the step must not read) sit at the same places."""
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act, exp = actual[name].cpu(), exp.cpu()
        if exp.is_floating_point():
            assert_close_nan(act, exp, dtype, msg=f"{what} {name}")
        else:
            assert torch.equal(act, exp), f"{what} {name}: {act.tolist()} != {exp.tolist()}"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider last dimension)."""
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values as a transposed (non-contiguous) view."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


class _StepChecks:
    """Checks shared by the interpreter and GPU classes; subclasses set ``device`` and the TRITON_INTERPRET mode."""

    device = "cpu"

    def case(self, **kw) -> StepCase:
        """A case of :mod:`tests.step_cases`; on CPU (the interpreter truncates fp32 -> bf16) with an exact IN_NEXT."""
        return StepCase(exact_in_next=self.device == "cpu", **kw)

    def check(self, case: StepCase, exact: bool = False) -> None:
        check_case(case, backend="triton", device=self.device, exact=exact)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("features", FEATURE_SETS.values(), ids=FEATURE_SETS.keys())
    def test_bit_for_bit(self, features, dtype):
        """The reference's operations in its order, FMA contraction off, correctly rounded division: the same bits.
        (Summed in another order, one ulp per step grew to 0.099 over a 10-step UniPC loop on an H200.)"""
        if self.device == "cpu" and dtype == torch.bfloat16:
            pytest.skip("the interpreter truncates fp32 -> bf16 stores instead of rounding them")
        self.check(self.case(dtype=dtype, seed=5, **features), exact=True)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("features", FEATURE_SETS.values(), ids=FEATURE_SETS.keys())
    def test_scheduler_like(self, features, dtype):
        self.check(self.case(dtype=dtype, seed=3, **features))

    @pytest.mark.parametrize("seed", range(16))
    def test_random_features_and_zero_coefficients(self, seed):
        # Random subsets of the optional inputs, random shapes / dtypes, and ~40% of the term coefficients zero.
        gen = torch.Generator().manual_seed(1000 + seed)
        bits = torch.randint(0, 2, (7,), generator=gen).bool().tolist()
        pick = lambda n: int(torch.randint(0, n, (), generator=gen))
        case = self.case(shape=SMALL_SHAPES[pick(len(SMALL_SHAPES))], dtype=DTYPES[pick(3)], cfg=bits[0],
                         hist=bits[1], saved=bits[2], noise=bits[3], next_in=bits[4], m_scale=bits[5], flag=bits[6],
                         clamp=("none", "clip", "threshold")[pick(3)], wslot=pick(HIST_SLOTS + 1) - 1, zeros=0.4,
                         guidance=float(torch.rand((), generator=gen)) * 8, seed=seed)
        self.check(case)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_zero_coefficient_terms_are_not_read(self, dtype):
        # NaN in every optional input whose coefficients are zero: a kernel that multiplies instead of skipping
        # would turn 0 * NaN into NaN in out / saved and raise the flag.
        case = self.case(dtype=dtype, **{**ALL_ON, "wslot": 0}, seed=7)
        kw = make_inputs(case, self.device)
        for col in (Col.ON, Col.OS, Col.SS, Col.OH0 + 1, Col.SH0 + 1, Col.OH0 + 2, Col.SH0 + 2):
            kw["coef"][col] = 0.0
        kw["noise"].fill_(float("nan"))
        kw["saved"].fill_(float("nan"))
        kw["hist"][1:].fill_(float("nan"))
        kw["flag"].zero_()
        actual, expected = run(kw, "triton"), run(kw, "torch")
        assert_same(actual, expected, dtype)  # slots 1, 2 are neither read nor written: still NaN
        assert torch.isfinite(actual["out"]).all() and torch.isfinite(actual["saved"]).all()
        assert torch.isfinite(actual["next_in"]).all() and torch.isfinite(actual["hist"][0]).all()
        assert not actual["flag"].any()

    # (NaN-filled input, its coefficient set to zero, the output that must then stay finite). The input's other
    # coefficient stays nonzero, so the kernel must read it for one output and skip it for the other.
    ONE_ZERO = {
        "noise": ("noise", Col.ON, "out"),
        "saved-OS": ("saved", Col.OS, "out"),
        "saved-SS": ("saved", Col.SS, "saved"),
        "hist1-OH": ("hist1", Col.OH0 + 1, "out"),
        "hist2-SH": ("hist2", Col.SH0 + 2, "saved"),
    }

    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
    @pytest.mark.parametrize("scenario", ONE_ZERO.values(), ids=ONE_ZERO.keys())
    def test_zero_coefficient_term_skipped_per_output(self, scenario, dtype):
        source, col, clean = scenario
        case = self.case(dtype=dtype, **{**ALL_ON, "wslot": 0}, seed=8)
        kw = make_inputs(case, self.device)
        kw["coef"][col] = 0.0
        poisoned = kw["hist"][int(source[-1])] if source.startswith("hist") else kw[source]
        poisoned.fill_(float("nan"))
        actual, expected = run(kw, "triton"), run(kw, "torch")
        assert_same(actual, expected, dtype)
        assert torch.isfinite(actual[clean]).all(), f"0 * NaN leaked from {source} into {clean}"

    @pytest.mark.parametrize("wslot", [-1, 0, 1, 2])
    def test_history_slot_write(self, wslot):
        case = self.case(cfg=True, hist=True, saved=True, wslot=wslot, dtype=torch.float16, seed=11)
        kw = make_inputs(case, self.device)
        actual = run(kw, "triton")
        assert_same(actual, run(kw, "torch"), case.dtype)
        for j in range(HIST_SLOTS):  # the slots this step does not write keep their bits
            if j != wslot:
                assert torch.equal(actual["hist"][j], kw["hist"][j]), f"slot {j} changed (WSLOT {wslot})"

    @pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
    @pytest.mark.parametrize("where", ["model_out", "x", "noise", "none"])
    def test_flag_on_non_finite(self, where):
        case = self.case(cfg=True, noise=True, next_in=True, flag=True, seed=12)
        kw = make_inputs(case, self.device)
        kw["coef"][Col.OM] = 0.5  # make sure the poisoned inputs reach prev
        kw["coef"][Col.OX] = 0.5
        kw["coef"][Col.ON] = 0.5
        if where != "none":
            kw[where].view(-1)[17] = float("nan") if where != "x" else float("inf")
        actual = run(kw, "triton")
        if where == "none":
            assert_same(actual, run(kw, "torch"), case.dtype)
        step = int(kw["coef"][Col.STEP])
        expect = kw["flag"].clone()
        expect[step] = int(where != "none")
        assert torch.equal(actual["flag"], expect), f"flag {actual['flag'].tolist()} != {expect.tolist()}"
        if where != "none":  # the NaN lands where it arose, nowhere else
            bad = ~torch.isfinite(actual["out"].float())
            assert bad.view(-1)[17] and bad.sum() == 1

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_noncontiguous_inputs_and_outputs(self, dtype):
        case = self.case(dtype=dtype, **ALL_ON, seed=13)
        kw = make_inputs(case, self.device)
        expected = run(kw, "torch")
        # Fresh views with the same values: transposed (dense) inputs, strided (non-dense) in/out buffers.
        views = {k: (transposed(v) if k in ("model_out", "x", "noise") else noncontiguous(v))
                 for k, v in kw.items() if k in ("model_out", "x", "noise", "hist", "saved", "next_in")
                 and v is not None}
        assert not any(v.is_contiguous() for v in views.values())
        out = noncontiguous(poison(torch.empty_like(kw["x"])))
        actual = run({**kw, **views}, "triton", out=out, copy=False)
        assert_same(actual, expected, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_in_place_out_is_x(self, dtype):
        case = self.case(dtype=dtype, **ALL_ON, seed=14)
        kw = make_inputs(case, self.device)
        expected = run(kw, "torch")
        x = kw["x"].clone()
        actual = run({**kw, "x": x}, "triton", out=x)
        assert actual["out"] is x
        assert_same(actual, expected, dtype)

    def test_steps_chain(self):
        # Three DPM-2M-like steps through the same hist / x buffers, in place, as a sampler loop runs them.
        case = self.case(cfg=True, hist=True, next_in=True, flag=True, dtype=torch.float16, seed=15)
        kw = make_inputs(case, self.device)
        state = {b: {"x": kw["x"].clone(), "hist": kw["hist"].clone(), "flag": kw["flag"].clone()}
                 for b in ("torch", "triton")}
        for i in range(3):
            coef = make_row(dataclasses.replace(case, wslot=i % HIST_SLOTS, seed=20 + i),
                            torch.Generator().manual_seed(i)).to(self.device)
            for backend, s in state.items():
                fused_step(kw["model_out"], s["x"], coef, out=s["x"], guidance_scale=case.guidance, cfg=True,
                           hist=s["hist"], flag=s["flag"], backend=backend)
        assert_same(state["triton"], state["torch"], case.dtype, "chain")


@interpret_only
class TestTritonInterpret(_StepChecks):
    device = "cpu"

    @pytest.mark.parametrize("scheduler", ["unipc", "dpmpp_2m"])
    def test_loop_bit_for_bit(self, scheduler):
        """10 steps over a small random UNet at CFG 4, triton vs torch: the same latents, bit for bit (UniPC, whose
        corrector reads the saved buffer and the history together, ended 1.5e-4 away here, and 0.099 on an H200,
        while the kernel summed them in another order)."""
        from diffusers import UNet2DConditionModel

        import fastdiff

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8).eval()
        kw = dict(num_inference_steps=10, guidance_scale=4.0, encoder_hidden_states=torch.randn(2, 7, 32),
                  latents=torch.randn(2, 4, 8, 8), output_type="latent", progress=False)
        ref = fastdiff.sample(unet, scheduler=scheduler, backend="torch", **kw)
        got = fastdiff.sample(unet, scheduler=scheduler, backend="triton", **kw)
        assert torch.equal(got, ref), f"max diff {(got - ref).abs().max().item()}"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_odd_large_shape(self, dtype):
        # Samples of 23668 elements: blocks straddle sample boundaries (per-sample factors) and the last one is cut.
        self.check(self.case(shape=(3, 4, 97, 61), dtype=dtype, **ALL_ON, seed=21))

    @pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
    def test_int64_offset_path(self, dtype):
        # Video latents need int64 addressing (3 hist planes > 2**31 elements); force that variant on a small case.
        from fastdiff.kernels.triton import step
        from fastdiff.ops.step import step_reference

        kw = make_inputs(self.case(dtype=dtype, **ALL_ON, seed=22), self.device)
        wide = launch_direct(kw, lambda *a: step._launch(*a, force_wide=True))
        assert_same(wide, launch_direct(kw, step_reference), dtype)

    def test_kernel_mode_follows_env_at_launch(self, monkeypatch):
        from fastdiff.kernels.triton import step

        assert_follows_env_at_launch(step._fused_step_kernel, monkeypatch)

    def test_block_config(self):
        from fastdiff.kernels.triton import step

        assert step._config(10**6, interpret=True) == (256, 1)
        for numel in (1, 4 * 64 * 64, 4 * 128 * 128, 2 * 16 * 4 * 96 * 96, 2**31):
            block, warps = step._config(numel, interpret=False)
            assert 1024 <= block <= 4096 and block & (block - 1) == 0 and warps in (4, 8)


class TestTritonCompilesOffline:
    """The kernel through Triton's real NVIDIA pipeline (TTIR -> PTX -> cubin) on a machine without a GPU: catches
    what the interpreter cannot (type errors in scf.if branches, int64 paths, layouts), the vector width, and
    spills."""

    VARIANTS = {
        "fp16-euler-cfg": (torch.float16, 4, dict(CFG=True, HAS_NEXT=True, CLAMP=0, BLOCK=1024)),
        "fp32-all-threshold": (torch.float32, 8, dict(**{k: True for k in ("CFG", "HAS_HIST", "HAS_SAVED", "HAS_NOISE",
                                                                         "HAS_NEXT", "HAS_MSCALE", "HAS_FLAG")},
                                                      CLAMP=2, BLOCK=4096)),
        "bf16-bare-clip-wide": (torch.bfloat16, 8, dict(CLAMP=1, WIDE=True, BLOCK=2048)),
    }
    SWITCHES = ("CFG", "HAS_HIST", "HAS_SAVED", "HAS_NOISE", "HAS_NEXT", "HAS_MSCALE", "HAS_FLAG", "WIDE")

    @pytest.mark.parametrize("arch", [80, 90])
    @pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
    def test_compiles_for_sm80_sm90(self, variant, arch, monkeypatch):
        from fastdiff.kernels.triton import step
        from fastdiff.kernels.triton.twin import compile_offline, resource_usage, triton_type

        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # we pass it explicitly; silence 3.9's default warning
        dtype, warps, meta = variant
        meta = {**dict.fromkeys(self.SWITCHES, False), **meta}
        kernel = step._fused_step_kernel
        scalars = {"guidance_scale": "fp32", "clip_range": "fp32", "numel": "i32", "per_sample": "i32",
                   "flag_len": "i32"}
        f32_ptrs = ("coef_ptr", "m_scale_ptr", "x0_limit_ptr")
        types = {n: scalars.get(n) or ("*i32" if n == "flag_ptr" else "*fp32" if n in f32_ptrs
                                       else f"*{triton_type(dtype)}") for n in kernel.arg_names if n not in meta}
        # Pointers and the two sizes get the 16-divisibility hints a real launch with aligned, %16 tensors gets.
        aligned = tuple(n for n in kernel.arg_names if n.endswith("_ptr") or n in ("numel", "per_sample"))
        compiled = compile_offline(kernel, arch, types, meta, num_warps=warps, aligned=aligned,
                                   fp_fusion=step.FP_FUSION)
        ptx = compiled.asm["ptx"]
        # Bit for bit the reference's arithmetic: no contracted a * b + c, and correctly rounded division.
        assert "fma.rn.f32" not in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
        if meta["CLAMP"] == 2:
            assert "div.rn.f32" in ptx
        assert compiled.asm["cubin"]
        usage = resource_usage(compiled)
        assert usage["stack"] == 0 and usage["local"] == 0, usage
        if dtype == torch.float16:  # fp16 moves 8 elements per 16-byte access
            assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx


@cuda_only
@pytest.mark.usefixtures("compiled_triton")
class TestTritonCuda(_StepChecks):
    device = "cuda"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", [(3, 4, 97, 61), (2, 4, 128, 128), (1, 16, 8, 60, 104), (2, 4, 1024, 1024)],
                             ids=str)
    def test_large_shapes(self, shape, dtype):
        self.check(self.case(shape=shape, dtype=dtype, **ALL_ON, seed=31))

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_int64_offset_path(self, dtype):
        from fastdiff.kernels.triton import step
        from fastdiff.ops.step import step_reference

        kw = make_inputs(self.case(shape=(2, 4, 33, 65), dtype=dtype, **ALL_ON, seed=32), self.device)
        wide = launch_direct(kw, lambda *a: step._launch(*a, force_wide=True))
        assert_same(wide, launch_direct(kw, step_reference), dtype)

    def test_cuda_graph_with_row_selected_on_device(self):
        # The coefficient row is picked by a step counter in device memory; the captured graph replays every step.
        case = self.case(shape=(2, 4, 32, 32), dtype=torch.float16, cfg=True, hist=True, next_in=True, flag=True,
                         seed=33)
        kw = make_inputs(case, self.device)
        table = torch.stack([make_row(dataclasses.replace(case, wslot=i % 2, seed=i),
                                      torch.Generator().manual_seed(i)) for i in range(4)]).to(self.device)
        step_idx = torch.zeros(1, dtype=torch.long, device=self.device)
        row = torch.empty(NCOEF, device=self.device)
        bufs = {"x": kw["x"].clone(), "hist": kw["hist"].clone(), "next_in": kw["next_in"].clone(),
                "flag": kw["flag"].clone()}

        def body():
            torch.index_select(table, 0, step_idx, out=row.view(1, NCOEF))
            fused_step(kw["model_out"], bufs["x"], row, out=bufs["x"], guidance_scale=case.guidance, cfg=True,
                       hist=bufs["hist"], next_in=bufs["next_in"], flag=bufs["flag"], backend="triton")
            step_idx.add_(1)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()  # warm-up compiles the kernel outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        state = {k: kw[k].clone() for k in bufs}
        for k in bufs:
            bufs[k].copy_(kw[k])
        step_idx.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        for k in bufs:  # capture does not run the body; start again from the initial state
            bufs[k].copy_(kw[k])
        step_idx.zero_()
        for i in range(4):
            graph.replay()
            fused_step(kw["model_out"], state["x"], table[i], out=state["x"], guidance_scale=case.guidance, cfg=True,
                       hist=state["hist"], next_in=state["next_in"], flag=state["flag"], backend="torch")
        torch.cuda.synchronize()
        assert_same(bufs, state, case.dtype, "graph")
