"""The onnxruntime model backend: the sampler with backend="onnxruntime" matches the torch backend, exported files
as ``model=``, the on-the-fly export cache, fp16 graphs, input checks and registry errors."""

from __future__ import annotations

import onnx
import pytest
import torch

import fastdiff
from fastdiff.backends.base import TorchRunner
from fastdiff.backends.registry import make_runner
from fastdiff.errors import BackendUnavailable, InvalidInput, ModelNotFound, UnknownBackend
from fastdiff.export import export_onnx
from tests.export.tiny_models import digits_model, sdxl_like_unet, tiny_label_model
from tests.tolerances import rel_err

ort = pytest.importorskip("onnxruntime")
from fastdiff.backends.onnxruntime import OnnxRunner, OnnxSampler  # noqa: E402
from fastdiff.exported.session import onnxruntime_reasons  # noqa: E402

STEPS, G = 4, 3.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def model():
    """The digits teacher (its architecture with random weights while the weights are absent)."""
    return digits_model()


@pytest.fixture(scope="module")
def ort_sampler(model, cache):
    return fastdiff.Sampler(model, scheduler="dpmpp_2m", backend="onnxruntime")


def _sample(sampler, **kw):
    return sampler.sample(num_inference_steps=STEPS, guidance_scale=G, generator=torch.Generator().manual_seed(0),
                          output_type="latent", progress=False, **kw)


def test_sampler_onnxruntime_matches_torch(model, ort_sampler):
    """Acceptance: sampling with backend="onnxruntime" matches the torch backend."""
    assert isinstance(ort_sampler.runner, OnnxRunner) and ort_sampler.runner.dtype == torch.float32
    want = _sample(fastdiff.Sampler(model, scheduler="dpmpp_2m", backend="torch"), class_labels=[0, 5, 9])
    got = _sample(ort_sampler, class_labels=[0, 5, 9])
    assert got.shape == want.shape and rel_err(got, want) < 1e-4


def test_on_the_fly_export_is_cached(model, ort_sampler, cache, monkeypatch):
    import fastdiff.export.cache as export_cache

    files = list(cache.rglob("model.onnx"))
    assert len(files) == 1
    monkeypatch.setattr(export_cache, "export_onnx", lambda *a, **k: pytest.fail("exported again instead of the cache"))
    again = fastdiff.Sampler(model, scheduler="dpmpp_2m", backend="onnxruntime")
    assert again.runner.path == files[0]


def test_exported_file_as_model(model, ort_sampler):
    path = ort_sampler.runner.path
    sampler = fastdiff.Sampler(str(path), scheduler="dpmpp_2m")  # a path picks onnxruntime by its suffix
    runner = sampler.runner
    assert isinstance(runner, OnnxRunner) and runner.label_model is None  # on-the-fly exports hold the UNet only
    labels = torch.tensor([2, 7])
    ehs, neg = model.encode_labels(labels), model.encode_labels(torch.full_like(labels, model.null_label))
    want = _sample(fastdiff.Sampler(model.unet, scheduler="dpmpp_2m", backend="torch"), encoder_hidden_states=ehs,
                   negative_encoder_hidden_states=neg)
    got = _sample(sampler, encoder_hidden_states=ehs, negative_encoder_hidden_states=neg)
    assert rel_err(got, want) < 1e-4


def test_runner_checks_inputs(ort_sampler):
    r = ort_sampler.runner
    t = torch.full((2,), 10.0)
    ehs = torch.randn(2, 1, r.cross_attention_dim)
    out = r(torch.randn(2, r.in_channels, 10, 6), t, ehs)  # any size the UNet can divide
    assert out.shape == (2, r.out_channels, 10, 6)
    with pytest.raises(InvalidInput, match=r"input 'sample' .* must have size"):
        r(torch.randn(2, r.in_channels + 1, 8, 8), t, ehs)
    with pytest.raises(InvalidInput, match=r"height=9 .*multiples of 2"):
        r(torch.randn(2, r.in_channels, 9, 8), t, ehs)
    with pytest.raises(InvalidInput, match="has batch=2 but another input has batch=3"):
        r(torch.randn(3, r.in_channels, 8, 8), torch.full((3,), 1.0), ehs)
    with pytest.raises(InvalidInput, match="has no inputs for.*timestep_cond"):
        r(torch.randn(2, r.in_channels, 8, 8), t, ehs, timestep_cond=torch.randn(2, 4))
    with pytest.raises(InvalidInput, match="needs input 'encoder_hidden_states'"):
        r(torch.randn(2, r.in_channels, 8, 8), t)
    with pytest.raises(InvalidInput, match="exported in torch.float32 but dtype=torch.float16"):
        OnnxRunner(r.path, dtype=torch.float16)
    with pytest.raises(InvalidInput, match="holds a UNet graph"):
        OnnxSampler(r.path)


def test_fp16_export_with_external_data_runs(tmp_path):
    model = tiny_label_model()
    report = export_onnx(model, tmp_path, precision="fp16", external_data="always", progress=False)
    assert [f for f, _ in report.files] == [str(tmp_path / "model.onnx.data"), str(tmp_path / "model.onnx")]
    assert report.precision == "fp16" and all(p.ok and p.tol == 2e-2 for p in report.parity)
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert next(model.unet.parameters()).dtype == torch.float32  # the caller's model is untouched
    runner = make_runner(tmp_path / "model.onnx", "onnxruntime")
    assert runner.dtype == torch.float16 and runner.label_model is not None  # the label table travels along
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 900.0])
    ehs = runner.label_model.encode_labels(torch.tensor([1, 10]))
    got = runner(x.half(), t, ehs.half())
    assert got.dtype == torch.float16
    with torch.no_grad():
        want = model.unet(x, t, encoder_hidden_states=ehs).sample
    assert rel_err(got.float(), want) < 2e-2


def test_sdxl_like_added_conditioning(tmp_path):
    unet = sdxl_like_unet()
    report = export_onnx(unet, tmp_path, tokens=5, progress=False)
    assert all(p.ok for p in report.parity)
    runner = OnnxRunner(tmp_path / "model.onnx")
    names = [s.name for s in runner.info.inputs]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.randn(2, 5, 16)
    added = {"text_embeds": torch.randn(2, 12), "time_ids": torch.rand(2, 6) * 1024}
    got = runner(x, t, ehs, added_cond_kwargs=added)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    assert rel_err(got, want) < 1e-4
    with pytest.raises(InvalidInput, match="needs input 'text_embeds'"):
        runner(x, t, ehs)


def test_foreign_onnx_without_metadata(tmp_path):
    class Toy(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            return sample * timestep.view(-1, 1, 1, 1) + encoder_hidden_states.mean()

    path = tmp_path / "toy.onnx"
    b = torch.export.Dim("b", min=1, max=8)
    args = (torch.randn(2, 4, 8, 8), torch.ones(2), torch.randn(2, 3, 16))
    torch.onnx.export(Toy().eval(), args, str(path), dynamo=True, verbose=False,
                      input_names=["sample", "timestep", "encoder_hidden_states"],
                      dynamic_shapes=({0: b}, {0: b}, {0: b}))
    runner = OnnxRunner(path)
    assert runner.in_channels == 4 and runner.cross_attention_dim == 16 and runner.label_model is None
    x, t, e = torch.randn(3, 4, 8, 8), torch.full((3,), 2.0), torch.randn(3, 3, 16)
    torch.testing.assert_close(runner(x, t, e), Toy()(x, t, e))


def test_registry_errors(tmp_path):
    unet = tiny_label_model().unet
    assert isinstance(make_runner(unet, "torch"), TorchRunner)
    runner = make_runner(unet, "torch")
    assert make_runner(runner, "onnxruntime") is runner
    with pytest.raises(UnknownBackend, match="unknown model backend 'onnx'"):
        make_runner(unet, "onnx")
    with pytest.raises(ModelNotFound, match="no exported model"):
        make_runner(tmp_path / "missing.onnx", "auto")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InvalidInput, match="cannot tell the format"):
        make_runner(tmp_path / "weights.bin", "auto")
    with pytest.raises(BackendUnavailable, match="dtype torch.bfloat16 is not supported"):
        make_runner(unet, "onnxruntime", "cpu", torch.bfloat16)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert any("CUDAExecutionProvider" in r for r in onnxruntime_reasons("cuda"))
    assert onnxruntime_reasons("cpu") == []
