"""fastdiff._ext: a missing, broken or stale compiled module is a flag and a clear error, never an import failure."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastdiff import _ext
from fastdiff.errors import BackendUnavailable, ExtensionNotBuilt

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_loader():
    saved = dict(_ext._loaded)
    _ext._loaded.clear()
    yield
    _ext._loaded.clear()
    _ext._loaded.update(saved)  # as before the test: later torch.compile traces read the recorded answers


def test_import_fastdiff_without_compiled_modules():
    # sys.modules[name] = None makes `import name` raise ImportError, as if the .so were absent.
    code = (
        "import sys; sys.modules['fastdiff._C_cpu'] = None; sys.modules['fastdiff._C_cuda'] = None\n"
        "import torch, fastdiff\n"
        "from fastdiff import _ext\n"
        "from fastdiff.ops import resolve\n"
        "assert not _ext.cpu_available() and not _ext.cuda_available()\n"
        "assert 'ModuleNotFoundError' in _ext.cpu_error(), _ext.cpu_error()\n"
        "assert resolve('auto', torch.empty(1)).name == 'torch-fast'\n"
        "assert resolve('auto', torch.empty(2)).name == 'torch-fast'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    # the fall-back to PyTorch (the fast PyTorch step, not the reference) is said once, where users see it (stderr),
    # with the reason
    assert res.stderr.count("using step backend 'torch-fast'") == 1, res.stderr
    assert "cpp: the C++ extension is not built" in res.stderr and "python -m fastdiff info" in res.stderr


def test_missing_module_raises_typed_error_with_versions(monkeypatch, fresh_loader):
    monkeypatch.setitem(sys.modules, "fastdiff._C_cpu", None)
    assert not _ext.cpu_available()
    with pytest.raises(ExtensionNotBuilt) as info:
        _ext.require_cpu()
    msg = str(info.value)
    assert "fastdiff._C_cpu did not load" in msg and "Python" in msg and torch.__version__ in msg
    assert "pip install" in msg
    assert isinstance(info.value, BackendUnavailable)


def test_stale_abi_counts_as_not_built(monkeypatch, fresh_loader):
    stale = types.ModuleType("fastdiff._C_cuda")
    stale.ABI_VERSION = _ext.ABI_VERSION - 1
    monkeypatch.setitem(sys.modules, "fastdiff._C_cuda", stale)
    assert not _ext.cuda_available()
    assert "stale build" in _ext.cuda_error()
    with pytest.raises(ExtensionNotBuilt, match="stale build"):
        _ext.require_cuda()


def test_build_info_reports_each_module(fresh_loader):
    info = _ext.build_info()
    assert set(info) == {"_C_cpu", "_C_cuda"}
    for name, available in (("_C_cpu", _ext.cpu_available()), ("_C_cuda", _ext.cuda_available())):
        assert ("error" in info[name]) != available
