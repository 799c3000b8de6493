"""The on-the-fly ONNX export cache checks what it loads: entries are keyed by the weights' digest, each records
its sha256 after a successful export, and a damaged entry (truncated, weights tampered with, record missing or
garbled, file gone) is rebuilt once, atomically, with a warning naming it and what was wrong."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

import fastdiff.export.cache as cache
from fastdiff.export.cache import CacheEntryRebuilt, cached_onnx_export
from tests.export.tiny_models import tiny_unet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def built(unet, tmp_path_factory) -> Path:
    """One real export; each test works on a copy of its cache folder."""
    root = tmp_path_factory.mktemp("cache")
    cached_onnx_export(unet, torch.float32, root, progress=False)
    return root


@pytest.fixture
def counted(built, monkeypatch):
    """The exports cached_onnx_export runs, counted. They publish the module export's file (a real export of the
    same model writes the same bytes, but takes a minute on a loaded CPU); the tampered-weights case runs a real
    one."""
    from fastdiff._atomic import atomic_write_bytes

    calls = []
    (good,) = built.glob("*/model.onnx")

    def export(source, out_dir, **k):
        calls.append(Path(out_dir))
        atomic_write_bytes(Path(out_dir) / "model.onnx", good.read_bytes())

    monkeypatch.setattr(cache, "export_onnx", export)
    return calls


def _copy(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cache"
    shutil.copytree(built, root)
    (path,) = root.glob("*/model.onnx")
    return root, path


def _torch_vs_onnx(unet, path: Path) -> float:
    from fastdiff.backends.onnxruntime import OnnxRunner

    g = torch.Generator().manual_seed(0)
    x, t, ehs = torch.randn(2, 1, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 1, 8, generator=g)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ehs).sample
    got = OnnxRunner(path)(x, t, encoder_hidden_states=ehs)
    return float((got - want).abs().max())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tamper_weights(path: Path) -> None:
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda i: len(onnx.numpy_helper.to_array(i).ravel()))
    arr = onnx.numpy_helper.to_array(init) + 10.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))  # a valid ONNX file, same graph, other weights: images would be off


DAMAGE = [  # (id, damage, message fragment)
    ("truncated", _truncate, "truncated or modified"),
    ("weights tampered", _tamper_weights, "truncated or modified"),
    ("record missing", lambda p: p.with_name("model.onnx.sha256").unlink(), "no checksum record"),
    ("record garbled", lambda p: p.with_name("model.onnx.sha256").write_text(""), "is unreadable"),
    ("file missing", lambda p: p.unlink(), "the ONNX file is missing"),
]


@pytest.mark.parametrize("damage, fragment", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_entry_is_rebuilt_once_with_a_warning(damage, fragment, unet, built, counted, tmp_path,
                                                        monkeypatch):
    root, path = _copy(built, tmp_path)
    good = path.read_bytes()
    if damage is _tamper_weights:
        monkeypatch.undo()  # a real export, counted
        real = cache.export_onnx
        monkeypatch.setattr(cache, "export_onnx", lambda *a, **k: counted.append(a[1]) or real(*a, **k))
    damage(path)
    with pytest.warns(CacheEntryRebuilt, match=f"cached ONNX export {path} is unusable .*{fragment}.*rebuilding"):
        assert cached_onnx_export(unet, torch.float32, root, progress=False) == path
    assert len(counted) == 1 and cache._entry_problem(path) is None
    assert _torch_vs_onnx(unet, path) < 1e-4
    assert path.read_bytes() == good  # the real export is deterministic: the same bytes as the first one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is trusted: no warning, no second export
        assert cached_onnx_export(unet, torch.float32, root, progress=False) == path
    assert len(counted) == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging or temp left


def test_a_good_entry_is_reused_without_export(unet, built, counted, tmp_path):
    root, path = _copy(built, tmp_path)
    assert path.with_name("model.onnx.sha256").read_text().split() == [cache.onnx_digest(path), "model.onnx"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cached_onnx_export(unet, torch.float32, root, progress=False) == path
    assert counted == []


def test_the_key_is_the_weights_digest(unet, built, counted, tmp_path, monkeypatch):
    """Other weights, same config: another entry (an export), never the cached file of the old weights."""
    root, path = _copy(built, tmp_path)
    other = tiny_unet(seed=1)
    monkeypatch.setattr(cache, "export_onnx", lambda src, out, **k: counted.append(out) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cached_onnx_export(other, torch.float32, root, progress=False)
    assert counted and counted[0] != path.parent


def test_a_failed_rebuild_leaves_no_record_and_is_retried(unet, built, counted, tmp_path, monkeypatch):
    root, path = _copy(built, tmp_path)
    _truncate(path)

    def fails(*a, **k):
        raise KeyboardInterrupt  # killed during the rebuild

    fake = cache.export_onnx
    monkeypatch.setattr(cache, "export_onnx", fails)
    with pytest.warns(CacheEntryRebuilt), pytest.raises(KeyboardInterrupt):
        cached_onnx_export(unet, torch.float32, root, progress=False)
    assert not path.with_name("model.onnx.sha256").exists()  # so the next call cannot trust the broken file
    monkeypatch.setattr(cache, "export_onnx", fake)
    with pytest.warns(CacheEntryRebuilt, match="no checksum record"):
        cached_onnx_export(unet, torch.float32, root, progress=False)
    assert cache._entry_problem(path) is None
