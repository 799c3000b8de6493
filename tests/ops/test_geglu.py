"""Fused GEGLU (``fastdiff.ops.geglu``) against float64 ``h * F.gelu(gate)``.

Three ways: the Triton kernel under the interpreter on CPU tensors (marker ``triton_interpret``; TRITON_INTERPRET
set per test), compiled offline for sm80 / sm90 (no GPU: compile, no spills, 16-byte vectors), and on a GPU
(marker ``cuda``, skipped without one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.ops.geglu import geglu
from tests.kernel_helpers import compile_recording, cuda_only

pytest.importorskip("triton", reason="triton is not installed")
# tanh via exp(2z): overflows to inf for large z (giving the right limit); numpy warns under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (rtol, atol) against float64 from the same rounded inputs: fp32 math, one rounding of the output (eager PyTorch
# rounds twice in fp16 / bf16: after gelu and after the product).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
TOL_INTERPRET = {**TOL, torch.bfloat16: (2e-2, 3.2e-2)}  # the interpreter truncates fp32 -> bf16


def reference(x, approximate="none"):
    h, g = x.double().chunk(2, dim=-1)
    return h * F.gelu(g, approximate=approximate)


def check(y, x, tol, approximate="none"):
    assert y.shape == x.shape[:-1] + (x.shape[-1] // 2,) and y.dtype == x.dtype
    rtol, atol = tol[x.dtype]
    torch.testing.assert_close(y.double(), reference(x, approximate), rtol=rtol, atol=atol)


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


class _GegluChecks:
    device = "cpu"
    tol = TOL
    shapes = ((7, 48), (2, 33, 80), (1, 1, 2), (3, 5, 1030))  # odd rows, F = 24 / 40 / 1 / 515

    @pytest.mark.parametrize("approximate", ["none", "tanh"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
    @pytest.mark.parametrize("case", range(4))
    def test_shapes_dtypes(self, case, dtype, approximate):
        x = rand(*self.shapes[case], dtype=dtype, device=self.device, seed=case)
        check(geglu(x, approximate, backend="triton"), x, self.tol, approximate)

    def test_strided_inputs(self):
        big = rand(4, 9, 100, device=self.device)
        for x in (big[..., :64], big[:, ::2, 10:74], big.transpose(0, 1)[..., :64]):  # row stride != 2F, gaps
            check(geglu(x, backend="triton"), x, self.tol)
        x = rand(64, 6, device=self.device).t()  # last dim not unit-stride: copied
        check(geglu(x, backend="triton"), x, self.tol)

    def test_extreme_values(self):
        x = torch.tensor([[1.0, -2.0, 0.5, 30.0, -30.0, 1e-3, 100.0, -100.0]] * 3, device=self.device)
        x = torch.cat([x, x.flip(-1)], dim=-1)
        for approximate in ("none", "tanh"):
            y = geglu(x, approximate, backend="triton")
            assert torch.isfinite(y).all()
            check(y, x, self.tol, approximate)

    def test_kernel_writes_every_output(self):
        from fastdiff.kernels.triton.geglu import launch

        x = rand(37, 2 * 45, device=self.device)
        y = torch.full((37, 45), float("nan"), device=self.device)
        launch(x, y)
        check(y, x, self.tol)


@pytest.mark.triton_interpret
class TestTritonInterpret(_GegluChecks):
    tol = TOL_INTERPRET

    @pytest.fixture(autouse=True)
    def _interpret(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    def test_under_torch_compile(self):
        x = rand(2, 5, 40)
        graphs = []
        fn = compile_recording(lambda x: geglu(x, backend="triton") - 1, graphs)
        torch.testing.assert_close(fn(x).double(), reference(x) - 1, rtol=1e-5, atol=1e-5)
        assert "torch.ops.fastdiff.geglu" in graphs[0]


class TestDispatchAndErrors:
    def test_auto_on_cpu_is_diffusers_exactly(self):
        from diffusers.models.activations import GEGLU

        torch.manual_seed(0)
        module = GEGLU(8, 12)
        x = torch.randn(2, 3, 8)
        with torch.no_grad():
            assert torch.equal(geglu(module.proj(x)), module(x))

    def test_named_triton_on_cpu_without_interpreter_raises(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            geglu(rand(2, 4), backend="triton")

    @pytest.mark.parametrize("x, kwargs, match", [
        (torch.randn(3, 5), {}, "even"),
        (torch.randn(3, 0), {}, "even"),
        (torch.randn(0, 4), {}, "empty"),
        (torch.zeros(2, 4, dtype=torch.int64), {}, "floating-point"),
        (torch.randn(2, 4), dict(approximate="erf"), "approximate"),
    ], ids=["odd", "zero", "empty", "int", "approximate"])
    def test_bad_inputs(self, x, kwargs, match):
        with pytest.raises(InvalidInput, match=match):
            geglu(x, **kwargs)


class TestCompilesOffline:
    @pytest.mark.parametrize("arch", [80, 90])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_compiles_vectorised_without_spills(self, arch, dtype, monkeypatch):
        from fastdiff.kernels.triton import geglu as kern
        from fastdiff.kernels.triton.twin import compile_offline, resource_usage, triton_type

        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
        cfg = kern.config(2 * 4096, 1280, interpret=False)  # SD1.5's first feed-forward: (8192, 2 x 1280)
        types = {"x_ptr": f"*{triton_type(dtype)}", "y_ptr": f"*{triton_type(dtype)}", "M": "i32", "F": "i32",
                 "stride_xm": "i32", "stride_ym": "i32"}
        compiled = compile_offline(kern._geglu_kernel, arch, types, dict(BLOCK_M=cfg["BLOCK_M"],
                                   BLOCK_F=cfg["BLOCK_F"], TANH=False), cfg["num_warps"], 1, tuple(types))
        usage = resource_usage(compiled)
        assert usage["stack"] == 0 and usage["local"] == 0, usage
        ptx = compiled.asm["ptx"]
        assert ".v4.b32" in ptx  # 8 x 16-bit per access


@cuda_only
@pytest.mark.usefixtures("compiled_triton")
class TestTritonCuda(_GegluChecks):
    device = "cuda"
    shapes = ((7, 48), (2, 4096, 2 * 1280), (1, 1, 2), (2, 1024, 2 * 5120))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_auto_picks_triton_and_matches(self, dtype):
        x = rand(2, 4096, 2560, dtype=dtype, device="cuda")
        check(geglu(x), x, TOL)

    @torch.no_grad()
    def test_cuda_graph_replay(self):
        x = rand(2, 256, 640, dtype=torch.float16, device="cuda")
        geglu(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = geglu(x)
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        check(y, x, TOL)
