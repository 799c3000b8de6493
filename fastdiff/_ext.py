"""Loads the compiled modules (``fastdiff._C_cpu``, ``fastdiff._C_cuda``) without ever failing ``import fastdiff``.

A missing or broken build is a flag (:func:`cpu_available`, :func:`cuda_available`) plus the reason
(:func:`cpu_error`), and :func:`require_cpu` / :func:`require_cuda` raise
:class:`~fastdiff.errors.ExtensionNotBuilt` naming the build and runtime versions. A module built from another
checkout with a different calling convention (``ABI_VERSION``) counts as not loaded, so a stale in-place ``.so``
gives a clear "rebuild" message instead of a wrong call.
"""

from __future__ import annotations

import importlib
import platform
import sys

from fastdiff.errors import ExtensionNotBuilt

_REBUILD = "Rebuild with `pip install --no-build-isolation -v .` (needs a C++ compiler; nvcc for CUDA)."
# Must match kAbiVersion in csrc/step_params.h.
ABI_VERSION = 2


# {module name: (module or None, load error or None)}. A plain dict rather than functools.cache: torch.compile
# traces through a cache wrapper (and would then trace importlib), but reads a dict entry as a constant.
_loaded: dict[str, tuple] = {}


def _load(name: str):
    hit = _loaded.get(name)
    if hit is not None:
        return hit
    try:
        mod = importlib.import_module(f"fastdiff.{name}")
    except Exception as e:  # noqa: BLE001 - any failure to load is reported, never raised at import time
        result = None, f"{type(e).__name__}: {e}"
    else:
        abi = getattr(mod, "ABI_VERSION", None)
        result = (mod, None) if abi == ABI_VERSION else (
            None, f"stale build: {getattr(mod, '__file__', name)} has ABI version {abi}, this fastdiff expects "
                  f"{ABI_VERSION}")
    _loaded[name] = result
    return result


def load_all() -> None:
    """Load (or record why not) both modules now, e.g. before a torch.compile trace that asks whether they are
    available: the trace then reads the recorded answer instead of running the import."""
    _load("_C_cpu")
    _load("_C_cuda")


def cpu_module():
    return _load("_C_cpu")[0]


def cuda_module():
    return _load("_C_cuda")[0]


def cpu_available() -> bool:
    return cpu_module() is not None


def cuda_available() -> bool:
    return cuda_module() is not None


def cpu_error() -> str | None:
    return _load("_C_cpu")[1]


def cuda_error() -> str | None:
    return _load("_C_cuda")[1]


def _runtime_versions() -> str:
    torch = sys.modules.get("torch")
    torch_v = getattr(torch, "__version__", "not imported")
    cuda_v = getattr(getattr(torch, "version", None), "cuda", None)
    return (f"runtime: Python {platform.python_version()} ({sys.implementation.cache_tag}), torch {torch_v}"
            + (f" (CUDA {cuda_v})" if cuda_v else ""))


def build_info() -> dict:
    """{module name: its BUILD_INFO dict (compiler, OpenMP, CUDA runtime, archs) or the load error}."""
    info = {}
    for name in ("_C_cpu", "_C_cuda"):
        mod, err = _load(name)
        info[name] = dict(getattr(mod, "BUILD_INFO", {})) if mod is not None else {"error": err}
    mod = cuda_module()
    if mod is not None:
        info["_C_cuda"]["driver_version"] = mod.driver_version()
        info["_C_cuda"]["device_count"] = mod.device_count()
    return info


def require_cpu():
    mod = cpu_module()
    if mod is None:
        raise ExtensionNotBuilt("cpp", [f"fastdiff._C_cpu did not load: {cpu_error()}", _runtime_versions()],
                                _REBUILD)
    return mod


def require_cuda():
    mod = cuda_module()
    if mod is None:
        raise ExtensionNotBuilt("cuda", [f"fastdiff._C_cuda did not load: {cuda_error()}", _runtime_versions()],
                                _REBUILD)
    return mod
