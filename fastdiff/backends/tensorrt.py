"""The ``tensorrt`` model backend: the UNet call runs in a TensorRT engine on torch's current CUDA stream.

    runner = TensorRTRunner("out/model.engine")           # written by python -m fastdiff.export ... --format tensorrt
    runner = TensorRTRunner.from_onnx("out/model.onnx")    # engine from the cache, or built and cached
    fastdiff.sample(model, backend="tensorrt")             # a torch model: ONNX + engine built on the fly, cached

Inputs are checked against the engine's optimization profile before the call (a size outside it raises
:class:`~fastdiff.errors.InvalidInput` naming the dimension and the range); tensors are bound by address
(``set_tensor_address``) and the engine is enqueued with ``execute_async_v3`` on torch's stream: no copies, no
host sync. Written against the TensorRT 10 Python API; see docs/export.md for what was verified where.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.backends.base import ModelRunner
from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.export import tensorrt as ftrt


def tensorrt_reasons(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Why the tensorrt backend cannot run on ``device`` / ``dtype`` (empty: it can)."""
    reasons = []
    try:
        ftrt.import_trt()
    except BackendUnavailable as e:
        reasons += e.reasons
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        reasons.append(f"TensorRT runs on CUDA devices; the model is on {dev}")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible to torch")
    if dtype is not None and dtype not in (torch.float32, torch.float16):
        reasons.append(f"dtype {dtype} is not supported (float32, float16)")
    return reasons


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise InvalidInput(f"engine tensor type {dt} is not supported by fastdiff's TensorRT runner")
    return table[dt]


class TensorRTRunner(ModelRunner):
    """A :class:`ModelRunner` over a TensorRT engine file (fastdiff container or a bare plan)."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
        from fastdiff.backends.onnxruntime import GraphInfo, LabelTable

        reasons = tensorrt_reasons(device)
        if reasons:
            raise BackendUnavailable("tensorrt", reasons)
        trt = ftrt.import_trt()
        self.trt = trt
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        meta, plan = ftrt.load_engine_file(self.path, str(trt.__version__), ftrt.gpu_identity(self.device))
        self.meta = meta
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise ftrt.EngineCorrupt(f"TensorRT could not deserialize {self.path} (corrupt, or built with another "
                                         "TensorRT version / GPU; see TensorRT's log). Rebuild it: python -m "
                                         "fastdiff.export MODEL.onnx --format tensorrt --out DIR")
            self.context = self.engine.create_execution_context()
        self._io()
        self.info = GraphInfo.from_metadata(meta.graph_metadata) if meta and meta.graph_metadata else None
        self.kind = self.info.kind if self.info else "unet"
        sample = self.inputs.get("sample") or self.inputs.get("noise")
        if sample is None:
            raise InvalidInput(f"{self.path} has neither a 'sample' nor a 'noise' input (inputs: "
                               f"{sorted(self.inputs)}); it is not a fastdiff UNet or sampler engine")
        self.dtype = sample[0]
        if dtype is not None and dtype != self.dtype:
            raise InvalidInput(f"{self.path.name} takes {self.dtype} samples, dtype={dtype} was asked for")
        facts = self.info.facts if self.info else {}
        shape = sample[1][0]
        self.in_channels = int(facts.get("in_channels") or shape[1])
        self.out_channels = int(facts.get("out_channels") or self.in_channels)
        self.sample_size = facts.get("sample_size")
        self.cross_attention_dim = facts.get("cross_attention_dim") or (
            self.inputs["encoder_hidden_states"][1][0][-1] if "encoder_hidden_states" in self.inputs else None)
        self.needs_class_labels = "class_labels" in self.inputs
        self.scheduler_config = (self.info.scheduler or None) if self.info else None
        self.label_model = None
        if self.info and self.info.labels:
            self.label_model = LabelTable(self.info.labels, self.device, self.dtype, self.info.scheduler,
                                          self.info.model)

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

    @classmethod
    def from_onnx(cls, onnx_path: str | os.PathLike, device=None, profile=None, cache_dir=None,
                  progress: bool = True, **requests) -> TensorRTRunner:
        """The engine of an exported ONNX file (from the cache, or built and cached) for ``profile`` (default: the
        profile stored in the file) narrowed by ``requests`` (``batch="1:2:4"``...)."""
        from fastdiff.export.api import export_tensorrt

        out = Path(cache_dir) if cache_dir else Path(onnx_path).parent
        report = export_tensorrt(onnx_path, out, profile=profile, cache_dir=cache_dir, parity=False,
                                 progress=progress, **requests)
        return cls(report.files[-1][0], device=device)

    @classmethod
    def from_torch(cls, unet: torch.nn.Module, device=None, dtype: torch.dtype | None = None, profile=None,
                   cache_dir=None, progress: bool = True, **requests) -> TensorRTRunner:
        """Export ``unet`` to ONNX (cached), then build (or reuse) its engine for ``profile`` (default: the model
        family's profile, or one derived from its config)."""
        from fastdiff.backends.registry import cached_onnx_export
        from fastdiff.export.api import export_tensorrt, resolve_profile
        from fastdiff.export.source import unet_facts

        onnx_path = cached_onnx_export(unet, torch.float32, cache_dir, progress)
        facts = unet_facts(unet)
        prof = resolve_profile(facts, profile, precision="fp16" if dtype == torch.float16 else None, **requests)
        report = export_tensorrt(onnx_path, onnx_path.parent, profile=prof, cache_dir=cache_dir, parity=False,
                                 progress=progress)
        return cls(report.files[-1][0], device=device)

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

    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **model_kwargs):
        if self.kind != "unet":
            raise InvalidInput(f"{self.path.name} is a whole-{self.kind} engine, not a UNet call; run it with "
                               "TensorRTRunner(path).run({'noise': ..., 'class_labels': ...})")
        feeds = {"sample": sample, "timestep": torch.as_tensor(timestep, device=sample.device).float()
                 .expand(sample.shape[0])}
        if encoder_hidden_states is not None:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        if class_labels is not None:
            feeds["class_labels"] = class_labels
        feeds.update(model_kwargs.pop("added_cond_kwargs", None) or {})
        feeds.update(model_kwargs)
        unknown = set(feeds) - set(self.inputs)
        if unknown:
            raise InvalidInput(f"engine {self.path.name} has no inputs for {sorted(unknown)}; its inputs are "
                               f"{sorted(self.inputs)}")
        return self.run(feeds)

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


def engine_parity(engine_path: Path, onnx_path: Path, profile, tol: float | None = None) -> list:
    """TensorRT against onnxruntime (same ONNX, CPU) on random inputs at the profile's opt point."""
    from fastdiff.backends.onnxruntime import make_session, read_graph_info
    from fastdiff.export.onnx import PARITY_TOL
    from fastdiff.export.report import ParityResult
    from fastdiff.export.signature import example_sizes, random_inputs

    tol = PARITY_TOL[profile.precision] if tol is None else tol
    sess = make_session(onnx_path, torch.device("cpu"))
    info = read_graph_info(sess)
    sizes = example_sizes(profile.dims, "opt")
    args = random_inputs(info.inputs, sizes, torch.Generator().manual_seed(0))
    feeds = {s.name: a.numpy() for s, a in zip(info.inputs, args, strict=True)}
    ref = torch.from_numpy(sess.run(None, feeds)[0]).double()
    runner = TensorRTRunner(engine_path)
    got = runner.run({s.name: a.to(runner.device) for s, a in zip(info.inputs, args, strict=True)})
    torch.cuda.synchronize(runner.device)
    err = (got.double().cpu() - ref).abs()
    max_abs = float(err.max())
    max_rel = max_abs / max(float(ref.abs().max()), 1e-30)
    return [ParityResult("trt", {k: v for k, v in sizes.items() if not profile.dims[k].static}, max_abs, max_rel,
                         tol, max_rel <= tol)]
