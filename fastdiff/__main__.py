"""``python -m fastdiff``: ``info`` (versions, devices, backends), ``sample`` (the main job), ``eval``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

_SUBCOMMANDS = {"sample": "fastdiff.cli_sample", "eval": "fastdiff.cli_eval"}


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


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
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"  {dev:7s} {name:7s} {state}")
    print("model-op kernels (fastdiff.optimize: attention, GroupNorm+SiLU, GEGLU; 'auto' = triton on CUDA):")
    for dev in devices:
        for kernel in (b for b in registry.MODEL_OP_BACKENDS if b != "torch"):  # the reference always runs
            ops = ", ".join(op for op in registry.MODEL_OPS if (op, kernel) in registry.TABLE)
            reasons = registry.environment_reasons(kernel, torch.device(dev))
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"  {dev:7s} {kernel:7s} [{ops}] {state}")
    print("model backends:")
    print("  torch        available")
    try:
        from fastdiff.backends.registry import model_backend_reasons

        for name, reasons in model_backend_reasons().items():
            print(f"  {name:12s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    except ImportError:
        print("  onnxruntime / tensorrt: runners not in this build")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices and which backends can run, with reasons")
    runners = {}
    for name, module in _SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            sub.add_parser(name, help=f"(unavailable: {e})")
            continue
        mod.add_parser(sub)
        runners[name] = mod.run
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command not in runners:
        parser.error(f"the {args.command!r} command is not available in this install")
    from fastdiff.errors import FastDiffError

    try:
        return runners[args.command](args)
    except FastDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
