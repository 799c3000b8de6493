"""``python -m fastdiff.export MODEL --format triton --out DIR``: a Triton Inference Server model repository.

    DIR/fastdiff_unet/config.pbtxt      the exported network for Triton's onnxruntime backend (platform
    DIR/fastdiff_unet/1/model.onnx        onnxruntime_onnx; its batch is a dimension of the graph: max_batch_size 0)
    DIR/fastdiff/config.pbtxt           a Python-backend model with dynamic batching that runs fastdiff's sampling
    DIR/fastdiff/1/model.py               loop around that network (fastdiff.serve.triton_python_model), with the
                                          request contract of ``python -m fastdiff serve`` (fastdiff.serve.model)

The Python model reads ``../fastdiff_unet/1/model.onnx`` itself, through fastdiff's onnxruntime backend in its own
process (one network call per step, no round trip through the server); ``fastdiff_unet`` serves the raw network to
clients that want it. Label-conditioned models only (a text pipeline is several networks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastdiff._atomic import atomic_write_text, check_writable
from fastdiff.errors import InvalidInput
from fastdiff.export.report import ExportReport

NETWORK_MODEL, SAMPLER_MODEL = "fastdiff_unet", "fastdiff"
#: ONNX TensorProto element type -> Triton data type (the ones an exported UNet uses, and their neighbours).
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 7: "TYPE_INT64",
                  6: "TYPE_INT32", 9: "TYPE_BOOL", 2: "TYPE_UINT8"}
NUMPY_TO_TRITON = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "uint8": "TYPE_UINT8",
                   "bytes": "TYPE_STRING"}


def _tensor_text(name: str, data_type: str, dims, optional: bool = False) -> str:
    dims_text = ", ".join(str(int(d)) for d in dims)
    return (f'  {{ name: "{name}" data_type: {data_type} dims: [ {dims_text} ]'
            + (" optional: true" if optional else "") + " }")


def network_config(onnx_path: Path, name: str = NETWORK_MODEL) -> str:
    """``config.pbtxt`` of the exported network for the onnxruntime backend: its inputs and outputs as the ONNX
    graph declares them (symbolic dimensions are -1)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}

    def spec(v) -> str:
        t = v.type.tensor_type
        if t.elem_type not in ONNX_TO_TRITON:
            raise InvalidInput(f"{onnx_path}: tensor {v.name!r} has ONNX element type {t.elem_type}, which this "
                               "exporter does not map to a Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return _tensor_text(v.name, ONNX_TO_TRITON[t.elem_type], dims)

    inputs = ",\n".join(spec(v) for v in graph.input if v.name not in weights)
    outputs = ",\n".join(spec(v) for v in graph.output)
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            "instance_group [ { kind: KIND_CPU count: 1 } ]\n")


def sampler_config(served, network: str, max_batch: int, max_queue_delay_us: int, parameters: dict[str, str],
                   name: str = SAMPLER_MODEL) -> str:
    """``config.pbtxt`` of the Python-backend sampling model (the contract of :class:`ServedModel`)."""
    def triton_type(dtype) -> str:
        return NUMPY_TO_TRITON["bytes" if dtype is bytes else np.dtype(dtype).name]

    inputs = ",\n".join(_tensor_text(t.name, triton_type(t.dtype), t.shape, t.optional) for t in served.inputs())
    outputs = ",\n".join(_tensor_text(t.name, triton_type(t.dtype), t.shape) for t in served.outputs())
    params = {"network": network, **{k: v for k, v in parameters.items() if v not in (None, "")}}
    params_text = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {int(max_batch)}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}\n"
            "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + params_text + "\n")


def export_triton(model: Any, out_dir: str | Path, *, max_batch: int = 16, max_queue_delay_us: int = 2000,
                  scheduler: str | None = None, steps: int | None = None, guidance: float | None = None,
                  **onnx_options) -> ExportReport:
    """Write the model repository of the module docstring; returns the ONNX export's report with the repository's
    files added. ``onnx_options`` are :func:`fastdiff.export.api.export_onnx`'s (profile, batch, parity, ...)."""
    from fastdiff._checks import check_int
    from fastdiff.export.api import export_onnx
    from fastdiff.serve.model import MAX_STEPS, ServedModel, is_pipeline_dir

    if is_pipeline_dir(model):
        raise InvalidInput("--format triton exports label-conditioned models (embedded names, model folders); a "
                           "text pipeline is several networks -- serve it with python -m fastdiff serve instead")
    check_int("max_batch", max_batch, 1, 4096)
    check_int("max_queue_delay_us", max_queue_delay_us, 0, 10_000_000)
    if steps is not None:
        check_int("steps", steps, 1, MAX_STEPS)
    out_dir = check_writable(out_dir, "dir", what="the output folder")
    if onnx_options.get("sampler"):
        raise InvalidInput("--format triton exports the network; the sampling loop runs in the Python model "
                           "(drop --sampler)")
    version_dir = out_dir / NETWORK_MODEL / "1"
    report = export_onnx(model, version_dir, **onnx_options)
    onnx_path = version_dir / "model.onnx"
    report.format = "triton"
    # The Python model's contract (inputs, image shape) comes from the exported file itself, as Triton will load it.
    served = ServedModel(onnx_path, scheduler=scheduler, steps=steps, guidance=guidance, device="cpu")
    network = f"../{NETWORK_MODEL}/1/model.onnx"  # relative to the Python model's folder
    files = {
        out_dir / NETWORK_MODEL / "config.pbtxt": network_config(onnx_path),
        out_dir / SAMPLER_MODEL / "config.pbtxt": sampler_config(
            served, network, max_batch, max_queue_delay_us,
            {"scheduler": scheduler or "", "steps": str(steps) if steps else "",
             "guidance": repr(float(guidance)) if guidance is not None else "", "backend": "onnxruntime"}),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        report.add_file(path)
    model_py = out_dir / SAMPLER_MODEL / "1" / "model.py"
    model_py.parent.mkdir(parents=True, exist_ok=True)
    template = Path(__file__).resolve().parent.parent / "serve" / "triton_python_model.py"
    atomic_write_text(model_py, template.read_text())
    report.add_file(model_py)
    report.notes.append(f"Triton model repository: {SAMPLER_MODEL} (Python backend, dynamic batching up to "
                        f"{max_batch}) runs the sampling loop around {NETWORK_MODEL} (onnxruntime); serve it with "
                        f"tritonserver --model-repository {out_dir}")
    return report
