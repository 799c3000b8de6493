"""The ``tensorrt`` model backend: the UNet call runs in a TensorRT engine on torch's current CUDA stream.

    runner = TensorRTRunner("out/model.engine")           # written by python -m fastdiff.export ... --format tensorrt
    runner = TensorRTRunner.from_onnx("out/model.onnx")    # engine from the cache, or built and cached
    fastdiff.sample(model, backend="tensorrt")             # a torch model: ONNX + engine built on the fly, cached

The engine itself is loaded and run by :class:`fastdiff.exported.session.EngineSession`: inputs are checked against
the engine's optimization profile before the call (a size outside it raises :class:`~fastdiff.errors.InvalidInput`
naming the dimension and the range); tensors are bound by address (``set_tensor_address``) and the engine is
enqueued with ``execute_async_v3`` on torch's stream: no copies, no host sync. This runner maps the sampler's model
call onto the engine's inputs and rebuilds the label table from the header. Written against the TensorRT 10 Python
API; see docs/export.md for what was verified where.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.backends.base import ModelRunner
from fastdiff.errors import BackendUnavailable, InvalidInput
from fastdiff.exported.engine import import_trt
from fastdiff.exported.metadata import LabelTable
from fastdiff.exported.session import EngineSession


def tensorrt_reasons(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Why the tensorrt backend cannot run on ``device`` / ``dtype`` (empty: it can)."""
    reasons = []
    try:
        import_trt()
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


class TensorRTRunner(ModelRunner):
    """A :class:`ModelRunner` over a TensorRT engine file (fastdiff container or a bare plan)."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
        reasons = tensorrt_reasons(device)
        if reasons:
            raise BackendUnavailable("tensorrt", reasons)
        self.session = EngineSession(path, device)
        self.path, self.device, self.meta = self.session.path, self.session.device, self.session.meta
        self.inputs, self.outputs = self.session.inputs, self.session.outputs
        self.info = self.session.info
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
        self.time_cond_proj_dim = facts.get("time_cond_proj_dim")  # folded guidance: a timestep_cond input
        self.scheduler_config = (self.info.scheduler or None) if self.info else None
        self.label_model = None
        if self.info and self.info.labels:
            self.label_model = LabelTable(self.info.labels, self.device, self.dtype, self.info.scheduler,
                                          self.info.model)

    @classmethod
    def from_onnx(cls, onnx_path: str | os.PathLike, device=None, profile=None, cache_dir=None,
                  progress: bool = True, **requests) -> TensorRTRunner:
        """The engine of an exported ONNX file (from the cache, or built and cached) for ``profile`` (default: the
        profile stored in the file) narrowed by ``requests`` (``batch="1:2:4"``...)."""
        from fastdiff.export.cache import cached_engine

        out = Path(cache_dir) if cache_dir else Path(onnx_path).parent
        return cls(cached_engine(onnx_path, out, profile, cache_dir, progress, **requests), device=device)

    @classmethod
    def from_torch(cls, unet: torch.nn.Module, device=None, dtype: torch.dtype | None = None, profile=None,
                   cache_dir=None, progress: bool = True, **requests) -> TensorRTRunner:
        """Export ``unet`` to ONNX (cached), then build (or reuse) its engine for ``profile`` (default: the model
        family's profile, or one derived from its config)."""
        from fastdiff.export.cache import cached_torch_engine

        return cls(cached_torch_engine(unet, dtype, profile, cache_dir, progress, **requests), device=device)

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
        return self.session.run(feeds)
