"""ONNX export: digits teacher / student, an SD 1.5-like random UNet, fp16 + external data, metadata, validation,
parity, atomic writes and error cases."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from fastdiff.errors import ExportError, InvalidInput, ModelNotFound
from fastdiff.export import export_onnx
from fastdiff.export.onnx import export_graph
from tests.export.tiny_models import (
    TinyConv,
    digits_model,
    load_embedded,
    sd15_like_unet,
    tiny_graph,
    tiny_label_model,
    tiny_unet,
)
from tests.tolerances import rel_err

ort = pytest.importorskip("onnxruntime")


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    model = digits_model()
    out = tmp_path_factory.mktemp("digits")
    return model, out, export_onnx(model, out, progress=False)


def test_digits_teacher_export(digits_export):
    model, out, report = digits_export
    path = out / "model.onnx"
    assert [f for f, _ in report.files] == [str(path)]
    assert report.opset == 18 and report.precision == "fp32" and report.profile == "digits"
    assert len(report.parity) == 2 and all(p.ok and p.max_rel < 1e-4 for p in report.parity)
    saved = json.loads((out / "model.onnx.report.json").read_text())
    assert saved["parity"][0]["max_abs"] == report.parity[0].max_abs
    assert "max abs err" in report.summary() and "trace+convert" in report.summary()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.report.json"]  # no staging left
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(i.name, _dims(i)) for i in proto.graph.input] == [
        ("sample", ["batch", 1, "height", "width"]), ("timestep", ["batch"]),
        ("encoder_hidden_states", ["batch", 1, 32])]
    assert _dims(proto.graph.output[0]) == ["batch", 1, "height", "width"]
    meta = _meta(path)
    assert meta["fastdiff.kind"] == "unet" and meta["fastdiff.family"] == "digits"
    assert json.loads(meta["fastdiff.dims"])["height"] == [8, 16, 32, 2]
    assert json.loads(meta["fastdiff.scheduler"])["_class_name"] == "DPMSolverMultistepScheduler"
    assert json.loads(meta["fastdiff.profile"])["name"] == "digits"


def test_digits_teacher_runs_at_other_shapes(digits_export):
    model, out, _ = digits_export
    sess = _ort(out / "model.onnx")
    for b, h, w in [(3, 8, 24), (1, 32, 32)]:
        x = torch.randn(b, 1, h, w)
        t = torch.rand(b) * 999
        ehs = model.encode_labels(torch.arange(b) % 11)
        got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})[0]
        with torch.no_grad():
            want = model.unet(x, t, encoder_hidden_states=ehs).sample
        assert rel_err(torch.from_numpy(got), want) < 1e-4


def test_label_table_in_metadata(digits_export):
    from fastdiff.exported.metadata import LabelTable

    model, out, _ = digits_export
    table = LabelTable(json.loads(_meta(out / "model.onnx")["fastdiff.labels"]), torch.device("cpu"), torch.float32)
    labels = torch.tensor([0, 3, 10])
    torch.testing.assert_close(table.encode_labels(labels), model.encode_labels(labels))
    with pytest.raises(InvalidInput, match="class labels must be integers"):
        table.encode_labels([11])


def test_digits_student_export(tmp_path):
    model = load_embedded("digits-onestep")
    report = export_onnx(model, tmp_path, progress=False)
    assert all(p.ok for p in report.parity)
    assert _meta(tmp_path / "model.onnx")["fastdiff.model"] == "digits-onestep"


@pytest.mark.slow
def test_sd15_like_random_unet(tmp_path):
    """Acceptance: a random-weight UNet2DConditionModel with SD 1.5's block layout, scaled down."""
    unet = sd15_like_unet()
    report = export_onnx(unet, tmp_path, progress=False)
    assert report.profile == "auto" and all(p.ok and p.max_rel < 1e-4 for p in report.parity)
    path = tmp_path / "model.onnx"
    meta = _meta(path)
    dims = json.loads(meta["fastdiff.dims"])
    assert dims["height"] == [8, 16, 32, 8] and dims["tokens"] == [1, 77, 512, 1]
    sess = _ort(path)
    x, t, ehs = torch.randn(3, 4, 24, 8), torch.tensor([1.0, 500.0, 999.0]), torch.randn(3, 5, 32)
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})[0]
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ehs).sample
    assert rel_err(torch.from_numpy(got), want) < 1e-4


# --- the generic export path on a tiny graph (seconds, not minutes) ---------------------------------------------

def test_failed_parity_writes_nothing(tmp_path):
    g = tiny_graph(reference=lambda a: TinyConv()(*a) + 1.0)
    with pytest.raises(ExportError, match=r"(?s)parity check failed.*FAILED.*Nothing was written"):
        export_graph(g, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_replaces_atomically_and_external_data_threshold(tmp_path, monkeypatch):
    import fastdiff.export.onnx as fonnx

    export_graph(tiny_graph(), tmp_path, progress=False)
    first = (tmp_path / "model.onnx").read_bytes()
    monkeypatch.setattr(fonnx, "EXTERNAL_DATA_THRESHOLD", 0)  # every model is "over 2 GB" now
    report = export_graph(tiny_graph(), tmp_path, progress=False)
    assert (tmp_path / "model.onnx.data").is_file() and (tmp_path / "model.onnx").read_bytes() != first
    assert len(report.files) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx",
                                                                                    "model.onnx.data"]
    out = _ort(tmp_path / "model.onnx").run(None, {"sample": np.ones((3, 1, 5, 7), np.float32),
                                                   "timestep": np.ones(3, np.float32)})[0]
    assert out.shape == (3, 1, 5, 7)
    with pytest.raises(InvalidInput, match="over 2 GiB need external data"):
        export_graph(tiny_graph(), tmp_path / "never", external_data="never", progress=False)


def test_resolve_model_folders(tmp_path):
    from fastdiff.export.source import resolve_model
    from fastdiff.models import save

    unet = tiny_unet()
    (tmp_path / "pipe").mkdir()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}))
    src = resolve_model(tmp_path / "pipe")
    assert src.facts["cross_attention_dim"] == 8 and src.facts["down_factor"] == 2 and src.label_model is None
    assert src.scheduler_config["prediction_type"] == "v_prediction"
    assert resolve_model(tmp_path / "pipe" / "unet").scheduler_config is None
    src = resolve_model(save(tiny_label_model(), tmp_path / "student"))  # a fastdiff model folder
    assert src.label_model is not None and src.facts["tokens"] == 1 and src.facts["num_classes"] == 10
    with pytest.raises(ModelNotFound, match="holds no model"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFound, match="unknown model"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="cannot export a Linear"):
        resolve_model(torch.nn.Linear(2, 2))
