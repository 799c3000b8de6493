"""Fused GroupNorm (+ add, + SiLU) (``fastdiff.ops.groupnorm``) against float64 ``F.group_norm`` + ``F.silu``, allowed
a multiple of the error PyTorch's own ops make at the inputs' precision (tests/tolerances.py, REF_ERR_TOL).

The same checks run on every kernel: Triton under the interpreter on CPU tensors (marker ``triton_interpret``;
TRITON_INTERPRET set per test), the C++ kernel (marker ``ext``), and on a GPU (marker ``cuda``, skipped without one)
Triton and the CUDA C++ kernel. Without a GPU both GPU kernels are also compiled offline (Triton for sm80 / sm90,
nvcc for the .cu): they compile, do not spill and (NCHW) move 16-byte vectors.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.errors import BackendUnavailable, InvalidInput, UnknownBackend
from fastdiff.ops.groupnorm import group_norm
from fastdiff.ops.registry import MAX_CHANNELS_PER_GROUP, OP_KERNELS, TABLE
from tests.kernel_helpers import compile_recording, cuda_only, needs_cpu_ext, needs_cuda_ext
from tests.tolerances import assert_within_reference_error

pytest.importorskip("triton", reason="triton is not installed")
# SiLU as y / (1 + exp(-y)): exp overflows to inf for y << 0 (giving the right limit, -0); numpy warns under the
# interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def reference(x, groups, w, b, eps, silu, add=None, dtype=torch.float64):
    """diffusers' ops (x + add, F.group_norm, F.silu) on the inputs cast to ``dtype``; float64 is the truth."""

    def cast(t):
        return None if t is None else t.to(dtype)

    x = cast(x)
    if add is not None:
        x = x + cast(add).view(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, groups, cast(w), cast(b), eps)
    return F.silu(y) if silu else y


def torch_result(x, groups, w, b, eps, silu, add=None):
    """What PyTorch computes at the inputs' precision, rounded to the kernel's output dtype (x's): in the inputs'
    common dtype, since F.group_norm takes one (fp16 x with fp32 parameters runs in fp32)."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (x, w, b, add) if t is not None])
    return reference(x, groups, w, b, eps, silu, add, dtype).to(x.dtype)


def make(shape, groups, dtype, device, seed=0, affine=True, with_add=False, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * std + mean).to(device=device, dtype=dtype)
    w = (torch.randn(c, generator=g) + 1).to(device=device, dtype=dtype) if affine else None
    b = torch.randn(c, generator=g).to(device=device, dtype=dtype) if affine else None
    add = torch.randn(shape[0], c, generator=g).to(device=device, dtype=dtype) if with_add else None
    return x, w, b, add


def check(y, x, groups, w, b, eps, silu, add=None):
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_within_reference_error(y, torch_result(x, groups, w, b, eps, silu, add),
                                  reference(x, groups, w, b, eps, silu, add), "group_norm")


class _GroupNormChecks:
    device = "cpu"
    backend = "triton"
    # (shape, groups): odd spatial sizes, 1x1, 3-D and 2-D inputs, channels per group 1 / 3 / 4 / 10.
    shapes = (((2, 32, 7, 5), 8), ((1, 20, 9, 11), 2), ((3, 12, 1, 1), 4), ((2, 6, 13), 3), ((4, 8), 2),
              ((2, 12, 5, 6), 12))

    @pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
    @pytest.mark.parametrize("case", range(6))
    def test_fp32_shapes(self, case, silu):
        shape, groups = self.shapes[case]
        x, w, b, _ = make(shape, groups, torch.float32, self.device, seed=case)
        check(group_norm(x, groups, w, b, 1e-5, silu, backend=self.backend), x, groups, w, b, 1e-5, silu)

    @pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    def test_dtypes_and_layouts(self, dtype, channels_last):
        x, w, b, add = make((2, 40, 6, 7), 4, dtype, self.device, seed=1, with_add=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = group_norm(x, 4, w, b, 1e-6, True, add=add, backend=self.backend)
        check(y, x, 4, w, b, 1e-6, True, add)
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # memory format kept

    @pytest.mark.parametrize("affine", [False, True])
    def test_without_affine_and_with_add(self, affine):
        x, w, b, add = make((2, 16, 5, 3), 4, torch.float32, self.device, affine=affine, with_add=True)
        check(group_norm(x, 4, w, b, add=add, backend=self.backend), x, 4, w, b, 1e-5, False, add)

    def test_weight_only(self):
        x, w, _, _ = make((2, 16, 5, 3), 4, torch.float32, self.device)
        check(group_norm(x, 4, w, None, backend=self.backend), x, 4, w, None, 1e-5, False)

    def test_strided_input(self):
        x, w, b, add = make((2, 24, 9, 10), 6, torch.float32, self.device, with_add=True)
        xs = x[:, :, ::2, 1:]  # spatial dims do not flatten to one stride: copied
        xt = x.transpose(2, 3)  # flattens, but not (C, L) contiguous
        for v in (xs, xt):
            check(group_norm(v, 6, w, b, silu=True, add=add[:, :], backend=self.backend), v, 6, w, b, 1e-5, True, add)
        add_t = torch.randn(24, 2, device=self.device).t()  # a non-contiguous (N, C) add
        check(group_norm(x, 6, w, b, add=add_t, backend=self.backend), x, 6, w, b, 1e-5, False, add_t)

    def test_channel_slice_of_channels_last(self):
        """Channels-last but not dense (a channel slice: positions C_full apart, C < C_full): the general walk."""
        x, w, b, add = make((2, 24, 7, 9), 3, torch.float32, self.device, seed=5, with_add=True)
        x = x.to(memory_format=torch.channels_last)[:, 4:16]
        w, b, add = w[4:16], b[4:16], add[:, 4:16]
        check(group_norm(x, 3, w, b, silu=True, add=add, backend=self.backend), x, 3, w, b, 1e-5, True, add)

    def test_large_mean_small_std(self):
        # |mean| / std = 1e4: a sum / sum-of-squares variance would lose every digit in fp32 (even go negative);
        # Chan's merge of two-pass tile statistics keeps the error at what fp32 allows, i.e. what PyTorch's own
        # fp32 GroupNorm makes (about ulp(1000) / std = 6e-4 of a standard deviation).
        x, w, b, _ = make((2, 8, 17, 19), 2, torch.float32, self.device, mean=1000.0, std=0.1)
        check(group_norm(x, 2, w, b, silu=True, backend=self.backend), x, 2, w, b, 1e-5, True)

    def test_under_torch_compile(self):
        """Traced code calls the custom op (with the kernel's name), not its implementation."""
        x, w, b, add = make((2, 16, 5, 3), 4, torch.float32, self.device, with_add=True)
        graphs = []
        fn = compile_recording(lambda x: group_norm(x, 4, w, b, silu=True, add=add, backend=self.backend) + 1,
                               graphs)
        assert_within_reference_error(fn(x), torch_result(x, 4, w, b, 1e-5, True, add) + 1,
                                      reference(x, 4, w, b, 1e-5, True, add) + 1, "group_norm")
        assert "torch.ops.fastdiff.group_norm" in graphs[0] and repr(self.backend) in graphs[0]

    def test_kernel_writes_every_output(self):
        launch = TABLE["group_norm", self.backend].launch_fn()
        x, w, b, add = make((3, 12, 7, 5), 3, torch.float32, self.device, with_add=True)
        for fmt in (torch.contiguous_format, torch.channels_last):
            y = torch.full_like(x, float("nan")).to(memory_format=fmt)
            launch(x.flatten(2), w, b, add, y.flatten(2), 3, 1e-5, True)  # flatten(2): a view in both formats
            check(y, x, 3, w, b, 1e-5, True, add)


@pytest.mark.triton_interpret
class TestTritonInterpret(_GroupNormChecks):
    @pytest.fixture(autouse=True)
    def _interpret(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    @pytest.mark.parametrize("programs", [1, 64])
    def test_splits_and_channel_blocks(self, programs, monkeypatch):
        """Several chunks and channel blocks per group (a GPU-like split) and one program per group."""
        from fastdiff.kernels.triton import groupnorm as kern

        monkeypatch.setattr(kern, "INTERPRET_PROGRAMS", programs)
        p = kern.plan(1, 24, 61, 2, True, torch.device("cpu"), True)
        assert p["num_cb"] == 3  # 12 channels per group in blocks of 4
        assert p["split"] > 1 if programs > 1 else p["chunk"] > p["BLOCK_L"]  # several chunks / tiles per chunk
        x, w, b, add = make((1, 24, 61), 2, torch.float32, "cpu", with_add=True)
        check(group_norm(x, 2, w, b, silu=True, add=add, backend="triton"), x, 2, w, b, 1e-5, True, add)


@pytest.mark.ext
@needs_cpu_ext
class TestCpp(_GroupNormChecks):
    backend = "cpp"

    @pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
    def test_runs_across_tiles_and_channels(self, dtype):
        """A dense NCHW group is walked as one run of C/G x L elements (2,652 here): 512-element tiles then cut
        channels in the middle, so the add, scale and shift change inside a tile."""
        x, w, b, add = make((2, 24, 13, 17), 2, dtype, "cpu", seed=3, with_add=True)
        check(group_norm(x, 2, w, b, silu=True, add=add, backend="cpp"), x, 2, w, b, 1e-5, True, add)

    def test_mixed_precision_parameters(self):
        x, w, b, add = make((2, 16, 6, 5), 4, torch.float16, "cpu", with_add=True)
        for w_, b_, a_ in ((w.float(), b.float(), add.float()), (w, b.float(), add), (None, b.bfloat16(), None)):
            check(group_norm(x, 4, w_, b_, silu=True, add=a_, backend="cpp"), x, 4, w_, b_, 1e-5, True, a_)

    def test_several_threads(self, monkeypatch):
        from fastdiff.kernels.cpp import groupnorm as cpp_groupnorm

        monkeypatch.setattr(cpp_groupnorm, "GRAIN", 1)  # one thread per element: as many as torch allows
        old = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for fmt in (torch.contiguous_format, torch.channels_last):
                x, w, b, add = make((2, 16, 33, 33), 4, torch.float32, "cpu", seed=4, with_add=True)
                x = x.to(memory_format=fmt)
                check(group_norm(x, 4, w, b, silu=True, add=add, backend="cpp"), x, 4, w, b, 1e-5, True, add)
        finally:
            torch.set_num_threads(old)

    def test_malformed_call_is_a_value_error(self):
        from fastdiff.kernels.compiled_args import group_norm_args

        x = torch.randn(1, 6, 4)
        args = list(group_norm_args(x, torch.empty_like(x), None, None, None, 4, 1e-5, False))
        with pytest.raises(ValueError, match="divisor"):
            _ext.require_cpu().group_norm(*args, 1)  # 4 groups do not divide 6 channels: nothing is run


@pytest.mark.ext
@needs_cuda_ext
class TestCudaModuleWithoutGpu:
    def test_constants_match_python(self):
        mod = _ext.require_cuda()
        assert mod.GROUP_NORM_MAX_CHANNELS_PER_GROUP == MAX_CHANNELS_PER_GROUP
        assert mod.GROUP_NORM_WORKSPACE_PER_GROUP > 0

    def test_call_without_gpu_raises_clear_error(self):
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible: this checks the no-GPU path")
        mod = _ext.require_cuda()
        # Valid sizes and made-up addresses: the device is selected before any memory is touched.
        args = (16, 16, 0, 0, 0, 1, 4, 8, 2, 32, 8, 1, 32, 8, 1, 0, 0, 0, 0, 0, 1e-5, True, 16, 2 * 192, 0, 0)
        with pytest.raises(mod.CudaError, match="needs an NVIDIA GPU"):
            mod.group_norm(*args)


@pytest.mark.slow
class TestNvccCompilesGroupNorm:
    """csrc/cuda/groupnorm.cu through nvcc for sm_80 and sm_90 without a GPU: compiles, no kernel spills, and the
    vector kernels load 16 bytes at a time."""

    def test_compiles_without_spills(self, tmp_path):
        import shutil
        import subprocess
        from pathlib import Path

        nvcc = shutil.which("nvcc")
        if nvcc is None:
            pytest.skip("nvcc is not installed")
        root = Path(__file__).resolve().parents[2]
        src = root / "csrc" / "cuda" / "groupnorm.cu"
        base = [nvcc, "-std=c++17", "--fmad=false", f"-I{root / 'csrc'}", str(src)]
        res = subprocess.run([*base, "-c", "-o", str(tmp_path / "gn.o"), "-Xptxas", "-v",
                              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        spills = [line for line in res.stderr.splitlines() if "spill" in line]
        assert len(spills) == 2 * 2 * 2 * 3  # 2 archs x 2 kernels x 2 widths x 3 dtypes
        assert all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills
        ptx = subprocess.run([*base, "-ptx", "-arch=sm_90", "-o", "-"], capture_output=True, text=True)
        assert ptx.returncode == 0, ptx.stderr
        assert "ld.global.v4" in ptx.stdout or "ld.global.nc.v4" in ptx.stdout


class TestDispatchAndErrors:
    def test_auto_on_cpu_is_the_reference_exactly(self):
        x, w, b, add = make((2, 16, 5, 3), 4, torch.float32, "cpu", with_add=True)
        ref = F.silu(F.group_norm(x + add[:, :, None, None], 4, w, b, 1e-5))
        assert torch.equal(group_norm(x, 4, w, b, 1e-5, True, add=add), ref)
        assert torch.equal(group_norm(x, 4, w, b, backend="torch"), F.group_norm(x, 4, w, b))

    def test_named_triton_on_cpu_without_interpreter_raises(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        x, w, b, _ = make((1, 4, 3, 3), 2, torch.float32, "cpu")
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            group_norm(x, 2, w, b, backend="triton")

    def test_named_triton_float64_raises(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
        with pytest.raises(BackendUnavailable, match="float64"):
            group_norm(x, 2, backend="triton")

    def test_unknown_backend(self):
        with pytest.raises(UnknownBackend, match="cudnn"):
            group_norm(torch.randn(1, 4, 2, 2), 2, backend="cudnn")

    def test_named_kernel_on_the_wrong_device_raises(self):
        x = torch.randn(1, 4, 3, 3)
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            group_norm(x, 2, backend="cuda")

    def test_op_kernel_table_matches_the_ops(self, monkeypatch):
        """OP_KERNELS (what `fastdiff info` prints) names exactly the kernels each op accepts."""
        from fastdiff.ops.attention import attention
        from fastdiff.ops.geglu import geglu

        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        q = torch.randn(1, 2, 8, 16)
        calls = {"attention": lambda be: attention(q, q, q, backend=be),
                 "group_norm": lambda be: group_norm(torch.randn(1, 4, 3, 3), 2, backend=be),
                 "geglu": lambda be: geglu(torch.randn(2, 8), backend=be)}
        assert set(calls) == set(OP_KERNELS)
        for op, call in calls.items():
            for be in ("triton", "cuda", "cpp"):
                try:
                    call(be)
                    missing = False
                except BackendUnavailable as e:
                    missing = f"has no {be} kernel" in str(e)
                assert missing == (be not in OP_KERNELS[op]), (op, be)

    def test_ops_without_that_kernel_say_so(self):
        from fastdiff.ops.attention import attention
        from fastdiff.ops.geglu import geglu

        q = torch.randn(1, 2, 8, 16)
        with pytest.raises(BackendUnavailable, match="attention has no cpp kernel"):
            attention(q, q, q, backend="cpp")
        with pytest.raises(BackendUnavailable, match="geglu has no cuda kernel"):
            geglu(torch.randn(2, 8), backend="cuda")

    @pytest.mark.parametrize("kwargs, match", [
        (dict(x=torch.randn(4)), r"\(N, C, \*\)"),
        (dict(num_groups=3), "divisor"),
        (dict(num_groups=0), "divisor"),
        (dict(weight=torch.randn(5)), "weight"),
        (dict(bias=torch.randn(4, 1)), "bias"),
        (dict(add=torch.randn(2, 4)), "add"),
        (dict(eps=-1.0), "eps"),
        (dict(x=torch.zeros(1, 4, 2, 2, dtype=torch.int32)), "floating-point"),
        (dict(x=torch.randn(0, 4, 2, 2)), "empty"),
    ], ids=["1d", "groups", "zero-groups", "weight", "bias", "add", "eps", "int", "empty"])
    def test_bad_inputs(self, kwargs, match):
        args = dict(x=torch.randn(1, 4, 3, 3), num_groups=2)
        args.update(kwargs)
        with pytest.raises(InvalidInput, match=match):
            group_norm(**args)


class TestCompilesOffline:
    """The shipped configs at SD UNet shapes through Triton's NVIDIA pipeline, without a GPU: compiles, does not
    spill, and (NCHW) moves fp16 in 16-byte vectors."""

    CASES = {
        "sd15-64x64-nchw": ((2, 320, 4096), False, 90), "sd15-16x16-nchw": ((2, 1280, 256), False, 90),
        "sdxl-128x128-nchw-sm80": ((2, 320, 16384), False, 80), "sd15-64x64-nhwc": ((2, 320, 4096), True, 90),
    }

    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_compiles_without_spills(self, case, monkeypatch):
        from fastdiff.kernels.triton import groupnorm as kern
        from fastdiff.kernels.triton.twin import compile_offline, resource_usage

        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
        (n, c, length), channels_last, arch = case
        device = torch.device("cuda", 0)
        monkeypatch.setitem(kern._sm_count, device, 132)  # plan as for an H100 (no GPU needed)
        p = kern.plan(n, c, length, 32, not channels_last, device, interpret=False)
        assert n * 32 * p["num_cb"] * p["split"] >= 2 * 132  # enough programs to fill the SMs
        tiles = dict(CPG=p["CPG"], BLOCK_C=p["BLOCK_C"], BLOCK_L=p["BLOCK_L"])
        unit = "c" if channels_last else "l"  # the unit-stride dim (a real launch specialises stride 1)
        other = "l" if channels_last else "c"
        for kernel, extra, strided in (
            (kern._gn_stats_kernel, {f"stride_{unit}": 1, "HAS_ADD": True}, (f"stride_{other}",)),
            (kern._gn_apply_kernel, {f"stride_x{unit}": 1, f"stride_y{unit}": 1, "BLOCK_S": 16, "HAS_WEIGHT": True,
                                     "HAS_BIAS": True, "HAS_ADD": True, "SILU": True},
             (f"stride_x{other}", f"stride_y{other}")),
        ):
            types = {a: "*fp32" if a in ("mean_ptr", "m2_ptr") else "*fp16" if a.endswith("_ptr")
                     else "fp32" if a in ("eps", "total") else "i32" for a in kernel.arg_names}
            # What a real launch at these shapes specialises: aligned pointers, sample strides, L and chunk % 16.
            aligned = tuple(a for a in kernel.arg_names if a.endswith("_ptr") or a in (
                "stride_n", "stride_xn", "stride_yn", "L", "chunk")) + strided
            compiled = compile_offline(kernel, arch, types, {**tiles, **extra}, p["num_warps"], 2, aligned)
            usage = resource_usage(compiled)
            assert usage["stack"] == 0 and usage["local"] == 0, usage
            if not channels_last:
                assert "ld.global.v4" in compiled.asm["ptx"] or "ld.global.L1::evict_last.v4" in compiled.asm["ptx"]


class _GpuChecks(_GroupNormChecks):
    """On a GPU, for each GPU kernel: the shared checks plus SD UNet shapes, a misaligned view, CUDA-graph replay
    and torch.compile (inductor)."""

    device = "cuda"

    @pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    @pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (2, 320, 128, 128),
                                       (3, 96, 37, 29), (1, 64, 256, 256)], ids=str)
    def test_unet_shapes(self, dtype, channels_last, shape):
        x, w, b, add = make(shape, 32, dtype, "cuda", with_add=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = group_norm(x, 32, w, b, 1e-5, True, add=add, backend=self.backend)
        check(y, x, 32, w, b, 1e-5, True, add)

    def test_misaligned_input(self):
        x, w, b, add = make((2, 64, 16, 17), 8, torch.float16, "cuda", with_add=True)
        v = x.flatten(2)[:, :, 1:]  # (N, C, 271): rows start off 16-byte boundaries (the CUDA kernel's scalar path)
        check(group_norm(v, 8, w, b, silu=True, add=add, backend=self.backend), v, 8, w, b, 1e-5, True, add)

    @torch.no_grad()
    def test_cuda_graph_replay(self):
        x, w, b, add = make((2, 320, 32, 32), 32, torch.float16, "cuda", with_add=True)
        group_norm(x, 32, w, b, silu=True, add=add, backend=self.backend)  # compile / load outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = group_norm(x, 32, w, b, silu=True, add=add, backend=self.backend)
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        check(y, x, 32, w, b, 1e-5, True, add)

    def test_torch_compile_inductor(self):
        x, w, b, _ = make((2, 320, 32, 32), 32, torch.float16, "cuda")
        fn = torch.compile(lambda x: group_norm(x, 32, w, b, silu=True, backend=self.backend) * 2, fullgraph=True)
        assert_within_reference_error(fn(x), 2 * torch_result(x, 32, w, b, 1e-5, True),
                                      2 * reference(x, 32, w, b, 1e-5, True), "group_norm")


@cuda_only
@pytest.mark.usefixtures("compiled_triton")
class TestTritonCuda(_GpuChecks):
    def test_auto_is_triton(self):
        x, w, b, add = make((2, 320, 32, 32), 32, torch.float16, "cuda", with_add=True)
        assert torch.equal(group_norm(x, 32, w, b, silu=True, add=add),
                           group_norm(x, 32, w, b, silu=True, add=add, backend="triton"))


@cuda_only
@needs_cuda_ext
class TestCudaExt(_GpuChecks):
    backend = "cuda"
