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

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdiff.backends.base import ModelRunner
from fastdiff.errors import BackendUnavailable, InvalidInput, ModelNotFound
from fastdiff.export.profiles import DimRange
from fastdiff.export.signature import TensorSpec

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


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


class LabelTable:
    """``encode_labels`` of a LabelConditionedUNet, rebuilt from the embedding table stored in an exported file's
    metadata (the sampler uses it when it is given a file instead of the torch model)."""

    def __init__(self, meta: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 scheduler_config: dict | None = None, name: str = ""):
        self.num_classes = int(meta["num_classes"])
        self.null_label = int(meta["null_label"])
        self.tokens = int(meta["tokens"])
        self.embed_dim = int(meta["embed_dim"])
        raw = np.frombuffer(base64.b64decode(meta["data"]), dtype=np.float32).reshape(meta["shape"])
        self.weight = torch.from_numpy(raw.copy()).to(device)
        self.dtype = dtype
        self.scheduler_config = dict(scheduler_config or {})
        self.name = name

    def encode_labels(self, labels) -> torch.Tensor:
        """(B,) integer labels (``null_label`` for the unconditional embedding) -> (B, tokens, D) float32."""
        labels = torch.as_tensor(labels, device=self.weight.device).long().reshape(-1)
        if labels.numel() and not bool(((labels >= 0) & (labels <= self.null_label)).all()):
            raise InvalidInput(f"class labels must be integers in [0, {self.num_classes - 1}] (or {self.null_label} "
                               f"for the null label), got {labels.tolist()}")
        return self.weight.index_select(0, labels).view(labels.shape[0], self.tokens, self.embed_dim)


@dataclass
class GraphInfo:
    """The fastdiff metadata of an exported file (or what can be read off a foreign ONNX file's signature)."""

    kind: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    labels: dict | None = None
    sampler: dict | None = None
    profile: dict = field(default_factory=dict)
    model: str = ""
    latent_scale: int = 1

    @classmethod
    def from_metadata(cls, meta: dict[str, str], session=None) -> GraphInfo:
        if "fastdiff.inputs" not in meta:
            if session is None:
                raise InvalidInput("the file has no fastdiff metadata and no session to read its signature from")
            return cls._from_signature(session)
        j = {k: json.loads(v) for k, v in meta.items() if k.startswith("fastdiff.") and k not in (
            "fastdiff.format", "fastdiff.kind", "fastdiff.model", "fastdiff.family", "fastdiff.precision")}
        profile = j.get("fastdiff.profile", {})
        return cls(kind=meta.get("fastdiff.kind", "unet"),
                   inputs=[TensorSpec.from_dict(d) for d in j["fastdiff.inputs"]],
                   outputs=[TensorSpec.from_dict(d) for d in j["fastdiff.outputs"]],
                   dims={k: DimRange(k, *v) for k, v in j.get("fastdiff.dims", {}).items()},
                   facts=j.get("fastdiff.model_config", {}), scheduler=j.get("fastdiff.scheduler", {}),
                   defaults=j.get("fastdiff.defaults", {}), labels=j.get("fastdiff.labels"),
                   sampler=j.get("fastdiff.sampler"), profile=profile, model=meta.get("fastdiff.model", ""),
                   latent_scale=int(profile.get("latent_scale", 1)))

    @classmethod
    def _from_signature(cls, session) -> GraphInfo:
        def spec(a) -> TensorSpec:
            dtype = _ORT_TYPES.get(a.type)
            if dtype is None:
                raise InvalidInput(f"input {a.name!r} has type {a.type}, which fastdiff does not bind")
            return TensorSpec(a.name, dtype, tuple(d if isinstance(d, int) else str(d) for d in a.shape))

        inputs = [spec(a) for a in session.get_inputs()]
        outputs = [spec(a) for a in session.get_outputs()]
        names = {s.name: s for s in inputs}
        if "sample" not in names or "timestep" not in names:
            raise InvalidInput("this ONNX file has no fastdiff metadata and no 'sample' / 'timestep' inputs; export "
                               "it with python -m fastdiff.export, or name the UNet inputs sample, timestep, "
                               "encoder_hidden_states")
        s = names["sample"].dims
        ehs = names.get("encoder_hidden_states")
        facts = {"in_channels": s[1] if isinstance(s[1], int) else None,
                 "out_channels": outputs[0].dims[1] if isinstance(outputs[0].dims[1], int) else None,
                 "cross_attention_dim": ehs.dims[-1] if ehs is not None and isinstance(ehs.dims[-1], int) else None,
                 "class_embeddings": "class_labels" in names}
        return cls(kind="unet", inputs=inputs, outputs=outputs, facts=facts)


def read_graph_info(session) -> GraphInfo:
    return GraphInfo.from_metadata(dict(session.get_modelmeta().custom_metadata_map), session)


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
        from fastdiff.backends.registry import cached_onnx_export

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
