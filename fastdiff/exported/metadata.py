"""The ``fastdiff.*`` metadata of an exported graph: what the exporter stores in an ONNX file's ``metadata_props``
(and, copied, in a TensorRT engine's header) and :class:`GraphInfo`, which reads it back.

Values are strings: the keys in :data:`PLAIN_KEYS` hold plain text, every other ``fastdiff.*`` key holds JSON
(``inputs`` / ``outputs``: tensor specs, ``dims``: dimension ranges as ``[min, opt, max, multiple]``, ``profile``,
``model_config``, ``scheduler``, ``defaults``, ``labels``, ``sampler``, ``versions``). A label-conditioned model's
embedding table travels in ``fastdiff.labels`` (:func:`label_table_metadata` writes it, :class:`LabelTable` turns it
back into ``encode_labels``), so a file alone can sample labels.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastdiff.errors import InvalidInput
from fastdiff.exported.specs import DimRange, TensorSpec

#: ``fastdiff.format``: the version of this metadata layout.
METADATA_FORMAT = "1"
#: keys whose values are plain strings (the other ``fastdiff.*`` values are JSON).
PLAIN_KEYS = ("fastdiff.format", "fastdiff.kind", "fastdiff.model", "fastdiff.family", "fastdiff.precision")
#: label-embedding tables up to this size are stored in the metadata (base64) for path-based sampling.
LABEL_TABLE_MAX_BYTES = 8 * 2**20
#: onnxruntime type names of the tensor types a signature read off a foreign file may hold.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


def label_table_metadata(label_model: torch.nn.Module) -> str | None:
    """The label-embedding table (float32, base64) and its sizes as JSON, or None when it is too large (the
    value of ``fastdiff.labels``; :class:`LabelTable` reads it back)."""
    w = label_model.label_embedding.weight.detach().float().cpu().contiguous()
    if w.numel() * 4 > LABEL_TABLE_MAX_BYTES:
        return None
    return json.dumps({"num_classes": int(label_model.num_classes), "null_label": int(label_model.null_label),
                       "tokens": int(label_model.tokens), "embed_dim": int(label_model.embed_dim),
                       "shape": list(w.shape), "data": base64.b64encode(w.numpy().tobytes()).decode("ascii")})


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
        j = {k: json.loads(v) for k, v in meta.items() if k.startswith("fastdiff.") and k not in PLAIN_KEYS}
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


def onnx_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read without its weights (no session needed)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for damaged files
        raise InvalidInput(f"cannot read ONNX file {str(path)!r}: {e}") from e
    return {p.key: p.value for p in proto.metadata_props}
