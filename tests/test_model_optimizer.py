"""``fastdiff.optimize`` / ``fastdiff.restore`` on tiny random diffusers UNets built from configs.

On CPU the auto backend runs the PyTorch reference ops, so an optimized UNet must compute what the original does
(to fp32 rounding; in practice bit for bit). Restore must give back the very same processors and forwards. Under
the interpreter the Triton kernels run inside a whole (very tiny) UNet; on a GPU (marker ``cuda``) an SD-like
fp16 UNet is checked eagerly, in fastdiff's CUDA-graph sampler loop, and under torch.compile.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.errors import BackendUnavailable, UnknownBackend
from fastdiff.model_optimizer import FastAttnProcessor, OptimizeReport, is_optimized, optimize, restore
from tests.kernel_helpers import cuda_only, needs_cpu_ext

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
            norm_num_groups=8)
# Smallest UNet whose heads still have head_dim >= 16 (the Triton attention's minimum): the interpreter test.
TINIER = dict(TINY, block_out_channels=(32, 32), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)


def make_unet(cfg=TINY, seed=0, **overrides):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**cfg, **overrides}).eval()


def inputs(unet, batch=2, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ehs = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([10.0, 500.0][:batch] + [999.0] * max(0, batch - 2))
    return x.to(device, dtype), t.to(device), ehs.to(device, dtype)


def forward(unet, x, t, ehs):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs).sample


def snapshot(unet):
    """Everything restore must give back: processor objects, instance-level forwards, parameters."""
    procs = dict(unet.attn_processors)
    forwards = {n: m.__dict__.get("forward") for n, m in unet.named_modules()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    return procs, forwards, state


class TestOnCpu:
    def test_imports_do_not_import_triton(self):
        code = ("import sys, fastdiff.model_optimizer, fastdiff.ops.attention, fastdiff.ops.groupnorm, "
                "fastdiff.ops.geglu; assert 'triton' not in sys.modules, 'triton was imported'")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

    def test_auto_matches_the_original_exactly(self):
        unet = make_unet()
        x, t, ehs = inputs(unet)
        ref = forward(unet, x, t, ehs)
        report = optimize(unet)
        assert is_optimized(unet)
        torch.testing.assert_close(forward(unet, x, t, ehs), ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(forward(unet, x, t, ehs), ref)  # the reference ops are diffusers' own ops
        assert report.replaced == {"attention": 8, "GEGLU": 4, "ResnetBlock2D (GroupNorm+SiLU x2)": 8,
                                   "output GroupNorm+SiLU": 1, "GroupNorm": 4}
        assert report.skipped == []

    def test_report_and_one_log_line(self, caplog):
        unet = make_unet()
        with caplog.at_level(logging.INFO, logger="fastdiff"):
            report = optimize(unet)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fastdiff.optimize")]
        assert lines == [report.summary()] and "8 attention" in lines[0]
        assert isinstance(report, OptimizeReport) and str(report) == report.summary()

    def test_restore_gives_back_the_same_objects(self):
        unet = make_unet()
        x, t, ehs = inputs(unet)
        ref = forward(unet, x, t, ehs)
        procs, forwards, state = snapshot(unet)
        optimize(unet)
        assert all(isinstance(p, FastAttnProcessor) for p in unet.attn_processors.values())
        assert list(unet.state_dict()) == list(state)  # no module renamed or wrapped
        assert restore(unet) is True
        procs2, forwards2, state2 = snapshot(unet)
        assert procs2.keys() == procs.keys() and all(procs2[k] is procs[k] for k in procs)
        assert forwards2 == forwards and all(v is None for v in forwards2.values())
        assert all(torch.equal(state[k], state2[k]) for k in state)
        assert torch.equal(forward(unet, x, t, ehs), ref)
        assert not is_optimized(unet) and restore(unet) is False

    def test_optimize_twice_then_restore(self):
        unet = make_unet()
        procs = dict(unet.attn_processors)
        optimize(unet)
        optimize(unet, backend="torch")
        assert {p.backend for p in unet.attn_processors.values()} == {"torch"}
        restore(unet)
        assert all(unet.attn_processors[k] is v for k, v in procs.items())

    def test_deepcopy_of_an_optimized_model(self):
        unet = make_unet()
        x, t, ehs = inputs(unet)
        optimize(unet)
        clone = copy.deepcopy(unet)
        with torch.no_grad():
            for param in clone.parameters():  # change the copy only
                param.mul_(0.9)
        fused = forward(clone, x, t, ehs)  # the copy's replaced forwards must use the copy's modules
        assert restore(clone) and is_optimized(unet)  # restoring the copy leaves the original optimized
        assert torch.equal(fused, forward(clone, x, t, ehs))
        assert all(isinstance(p, FastAttnProcessor) for p in unet.attn_processors.values())

    def test_traces_whole_under_torch_compile(self):
        unet = make_unet()
        x, t, ehs = inputs(unet)
        optimize(unet)
        ref = forward(unet, x, t, ehs)
        compiled = torch.compile(unet, backend="eager", fullgraph=True)  # no graph break in the replaced forwards
        torch.testing.assert_close(forward(compiled, x, t, ehs), ref)

    def test_unsupported_layers_stay_and_are_reported(self):
        unet = make_unet()
        name = next(n for n, m in unet.named_modules() if isinstance(m, Attention))

        class Custom(AttnProcessor2_0):
            pass

        custom = Custom()
        unet.get_submodule(name).set_processor(custom)
        mish = ResnetBlock2D(in_channels=32, temb_channels=16, groups=8, non_linearity="mish")
        unet.add_module("extra_resnet", mish)  # not called by forward; only the report is checked
        report = optimize(unet)
        skipped = dict(report.skipped)
        assert "Custom" in skipped[name] and unet.get_submodule(name).processor is custom
        assert "Mish" in skipped["extra_resnet"] and "forward" not in mish.__dict__
        assert "forward" in mish.norm1.__dict__  # its GroupNorms still get the plain fused forward
        assert "left 2 layers" in report.summary()
        restore(unet)
        assert unet.get_submodule(name).processor is custom and "forward" not in mish.norm1.__dict__

    def test_classic_attn_processor_and_mask_fallback(self):
        unet = make_unet()
        unet.set_attn_processor(AttnProcessor())
        x, t, ehs = inputs(unet)
        ref = forward(unet, x, t, ehs)
        optimize(unet)
        torch.testing.assert_close(forward(unet, x, t, ehs), ref, rtol=1e-5, atol=1e-5)  # SDPA vs baddbmm+softmax
        attn = next(m for m in unet.modules() if isinstance(m, Attention))
        h = torch.randn(2, 16, attn.query_dim)
        mask = torch.zeros(2, 1, 16)
        with torch.no_grad():  # a masked call goes to the original processor
            torch.testing.assert_close(attn(h, attention_mask=mask), attn.processor.original(attn, h, None, mask))

    @pytest.mark.parametrize("kind", ["scale_shift", "down", "up", "skip_time_act"])
    def test_resnet_variants(self, kind):
        kwargs = dict(in_channels=16, out_channels=32, temb_channels=24, groups=4, eps=1e-6)
        kwargs.update({"scale_shift": dict(time_embedding_norm="scale_shift"), "down": dict(down=True),
                       "up": dict(up=True), "skip_time_act": dict(skip_time_act=True)}[kind])
        torch.manual_seed(0)
        block = ResnetBlock2D(**kwargs).eval()
        x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 24)
        with torch.no_grad():
            ref = block(x, temb)
            report = optimize(block, backend="torch")
            assert report.replaced == {"ResnetBlock2D (GroupNorm+SiLU x2)": 1}
            assert torch.equal(block(x, temb), ref)

    @pytest.mark.ext
    @needs_cpu_ext
    def test_cpp_backend_fuses_the_group_norms_only(self):
        unet = make_unet()
        x, t, ehs = inputs(unet)
        ref = forward(unet, x, t, ehs)
        report = optimize(unet, backend="cpp")
        assert report.replaced == {"ResnetBlock2D (GroupNorm+SiLU x2)": 8, "output GroupNorm+SiLU": 1, "GroupNorm": 4}
        kinds = {reason.split(" ")[0] for _, reason in report.skipped}
        assert kinds == {"Attention", "GEGLU"} and all("no cpp kernel" in r for _, r in report.skipped)
        out = forward(unet, x, t, ehs)
        assert not torch.equal(out, ref)  # the C++ kernel ran (its fp32 sums round differently)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        restore(unet)
        assert torch.equal(forward(unet, x, t, ehs), ref)

    def test_bad_backends(self, monkeypatch):
        unet = make_unet()
        with pytest.raises(UnknownBackend):
            optimize(unet, backend="cudnn")
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            optimize(unet, backend="cuda")  # the UNet is on the CPU
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            optimize(unet, backend="triton")
        assert not is_optimized(unet)


@pytest.mark.triton_interpret
class TestTritonInterpret:
    @pytest.fixture(autouse=True)
    def _interpret(self, monkeypatch):
        from fastdiff.kernels.triton import groupnorm

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # Big GroupNorm tiles: the interpreter costs per operation, and here only the UNet's output matters.
        monkeypatch.setattr(groupnorm, "INTERPRET_TILE", 4096)
        monkeypatch.setattr(groupnorm, "INTERPRET_PROGRAMS", 1)

    def test_whole_unet_on_triton(self):
        unet = make_unet(TINIER)
        x, t, ehs = inputs(unet)
        ref = forward(unet, x, t, ehs)
        report = optimize(unet, backend="triton")
        assert report.replaced["attention"] == 8 and not report.skipped
        out = forward(unet, x, t, ehs)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        restore(unet)
        assert torch.equal(forward(unet, x, t, ehs), ref)


def _sd_like(device, dtype):
    """An SD1.5-shaped (head dims 40 / 80, 32 groups, GEGLU) but small UNet on the GPU."""
    cfg = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8)
    with torch.device(device):
        unet = make_unet(cfg)
    return unet.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@cuda_only
@pytest.mark.usefixtures("compiled_triton")
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_sd_like_unet_close_to_diffusers(self, dtype):
        unet = _sd_like("cuda", dtype)
        x, t, ehs = inputs(unet, device="cuda", dtype=dtype)
        x32, ehs32 = x.float(), ehs.float()
        ref32 = forward(unet.float(), x32, t, ehs32)  # the fp32 original as the yardstick for both
        unet.to(dtype)
        eager = forward(unet, x, t, ehs)
        report = optimize(unet)
        assert not report.skipped
        fused = forward(unet, x, t, ehs)
        # The fused UNet must be about as close to fp32 as diffusers' own fp16 / bf16 run.
        assert _rel(fused, ref32) <= 2 * _rel(eager, ref32) + 1e-3

    def test_in_fastdiff_cuda_graph_loop(self):
        from fastdiff import Sampler

        unet = _sd_like("cuda", torch.float16)
        optimize(unet)
        _, _, ehs = inputs(unet, batch=1, device="cuda", dtype=torch.float16)
        latents = torch.randn(1, 4, 32, 32, device="cuda", dtype=torch.float16)
        out = {}
        for graph in (False, True):
            s = Sampler(unet, scheduler="euler", cuda_graph=graph)
            out[graph] = s.sample(num_inference_steps=4, guidance_scale=5.0, encoder_hidden_states=ehs,
                                  latents=latents, output_type="latent", progress=False)
        assert torch.isfinite(out[True]).all()
        torch.testing.assert_close(out[True], out[False], rtol=1e-3, atol=1e-3)  # replay vs eager, same kernels

    def test_torch_compile(self):
        unet = _sd_like("cuda", torch.float16)
        x, t, ehs = inputs(unet, device="cuda", dtype=torch.float16)
        optimize(unet)
        eager = forward(unet, x, t, ehs)
        compiled = torch.compile(unet)
        assert _rel(forward(compiled, x, t, ehs), eager) < 1e-2
