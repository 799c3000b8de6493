"""benches/gpu_run.sh refuses to start, loudly and quickly, when a prerequisite of a GPU run is missing (nvcc, a
working nvidia-smi, setuptools / pybind11 for the build, torch seeing CUDA), instead of building without the CUDA
module and letting every compiled-module test skip. Each case runs the script with a PATH that holds only what
the case provides, from a scratch folder, and checks that it stopped before writing anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "gpu_run.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run_script(tmp_path: Path, tools: dict[str, str], writes: bool = False) -> subprocess.CompletedProcess:
    """gpu_run.sh with PATH = a folder of the basic commands it needs, python3 (this interpreter, unless ``tools``
    fakes it) and ``tools`` (name -> shell body of a fake). Unless ``writes``, the artefact folder $OUT must not be
    created: nothing ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("mktemp", "mkdir", "ls", "tee", "tail", "date", "tar"):
        found = shutil.which(name)
        if found:
            (bin_dir / name).symlink_to(found)
    fake_tool(bin_dir, "python3", f'exec "{sys.executable}" "$@"')  # not a symlink: a venv must stay a venv
    for name, body in tools.items():
        fake_tool(bin_dir, name, body)
    out = tmp_path / "out"
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "OUT": str(out)}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    start = time.monotonic()
    res = subprocess.run([BASH, str(SCRIPT), "tests"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    res.seconds = time.monotonic() - start
    assert writes or not out.exists(), f"the script went past its checks:\n{res.stdout}\n{res.stderr}"
    return res


def test_no_nvcc_and_no_driver(tmp_path):
    res = run_script(tmp_path, {})
    assert res.returncode != 0
    assert "gpu_run.sh: cannot run: missing prerequisites" in res.stderr
    assert "nvcc is not on PATH" in res.stderr
    assert "nvidia-smi is not on PATH" in res.stderr
    assert res.seconds < 10  # tool checks only: no Python, no build


def test_nvidia_smi_that_fails(tmp_path):
    res = run_script(tmp_path, {
        "nvcc": "echo 'Cuda compilation tools, release 12.8'",
        "nvidia-smi": "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
    })
    assert res.returncode != 0
    assert "nvidia-smi -L failed: NVIDIA-SMI has failed" in res.stderr
    assert "nvcc" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: this checks the CPU-only torch message")
def test_torch_without_cuda(tmp_path):
    res = run_script(tmp_path, {
        "nvcc": "echo 'Cuda compilation tools, release 12.8'",
        "nvidia-smi": "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'",
    })
    assert res.returncode != 0
    assert "gpu_run.sh: cannot run: missing prerequisites" in res.stderr
    assert f"torch {torch.__version__} sees no CUDA device" in res.stderr


# A python3 that passes the prerequisite check and "builds" without producing fastdiff._C_cuda.
PYTHON_WITHOUT_CUDA_MODULE = """case "$1" in
  -) while read -r _; do :; done ;;
  -c) case "$2" in *_C_cuda*) echo "ModuleNotFoundError: No module named 'fastdiff._C_cuda'" >&2; exit 1 ;; esac ;;
  -m) [ "$2" = fastdiff ] && echo "fastdiff info: _C_cuda not built" ;;
esac
exit 0"""


def test_build_without_the_cuda_module_stops(tmp_path):
    res = run_script(tmp_path, {
        "nvcc": "echo 'Cuda compilation tools, release 12.8'",
        "nvidia-smi": "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'",
        "python3": PYTHON_WITHOUT_CUDA_MODULE,
    }, writes=True)
    assert res.returncode != 0
    assert "gpu_run.sh: cannot run: fastdiff._C_cuda does not load after the build" in res.stderr
    assert "No module named 'fastdiff._C_cuda'" in res.stderr
    assert "fastdiff info: _C_cuda not built" in res.stdout  # `python3 -m fastdiff info` was shown
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_run-build-failed.tar.gz"]  # no tests ran
