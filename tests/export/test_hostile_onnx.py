"""Hostile exported files: an ``.onnx`` whose fastdiff metadata is not JSON, lacks keys, holds the wrong types,
is longer than the exporter writes, or whose label table disagrees with its declared sizes, is refused with
:class:`InvalidInput` when it is opened -- not with a KeyError / binascii error at the first labelled sample."""

from __future__ import annotations

import base64
import json

import pytest

import fastdiff
from fastdiff.errors import InvalidInput
from fastdiff.export import export_onnx
from fastdiff.exported.metadata import LABEL_TABLE_MAX_BYTES, GraphInfo
from tests.export.tiny_models import tiny_label_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    export_onnx(tiny_label_model(), out, parity=False, progress=False)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def meta(exported) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}


def _labels(**kv):
    def edit(m):
        table = json.loads(m["fastdiff.labels"])
        table.update(kv)
        return {**m, "fastdiff.labels": json.dumps(table)}
    return edit


def _set(key, value):
    return lambda m: {**m, key: value}


def _drop_label_key(key):
    def edit(m):
        table = json.loads(m["fastdiff.labels"])
        table.pop(key)
        return {**m, "fastdiff.labels": json.dumps(table)}
    return edit


# (id, edit of the metadata, message fragment)
CASES = [
    ("labels not json", _set("fastdiff.labels", "{oops"), "metadata fastdiff.labels is not valid JSON"),
    ("labels a list", _set("fastdiff.labels", "[1]"), "fastdiff.labels must be a JSON object"),
    ("labels lack data", _drop_label_key("data"), "lacks ['data']"),
    ("more classes than rows", _labels(num_classes=50, null_label=50), "its sizes declare [51, 8]"),
    ("null label", _labels(null_label=3), "null_label is 3 but must be num_classes (10)"),
    ("classes string", _labels(num_classes="10"), "num_classes must be an integer"),
    ("short data", _labels(data=base64.b64encode(b"\0" * 12).decode()), "holds 12 bytes, expected 352"),
    ("data not base64", _labels(data="!!!"), "is not base64"),
    ("embed_dim vs model", _labels(embed_dim=4, tokens=2), "embed_dim 4 but the model's cross_attention_dim is 8"),
    ("table too large", _labels(num_classes=10**6, null_label=10**6, shape=[10**6 + 1, 8]), "more than the"),
    ("value too long", _set("fastdiff.scheduler", " " * (2 * LABEL_TABLE_MAX_BYTES)), "characters long"),
    ("no outputs", lambda m: {k: v for k, v in m.items() if k != "fastdiff.outputs"}, "lacks fastdiff.outputs"),
    ("spec without dims", _set("fastdiff.inputs", '[{"name": "sample"}]'), "without name / dtype / dims"),
    ("inputs an object", _set("fastdiff.inputs", "{}"), "fastdiff.inputs must be a JSON list"),
    ("in_channels string", lambda m: {**m, "fastdiff.model_config": json.dumps(
        {**json.loads(m["fastdiff.model_config"]), "in_channels": "1"})}, "in_channels must be an integer"),
    ("dims malformed", _set("fastdiff.dims", '{"B": 3}'), "metadata is malformed"),
    ("scheduler a list", _set("fastdiff.scheduler", "[]"), "fastdiff.scheduler must be a JSON object"),
]


@pytest.mark.parametrize("edit,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_metadata_refused(meta, edit, needle):
    with pytest.raises(InvalidInput) as e:
        GraphInfo.from_metadata(edit(dict(meta)))
    assert needle in str(e.value)
    assert len(str(e.value)) < 500


def test_untouched_metadata_reads(meta):
    assert GraphInfo.from_metadata(meta).labels["num_classes"] == 10


@pytest.mark.parametrize("case", ["labels not json", "more classes than rows", "no outputs"])
def test_sampler_on_an_altered_file(exported, tmp_path, case):
    """End to end: the file opened by path (onnxruntime) is refused at construction."""
    edit = dict((c[0], c[1]) for c in CASES)[case]
    proto = onnx.load(str(exported))
    new = edit({p.key: p.value for p in proto.metadata_props})
    del proto.metadata_props[:]
    for k, v in new.items():
        proto.metadata_props.add(key=k, value=v)
    path = tmp_path / "altered.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(InvalidInput):
        fastdiff.Sampler(str(path), backend="onnxruntime")
