"""TensorRT: engine container, cache keys, cache hits / rebuilds, range checks and error cases (everywhere), and the
real build / run path (only where ``tensorrt`` imports and a GPU is visible; skipped with that reason otherwise)."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.export import tensorrt as ftrt
from fastdiff.exported import engine as eng
from fastdiff.exported.specs import DimRange, TensorSpec

GPU = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
OTHER_GPU = {"name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}
SHAPES = {"sample": [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 128]], "timestep": [[1], [2], [8]]}


def _meta(**kw) -> eng.EngineMeta:
    base = dict(trt_version="10.3.0", gpu=GPU, onnx_digest="ab" * 32, precision="fp16", shapes=SHAPES,
                onnx_path="out/model.onnx")
    return eng.EngineMeta(**{**base, **kw})


def test_engine_container_round_trip():
    plan = bytes(range(256)) * 10
    data = eng.pack_engine(plan, _meta())
    meta, got = eng.unpack_engine(data)
    assert got == plan and meta.trt_version == "10.3.0" and meta.gpu == GPU and meta.plan_size == len(plan)


def test_bare_plan_is_passed_through():
    meta, got = eng.unpack_engine(b"\x00" * 100)
    assert meta is None and got == b"\x00" * 100
    with pytest.raises(eng.EngineCorrupt, match="too short"):
        eng.unpack_engine(b"xyz")


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "pad"])
def test_corrupt_engines_are_detected(damage):
    data = bytearray(eng.pack_engine(b"P" * 1000, _meta()))
    if damage == "truncate":
        data = data[:-10]
    elif damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "header":
        data[len(eng.ENGINE_MAGIC) + 6] = ord("}")
    else:
        data += b"\x00"
    with pytest.raises(eng.EngineCorrupt):
        eng.unpack_engine(bytes(data))


def test_compatibility_problems_name_versions_and_gpus():
    m = _meta()
    assert eng.compatibility_problems(m, "10.3.0", GPU) == []
    probs = eng.compatibility_problems(m, "10.5.0", OTHER_GPU)
    assert any("TensorRT 10.3.0, this is TensorRT 10.5.0" in p for p in probs)
    assert any("H100" in p and "A100" in p and "9.0" in p and "8.0" in p for p in probs)
    assert eng.compatibility_problems(m, "10.3.0", None) == ["no CUDA GPU is visible"]


def test_cache_key_depends_on_everything():
    base = ftrt.engine_cache_key("d1", "10.3.0", GPU, SHAPES, "fp16", {"workspace_mb": 1024})
    assert base == ftrt.engine_cache_key("d1", "10.3.0", dict(GPU), dict(SHAPES), "fp16", {"workspace_mb": 1024})
    variants = [
        ftrt.engine_cache_key("d2", "10.3.0", GPU, SHAPES, "fp16", {"workspace_mb": 1024}),
        ftrt.engine_cache_key("d1", "10.4.0", GPU, SHAPES, "fp16", {"workspace_mb": 1024}),
        ftrt.engine_cache_key("d1", "10.3.0", OTHER_GPU, SHAPES, "fp16", {"workspace_mb": 1024}),
        ftrt.engine_cache_key("d1", "10.3.0", GPU, {**SHAPES, "timestep": [[1], [1], [8]]}, "fp16",
                              {"workspace_mb": 1024}),
        ftrt.engine_cache_key("d1", "10.3.0", GPU, SHAPES, "fp32", {"workspace_mb": 1024}),
        ftrt.engine_cache_key("d1", "10.3.0", GPU, SHAPES, "fp16", {"workspace_mb": 2048}),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        ftrt.engine_cache_key("d1", "10.3.0", None, SHAPES, "fp16")


def test_engine_shapes_from_dims():
    specs = [TensorSpec("sample", "float16", ("batch", 4, "height", "width")),
             TensorSpec("timestep", "float32", ("batch",)),
             TensorSpec("encoder_hidden_states", "float16", ("batch", "tokens", 768))]
    dims = {"batch": DimRange("batch", 1, 2, 8), "height": DimRange("height", 32, 64, 128, 8),
            "width": DimRange("width", 32, 64, 96, 8), "tokens": DimRange("tokens", 77, 77, 77)}
    shapes = ftrt.engine_shapes(specs, dims)
    assert shapes["sample"] == [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 96]]
    assert shapes["encoder_hidden_states"] == [[1, 77, 768], [2, 77, 768], [8, 77, 768]]
    with pytest.raises(InvalidInput, match="'tokens'"):
        ftrt.engine_shapes(specs, {k: v for k, v in dims.items() if k != "tokens"})


def test_request_outside_exported_range_fails_before_build():
    exported = {"batch": DimRange("batch", 1, 2, 8), "height": DimRange("height", 32, 64, 128, 8)}
    ftrt.check_within({"batch": DimRange("batch", 1, 1, 4)}, exported, "model.onnx")
    with pytest.raises(InvalidInput, match=r"height=136 is outside model.onnx: height must be in \[32, 128\]"):
        ftrt.check_within({"height": DimRange("height", 64, 64, 136, 8)}, exported, "model.onnx", 8)


class FakeBuilder:
    """Stands in for TensorRT's builder: returns a deterministic plan, counts builds, writes the timing cache."""

    def __init__(self):
        self.calls = 0

    def __call__(self, onnx_path, shapes, precision, *, workspace_mb, optimization_level, timing_cache, progress):
        self.calls += 1
        timing_cache.write_bytes(b"timing")
        return b"PLAN" * 64 + precision.encode() + str(self.calls).encode()


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"not really onnx, only hashed")
    return p


def test_engine_cache_hit_and_rebuild_of_corrupt_entry(onnx_file, tmp_path):
    build = FakeBuilder()
    kw = dict(cache_dir=tmp_path / "cache", trt_version="10.3.0", gpu=GPU, build=build, progress=False)
    first = ftrt.get_engine(onnx_file, SHAPES, "fp16", **kw)
    assert first.built and build.calls == 1 and first.path.is_file()
    assert (tmp_path / "cache" / "timing").is_dir()
    second = ftrt.get_engine(onnx_file, SHAPES, "fp16", **kw)
    assert not second.built and build.calls == 1 and second.path == first.path
    # a damaged cache entry is rebuilt, with a note saying why
    data = bytearray(first.path.read_bytes())
    data[-1] ^= 0xFF
    first.path.write_bytes(bytes(data))
    third = ftrt.get_engine(onnx_file, SHAPES, "fp16", **kw)
    assert third.built and build.calls == 2 and "unusable" in third.notes[0] and "damaged" in third.notes[0]
    eng.unpack_engine(third.path.read_bytes())  # valid again
    # another TensorRT version or ONNX content means another key: a new build, the old entry stays
    ftrt.get_engine(onnx_file, SHAPES, "fp16", **{**kw, "trt_version": "10.4.0"})
    onnx_file.write_bytes(b"changed")
    ftrt.get_engine(onnx_file, SHAPES, "fp16", **kw)
    assert build.calls == 4 and len(list((tmp_path / "cache" / "engines").glob("*.engine"))) == 3


def test_cached_engine_for_other_gpu_is_rebuilt(onnx_file, tmp_path):
    build = FakeBuilder()
    kw = dict(cache_dir=tmp_path / "cache", trt_version="10.3.0", build=build, progress=False)
    res = ftrt.get_engine(onnx_file, SHAPES, "fp16", gpu=GPU, **kw)
    # simulate an entry copied from another machine under this machine's key
    _, plan = eng.unpack_engine(res.path.read_bytes())
    res.path.write_bytes(eng.pack_engine(plan, _meta(gpu=OTHER_GPU)))
    again = ftrt.get_engine(onnx_file, SHAPES, "fp16", gpu=GPU, **kw)
    assert again.built and "A100" in again.notes[0]


def test_explicit_engine_files_are_refused_with_rebuild_hint(tmp_path):
    path = tmp_path / "model.engine"
    path.write_bytes(eng.pack_engine(b"P" * 100, _meta()))
    meta, plan = eng.load_engine_file(path, "10.3.0", GPU)
    assert plan == b"P" * 100
    with pytest.raises(eng.EngineMismatch, match=r"TensorRT 10.3.0, this is TensorRT 10.4.0.*"
                                                  r"python -m fastdiff.export out/model.onnx --format tensorrt"):
        eng.load_engine_file(path, "10.4.0", GPU)
    with pytest.raises(eng.EngineMismatch, match="A100"):
        eng.load_engine_file(path, "10.3.0", OTHER_GPU)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(eng.EngineCorrupt, match="truncated.*Rebuild it"):
        eng.load_engine_file(path, "10.3.0", GPU)


def test_backend_reasons_and_registry_errors(tmp_path):
    from fastdiff.backends.registry import make_runner, model_backend_reasons
    from fastdiff.backends.tensorrt import tensorrt_reasons
    from tests.export.tiny_models import tiny_unet

    reasons = tensorrt_reasons("cpu")
    assert any("CUDA" in r for r in reasons)
    assert set(model_backend_reasons()) == {"onnxruntime", "tensorrt"}
    if reasons:
        with pytest.raises(BackendUnavailable, match="backend 'tensorrt' cannot run here"):
            make_runner(tiny_unet(), "tensorrt", "cpu", torch.float32)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x" * 100)
    with pytest.raises(InvalidInput, match="runs with backend='tensorrt'"):
        make_runner(engine, "onnxruntime")


def test_tensorrt_export_checks_ranges_before_needing_tensorrt(tmp_path):
    from fastdiff.export.api import export_tensorrt
    from tests.export.tiny_models import tiny_label_model

    with pytest.raises(InvalidInput, match=r"batch=99 .*\[1, 8\]"):
        export_tensorrt(tiny_label_model(), tmp_path, batch="1:2:99", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_tensorrt_from_onnx_with_stand_ins(tmp_path, monkeypatch):
    """The orchestration of export_tensorrt (ranges, shapes from the file's metadata, engine cache, the engine file
    and its header) with TensorRT's builder and the GPU replaced by stand-ins: the real API is exercised only by the
    tensorrt-marked tests below."""
    from types import SimpleNamespace

    from fastdiff.export.api import export_tensorrt
    from fastdiff.export.onnx import export_graph
    from tests.export.tiny_models import tiny_graph

    export_graph(tiny_graph(), tmp_path / "onnx", progress=False)
    onnx_path = tmp_path / "onnx" / "model.onnx"
    build = FakeBuilder()
    monkeypatch.setattr(ftrt, "import_trt", lambda: SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(ftrt, "gpu_identity", lambda device=None: GPU)
    monkeypatch.setattr(ftrt, "build_plan", lambda onnx, shp, prec, trt=None, **kw: build(onnx, shp, prec, **kw))
    with pytest.raises(InvalidInput, match=r"batch=8 is outside profile 'tiny': batch must be in \[1, 4\]"):
        export_tensorrt(onnx_path, tmp_path / "out", batch="1:2:8", cache_dir=tmp_path / "c", parity=False)
    assert build.calls == 0  # refused before any build
    report = export_tensorrt(onnx_path, tmp_path / "out", batch="1:2:3", height=8, cache_dir=tmp_path / "c",
                             parity=False, progress=False)
    engine = tmp_path / "out" / "model.engine"
    assert report.files[-1][0] == str(engine) and report.build_time is not None and build.calls == 1
    meta, plan = eng.unpack_engine(engine.read_bytes())
    assert meta.shapes["sample"] == [[1, 1, 8, 4], [2, 1, 8, 8], [3, 1, 8, 16]]
    assert meta.onnx_path == str(onnx_path) and meta.graph_metadata["fastdiff.kind"] == "unet"
    assert json.loads(meta.graph_metadata["fastdiff.dims"])["batch"] == [1, 2, 3, 1]
    again = export_tensorrt(onnx_path, tmp_path / "out2", batch="1:2:3", height=8, cache_dir=tmp_path / "c",
                            parity=False, progress=False)
    assert build.calls == 1 and again.build_time is None and "from the cache" in again.notes[0]


# ---------------------------------------------------------------------------------------------------------------
# The real thing: only where TensorRT and a GPU exist.
# ---------------------------------------------------------------------------------------------------------------

def _require_tensorrt():
    try:
        eng.import_trt()
    except BackendUnavailable as e:
        pytest.skip(f"TensorRT not available: {'; '.join(e.reasons)}")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none is visible")


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_torch_and_is_cached(tmp_path):
    _require_tensorrt()
    from fastdiff.backends.tensorrt import TensorRTRunner
    from fastdiff.export.api import export_tensorrt
    from tests.export.tiny_models import tiny_label_model
    from tests.tolerances import rel_err

    model = tiny_label_model()
    report = export_tensorrt(model, tmp_path / "out", precision="fp32", batch="1:2:4", cache_dir=tmp_path / "c",
                             progress=False)
    assert report.build_time is not None and all(p.ok for p in report.parity)
    engine = report.files[-1][0]
    runner = TensorRTRunner(engine)
    assert runner.label_model is not None and runner.in_channels == 1
    x = torch.randn(3, 1, 8, 8, device="cuda")
    t = torch.full((3,), 400.0, device="cuda")
    ehs = runner.label_model.encode_labels(torch.tensor([1, 2, 10])).cuda()
    got = runner(x, t, ehs)
    want = model.unet.cuda()(x, t, encoder_hidden_states=ehs).sample
    assert rel_err(got, want) < 1e-3
    with pytest.raises(InvalidInput, match=r"batch=5 .*\[1, 4\]"):
        runner(torch.randn(5, 1, 8, 8, device="cuda"), t[:1].expand(5), ehs[:1].expand(5, -1, -1))
    again = export_tensorrt(model, tmp_path / "out2", precision="fp32", batch="1:2:4", cache_dir=tmp_path / "c",
                            progress=False)
    assert again.build_time is None  # engine from the cache


@pytest.mark.tensorrt
def test_tensorrt_refuses_damaged_engine(tmp_path):
    _require_tensorrt()
    from fastdiff.backends.tensorrt import TensorRTRunner

    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x01" * 4096)
    with pytest.raises(eng.EngineCorrupt, match="could not deserialize"):
        TensorRTRunner(bad)
