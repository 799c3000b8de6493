"""``python -m fastdiff info``: versions, devices, and which step / model-op / model backends can run here, with the
reasons when one cannot."""

from __future__ import annotations

import argparse
import platform


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def tensorrt_extra(cuda_version: str | None) -> str:
    """The pyproject extra whose TensorRT wheels match a torch built for ``cuda_version`` ("13.0", "12.8", None)."""
    major = (cuda_version or "").split(".")[0]
    return "tensorrt-cu12" if major == "12" else "tensorrt"


def install_hint(backend: str, reasons: list[str], cuda_version: str | None) -> str:
    """What to install (or rebuild) so that ``backend`` can run, from why it cannot; empty when installing does not
    help (e.g. a CUDA kernel asked about the CPU, or a GPU that is too old)."""
    text = " ".join(reasons)
    if backend == "triton" and "does not import" in text:
        return "pip install 'fastdiff[gpu]'"
    if backend == "onnxruntime" and "not importable" in text:
        return "pip install 'fastdiff[export]' (CPU) or 'fastdiff[gpu]' (CUDA provider)"
    if backend == "onnxruntime" and "CUDAExecutionProvider" in text:
        return "pip uninstall onnxruntime && pip install 'fastdiff[gpu]'"
    if backend == "tensorrt" and "not importable" in text:
        return f"pip install 'fastdiff[{tensorrt_extra(cuda_version)}]' (on a machine with an NVIDIA GPU)"
    if backend in ("cpp", "cuda") and "extension is not built" in text:
        build = "FASTDIFF_CUDA=1 pip install -e . (with nvcc on PATH)" if backend == "cuda" else "pip install -e ."
        return f"rebuild the compiled module: {build}"
    return ""


def _state(backend: str, reasons: list[str], cuda_version: str | None) -> str:
    if not reasons:
        return "available"
    hint = install_hint(backend, reasons, cuda_version)
    return "unavailable: " + "; ".join(reasons) + (f" -> {hint}" if hint else "")


def info() -> int:
    import torch

    import fastdiff
    from fastdiff import _ext
    from fastdiff.ops import registry

    print(f"fastdiff {fastdiff.__version__}  python {platform.python_version()}  {platform.platform()}")
    for pkg in ("torch", "triton", "diffusers", "numpy", "onnx", "onnxruntime", "tensorrt"):
        print(f"  {pkg:12s} {_version(pkg)}")
    print(f"  torch CUDA   {torch.version.cuda or 'none (CPU build)'}")
    print(f"compiled modules: C++ (cpp) {'loaded' if _ext.cpu_available() else 'missing: ' + str(_ext.cpu_error())}")
    print(f"                  CUDA      {'loaded' if _ext.cuda_available() else 'missing: ' + str(_ext.cuda_error())}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"device cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
            devices.append(f"cuda:{i}")
    else:
        print("device: no CUDA GPU visible")
    # From the one op registry: op x backend x device. A backend's environment reasons are the same for every op.
    print("step backends (fused scheduler step + CFG):")
    for dev in devices:
        for name, reasons in registry.availability(dev).items():
            print(f"  {dev:7s} {name:10s} {_state(name, reasons, torch.version.cuda)}")
    print("model-op kernels (fastdiff.optimize: attention, GroupNorm+SiLU, GEGLU; 'auto' = triton on CUDA):")
    for dev in devices:
        for kernel in (b for b in registry.MODEL_OP_BACKENDS if b != "torch"):  # the reference always runs
            ops = ", ".join(op for op in registry.MODEL_OPS if (op, kernel) in registry.TABLE)
            reasons = registry.environment_reasons(kernel, torch.device(dev))
            print(f"  {dev:7s} {kernel:10s} [{ops}] {_state(kernel, reasons, torch.version.cuda)}")
    print("model backends:")
    print("  torch        available")
    from fastdiff.backends.registry import model_backend_reasons

    for name, reasons in model_backend_reasons().items():
        print(f"  {name:12s} {_state(name, reasons, torch.version.cuda)}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``info`` subcommand."""
    return subparsers.add_parser("info", help="print versions, devices and which backends can run, with reasons",
                                 description=__doc__)


def run(args: argparse.Namespace) -> int:
    return info()
