"""Sessions over exported files, shared by the model runners and the exporter's parity checks.

:func:`make_session` opens an ONNX file in onnxruntime with the settings every reader uses (all graph
optimizations, torch's thread count, the CUDA execution provider on torch's current stream), and
:func:`onnxruntime_reasons` says why it cannot on a device. :class:`EngineSession` deserializes a TensorRT engine
file and runs it on torch's current stream. Both work on torch tensors and know nothing of the sampler: the runners
in :mod:`fastdiff.backends` add the model interface on top.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.exported.engine import EngineCorrupt, gpu_identity, import_trt, load_engine_file
from fastdiff.exported.metadata import GraphInfo


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable("onnxruntime", [f"the onnxruntime package is not importable ({e})"],
                                 hint="pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)") from e
    return ort


def onnxruntime_reasons(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Why the onnxruntime backend cannot run on ``device`` / ``dtype`` (empty: it can)."""
    try:
        ort = import_ort()
    except BackendUnavailable as e:
        return e.reasons
    reasons = []
    dev = torch.device(device or "cpu")
    providers = ort.get_available_providers()
    if dev.type == "cuda" and "CUDAExecutionProvider" not in providers:
        reasons.append(f"device {dev} needs onnxruntime's CUDAExecutionProvider (install onnxruntime-gpu); this "
                       f"onnxruntime has {', '.join(providers)}")
    elif dev.type not in ("cpu", "cuda"):
        reasons.append(f"device type {dev.type!r} is not supported (cpu, cuda)")
    if dtype is not None and dtype not in (torch.float32, torch.float16):
        reasons.append(f"dtype {dtype} is not supported (float32, float16)")
    return reasons


def _providers(ort, device: torch.device, providers: list | None) -> list:
    if providers is not None:
        return providers
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    # ORT's kernels go on torch's current stream: ordered with the fused step, no sync between them
    cuda = {"device_id": index, "user_compute_stream": str(torch.cuda.current_stream(index).cuda_stream)}
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def make_session(path: str | os.PathLike, device: torch.device, providers: list | None = None,
                 threads: int | None = None):
    """An ``InferenceSession`` for ``path`` on ``device`` (CPU EP, or CUDA EP on torch's stream), with all graph
    optimizations and ``threads`` intra-op threads (default: torch's thread count, so comparisons are fair)."""
    ort = import_ort()
    reasons = onnxruntime_reasons(device)
    if reasons:
        raise BackendUnavailable("onnxruntime", reasons)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=_providers(ort, device, providers))
    except Exception as e:  # onnxruntime raises its own exception types
        raise InvalidInput(f"onnxruntime cannot load {str(path)!r}: {type(e).__name__}: {e}") from e



def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise InvalidInput(f"engine tensor type {dt} is not supported by fastdiff's TensorRT runner")
    return table[dt]


class EngineSession:
    """A TensorRT engine file (fastdiff container or a bare plan) deserialized on one CUDA device, with its
    optimization profile's shapes and the graph metadata from its header, run on torch's current stream.

    Inputs are checked against the optimization profile before the call (a size outside it raises
    :class:`~fastdiff.errors.InvalidInput` naming the dimension and the range); tensors are bound by address
    (``set_tensor_address``) and the engine is enqueued with ``execute_async_v3``: no copies, no host sync."""

    def __init__(self, path: str | os.PathLike, device=None):
        trt = import_trt()
        self.trt = trt
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        meta, plan = load_engine_file(self.path, str(trt.__version__), gpu_identity(self.device))
        self.meta = meta
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise EngineCorrupt(f"TensorRT could not deserialize {self.path} (corrupt, or built with another "
                                    "TensorRT version / GPU; see TensorRT's log). Rebuild it: python -m "
                                    "fastdiff.export MODEL.onnx --format tensorrt --out DIR")
            self.context = self.engine.create_execution_context()
        self._io()
        self.info = GraphInfo.from_metadata(meta.graph_metadata) if meta and meta.graph_metadata else None

    def _io(self) -> None:
        """Input name -> (dtype, [min, opt, max] shapes of profile 0); output names -> dtype."""
        trt, eng = self.trt, self.engine
        self.inputs: dict[str, tuple[torch.dtype, list[tuple[int, ...]]]] = {}
        self.outputs: dict[str, torch.dtype] = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            dt = _torch_dtype(trt, eng.get_tensor_dtype(name))
            if eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shapes = [tuple(s) for s in eng.get_tensor_profile_shape(name, 0)]
                self.inputs[name] = (dt, shapes)
            else:
                self.outputs[name] = dt

    def _check(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, (_dt, (lo, _, hi)) in self.inputs.items():
            t = feeds.get(name)
            if t is None:
                raise InvalidInput(f"TensorRT engine {self.path.name}: input {name!r} is required")
            if t.device != self.device:
                raise InvalidInput(f"input {name!r} is on {t.device}; the engine runs on {self.device}")
            if t.dim() != len(lo):
                raise InvalidInput(f"input {name!r} must have {len(lo)} dimensions, got shape {tuple(t.shape)}")
            for axis, (n, a, b) in enumerate(zip(t.shape, lo, hi, strict=True)):
                if not a <= n <= b:
                    dim = self._dim_name(name, axis)
                    raise InvalidInput(f"TensorRT engine {self.path.name}: {dim}={n} (input {name!r}, axis {axis}) is "
                                       f"outside the engine's optimization profile range [{a}, {b}]; rebuild the "
                                       "engine with a profile that covers it (--batch / --height / --width)")

    def _dim_name(self, name: str, axis: int) -> str:
        if self.info:
            for s in self.info.inputs:
                if s.name == name and isinstance(s.dims[axis], str):
                    return s.dims[axis]
        return f"dim{axis}"

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Enqueue the engine on torch's current stream; returns the (first) output as a new torch tensor."""
        self._check(feeds)
        # Every tensor here is allocated and used on torch's current stream, so the caching allocator cannot hand
        # their memory to anything that runs before the engine is done with it: no record_stream needed.
        bound = []
        for name, (dt, _) in self.inputs.items():
            t = feeds[name].to(dt).contiguous()
            bound.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name, dt in self.outputs.items():
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dt, device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.path.name} (see TensorRT's log)")
        return next(iter(outs.values()))
