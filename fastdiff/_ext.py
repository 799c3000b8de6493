"""Loads the compiled modules (``fastdiff._C_cpu``, ``fastdiff._C_cuda``) without ever failing ``import fastdiff``.

A missing or broken build is a flag (:func:`cpu_available`, :func:`cuda_available`) plus the reason
(:func:`cpu_error`), and :func:`require_cpu` / :func:`require_cuda` raise
:class:`~fastdiff.errors.ExtensionNotBuilt` naming the build and runtime versions.
"""

from __future__ import annotations

import importlib
from functools import cache

from fastdiff.errors import ExtensionNotBuilt

_REBUILD = "Rebuild with `pip install --no-build-isolation -v .` (needs a C++ compiler; nvcc for CUDA)."


@cache
def _load(name: str):
    try:
        return importlib.import_module(f"fastdiff.{name}"), None
    except Exception as e:  # noqa: BLE001 - any failure to load is reported, never raised at import time
        return None, f"{type(e).__name__}: {e}"


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


def require_cpu():
    mod = cpu_module()
    if mod is None:
        raise ExtensionNotBuilt("cpp", [f"fastdiff._C_cpu did not load: {cpu_error()}"], _REBUILD)
    return mod


def require_cuda():
    mod = cuda_module()
    if mod is None:
        raise ExtensionNotBuilt("cuda", [f"fastdiff._C_cuda did not load: {cuda_error()}"], _REBUILD)
    return mod
