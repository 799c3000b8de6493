"""The ``onnxruntime`` model backend: the UNet call runs in an onnxruntime session, the fused step stays ours.

    runner = OnnxRunner("out/model.onnx")                  # a file written by python -m fastdiff.export
    runner = OnnxRunner.from_torch(unet)                    # exported on the fly into the cache, then loaded
    fastdiff.sample(model, backend="onnxruntime")           # what the sampler does with a torch model

Inputs and outputs are bound to torch tensors' memory with IO binding (no copies; on a GPU the CUDA execution
provider runs on torch's current stream, so the loop stays free of host syncs). CPU runs the CPU execution
provider; CUDA (and, when asked for, TensorRT) execution providers are used where ``onnxruntime-gpu`` provides them.

Label-conditioned models: the exported graph takes ``encoder_hidden_states``; the label embedding table travels in
the file's metadata and :attr:`OnnxRunner.label_model` re-creates ``encode_labels`` from it, so a file alone can
sample labels. :class:`OnnxSampler` runs whole-sampler graphs (``--sampler``) in one call.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.backends.base import ModelRunner
from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.exported.metadata import LabelTable, read_graph_info
from fastdiff.exported.session import import_ort, make_session
from fastdiff.exported.specs import DimRange


def _relaxed(dims: dict[str, DimRange]) -> dict[str, DimRange]:
    """onnxruntime runs any size of a dynamic axis: check static sizes and divisibility, not the export range."""
    big = 1 << 30
    return {k: v if v.static else DimRange(k, v.multiple, v.multiple, big // v.multiple * v.multiple, v.multiple)
            for k, v in dims.items()}


class _Bound:
    """IO binding of torch tensors to a session (shared by :class:`OnnxRunner` and :class:`OnnxSampler`)."""

    def __init__(self, path: str | os.PathLike, device=None, providers: list | None = None,
                 threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise ModelNotFound(f"no ONNX file at {str(path)!r}; export one with python -m fastdiff.export")
        self.path = path
        self.device = torch.device(device or "cpu")
        self.session = make_session(path, self.device, providers, threads)
        self.info = read_graph_info(self.session)
        self._dims = _relaxed(self.info.dims)
        self._run_options = None
        if self.device.type == "cuda":
            ort = import_ort()
            self._run_options = ort.RunOptions()
            # results stay on torch's stream; nothing waits on the host
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def run(self, feeds: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        sizes: dict[str, int] = {}
        io = self.session.io_binding()
        dev_type = self.device.type
        dev_id = (self.device.index or 0) if dev_type == "cuda" else 0
        keep = []
        for spec in self.info.inputs:
            t = feeds.get(spec.name)
            if t is None:
                raise InvalidInput(f"{where}: the graph needs input {spec.name!r} {spec.describe()}")
            if t.device != self.device:
                raise InvalidInput(f"{where}: input {spec.name!r} is on {t.device} but the session runs on "
                                   f"{self.device}; move it with .to()")
            spec.check(t, self._dims, sizes, where, self.info.latent_scale)
            t = t.to(spec.torch_dtype).contiguous()
            keep.append(t)
            io.bind_input(spec.name, dev_type, dev_id, spec.numpy_dtype, tuple(t.shape), t.data_ptr())
        out_spec = self.info.outputs[0]
        try:
            shape = out_spec.shape(sizes)
        except KeyError as e:
            raise InvalidInput(f"{where}: cannot size output {out_spec.name!r} {out_spec.describe()}") from e
        out = torch.empty(shape, dtype=out_spec.torch_dtype, device=self.device)
        io.bind_output(out_spec.name, dev_type, dev_id, out_spec.numpy_dtype, shape, out.data_ptr())
        self.session.run_with_iobinding(io, self._run_options)
        return out


class OnnxRunner(ModelRunner):
    """A :class:`ModelRunner` over an exported UNet graph (``model.onnx`` from ``python -m fastdiff.export``).

    ``dtype`` is the graph's sample dtype; inputs of another float dtype are cast, timesteps go in as float32.
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                 providers: list | None = None, threads: int | None = None):
        self._bound = _Bound(path, device, providers, threads)
        info = self._bound.info
        if info.kind != "unet":
            raise InvalidInput(f"{path} holds a whole {info.kind} graph (--sampler export), not a UNet call; run it "
                               "with fastdiff.backends.onnxruntime.OnnxSampler(path)(noise, ...)")
        self.path = self._bound.path
        self.info = info
        self.device = self._bound.device
        sample = next(s for s in info.inputs if s.name == "sample")
        self.dtype = sample.torch_dtype
        if dtype is not None and dtype != self.dtype:
            raise InvalidInput(f"{path} was exported in {self.dtype} but dtype={dtype} was asked for; re-export with "
                               f"--precision {'fp16' if dtype == torch.float16 else 'fp32'} or drop dtype")
        f = info.facts
        self.in_channels = int(f.get("in_channels") or sample.dims[1])
        self.out_channels = int(f.get("out_channels") or self.in_channels)
        self.sample_size = f.get("sample_size")
        self.cross_attention_dim = f.get("cross_attention_dim")
        self.needs_class_labels = bool(f.get("class_embeddings"))
        self.time_cond_proj_dim = f.get("time_cond_proj_dim")  # folded guidance: a timestep_cond input
        self.scheduler_config = info.scheduler or None
        self.label_model = None
        if info.labels:
            self.label_model = LabelTable(info.labels, self.device, self.dtype, info.scheduler, info.model)
        self._names = {s.name for s in info.inputs}

    @classmethod
    def from_torch(cls, unet: torch.nn.Module, device=None, dtype: torch.dtype | None = None,
                   cache_dir: str | os.PathLike | None = None, providers: list | None = None,
                   threads: int | None = None, progress: bool = True) -> OnnxRunner:
        """Export ``unet`` (a diffusers UNet or LabelConditionedUNet) to ONNX into the cache (keyed by its config,
        weights and the export settings; reused when present) and open it."""
        from fastdiff.export.cache import cached_onnx_export

        p = next(unet.parameters())
        dtype = dtype or p.dtype
        path = cached_onnx_export(unet, dtype, cache_dir, progress)
        return cls(path, device=device or p.device, providers=providers, threads=threads)

    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **model_kwargs):
        feeds = {"sample": sample,
                 "timestep": torch.as_tensor(timestep, device=sample.device).float().expand(sample.shape[0])}
        if encoder_hidden_states is not None:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        if class_labels is not None:
            feeds["class_labels"] = class_labels
        added = model_kwargs.pop("added_cond_kwargs", None) or {}
        feeds.update({k: v for k, v in added.items() if k in ("text_embeds", "time_ids")})
        if "timestep_cond" in model_kwargs:
            feeds["timestep_cond"] = model_kwargs.pop("timestep_cond")
        unknown = set(model_kwargs) | (set(feeds) - self._names)
        if unknown:
            raise InvalidInput(f"the ONNX graph {self.path.name} has no inputs for {sorted(unknown)}; its inputs are "
                               f"{sorted(self._names)} (re-export from a model that takes them)")
        return self._bound.run(feeds, f"onnxruntime model {self.path.name}")


class OnnxSampler:
    """Runs a whole-sampler graph (``python -m fastdiff.export MODEL --sampler onestep``): one call from noise and
    condition to the final sample (B, C, H, W), the same result as ``fastdiff.sample(..., output_type="latent")``
    with the same scheduler, steps, guidance and noise."""

    def __init__(self, path: str | os.PathLike, device=None, providers: list | None = None,
                 threads: int | None = None):
        self._bound = _Bound(path, device, providers, threads)
        self.info = self._bound.info
        if self.info.kind != "sampler":
            raise InvalidInput(f"{path} holds a UNet graph; sample with it via fastdiff.Sampler(model={str(path)!r})")
        self.device = self._bound.device
        self.spec = self.info.sampler or {}
        noise = self.info.inputs[0]
        self.dtype = noise.torch_dtype
        self.in_channels = int(noise.dims[1])
        self.sample_size = self.info.facts.get("sample_size")
        self._names = {s.name for s in self.info.inputs}

    def __call__(self, noise: torch.Tensor, class_labels=None, encoder_hidden_states: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, guidance_scale: float | None = None,
                 step_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``noise`` (B, C, H, W) unit variance; ``class_labels`` (B,) for label models or
        ``encoder_hidden_states`` (B, L, D) (+ negative, zeros by default); ``step_noise`` (K, B, C, H, W) for
        plans that draw noise (drawn from ``generator`` in the sampler's order when omitted)."""
        from diffusers.utils.torch_utils import randn_tensor

        feeds = {"noise": noise}
        if "class_labels" in self._names:
            if class_labels is None:
                raise InvalidInput("this sampler graph is label-conditioned: pass class_labels (B,)")
            feeds["class_labels"] = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        if "encoder_hidden_states" in self._names:
            if encoder_hidden_states is None:
                raise InvalidInput("this sampler graph needs encoder_hidden_states (B, L, D)")
            feeds["encoder_hidden_states"] = encoder_hidden_states
        if "negative_encoder_hidden_states" in self._names:
            feeds["negative_encoder_hidden_states"] = (negative_encoder_hidden_states
                                                       if negative_encoder_hidden_states is not None
                                                       else torch.zeros_like(encoder_hidden_states))
        if "guidance_scale" in self._names:
            g = self.spec.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
            feeds["guidance_scale"] = torch.tensor([float(g)], device=self.device)
        if "step_noise" in self._names:
            if step_noise is None:
                k = len(self.spec.get("noise_steps", []))
                step_noise = torch.stack([randn_tensor(tuple(noise.shape), generator=generator, device=noise.device,
                                                       dtype=noise.dtype) for _ in range(k)])
            feeds["step_noise"] = step_noise
        return self._bound.run(feeds, f"onnxruntime sampler {self._bound.path.name}")
