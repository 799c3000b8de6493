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

from fastdiff._checks import check_int
from fastdiff.errors import InvalidInput
from fastdiff.exported.specs import DimRange, TensorSpec

#: ``fastdiff.format``: the version of this metadata layout.
METADATA_FORMAT = "1"
#: keys whose values are plain strings (the other ``fastdiff.*`` values are JSON).
PLAIN_KEYS = ("fastdiff.format", "fastdiff.kind", "fastdiff.model", "fastdiff.family", "fastdiff.precision")
#: label-embedding tables up to this size are stored in the metadata (base64) for path-based sampling.
LABEL_TABLE_MAX_BYTES = 8 * 2**20
#: the longest metadata value read back: the largest label table the exporter writes (base64: 4 chars per 3
#: bytes) plus room for its JSON fields. A longer value was not written by fastdiff and is not decoded.
MAX_VALUE_CHARS = LABEL_TABLE_MAX_BYTES * 4 // 3 + 2**16
#: JSON keys with the type each must hold (fastdiff.inputs / outputs are checked spec by spec).
_JSON_TYPES = {"fastdiff.dims": dict, "fastdiff.model_config": dict, "fastdiff.scheduler": dict,
               "fastdiff.defaults": dict, "fastdiff.profile": dict, "fastdiff.labels": dict,
               "fastdiff.sampler": dict, "fastdiff.versions": dict}
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


def check_label_table(meta: Any) -> None:
    """Raise :class:`InvalidInput` unless ``meta`` (the ``fastdiff.labels`` value) is a table the exporter could
    have written: sizes that agree with each other and with the stored data, within :data:`LABEL_TABLE_MAX_BYTES`."""
    where = "the file's label table (metadata fastdiff.labels)"
    if not isinstance(meta, dict):
        raise InvalidInput(f"{where} must be a JSON object, got {type(meta).__name__}; re-export the model")
    missing = [k for k in ("num_classes", "null_label", "tokens", "embed_dim", "shape", "data") if k not in meta]
    if missing:
        raise InvalidInput(f"{where} lacks {missing}; re-export the model")
    n = check_int(f"{where}: num_classes", meta["num_classes"], 1)
    tokens = check_int(f"{where}: tokens", meta["tokens"], 1)
    width = check_int(f"{where}: embed_dim", meta["embed_dim"], 1)
    if meta["null_label"] != n:
        raise InvalidInput(f"{where}: null_label is {meta['null_label']!r} but must be num_classes ({n})")
    expected = [n + 1, tokens * width]
    if meta["shape"] != expected:
        raise InvalidInput(f"{where} has shape {meta['shape']!r} but its sizes declare {expected} "
                           "(num_classes + 1 rows of tokens * embed_dim); re-export the model")
    nbytes = expected[0] * expected[1] * 4
    if nbytes > LABEL_TABLE_MAX_BYTES:
        raise InvalidInput(f"{where} declares {nbytes} bytes, more than the {LABEL_TABLE_MAX_BYTES} the exporter "
                           "stores; pass the torch model instead of the file")
    data = meta["data"]
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != nbytes:
        got = "is not base64" if raw is None else f"holds {len(raw)} bytes"
        raise InvalidInput(f"{where}: its data {got}, expected {nbytes} bytes of float32; re-export the model")


class LabelTable:
    """``encode_labels`` of a LabelConditionedUNet, rebuilt from the embedding table stored in an exported file's
    metadata (the sampler uses it when it is given a file instead of the torch model). ``meta`` has passed
    :func:`check_label_table` (:meth:`GraphInfo.from_metadata` checks it)."""

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
        j = _read_json_values(meta)
        facts = j.get("fastdiff.model_config", {})
        for k in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "down_factor"):
            if facts.get(k) is not None:  # the runners size tensors from these
                check_int(f"metadata fastdiff.model_config {k}", facts[k], 1, hint="re-export the model")
        if "fastdiff.labels" in j:
            check_label_table(j["fastdiff.labels"])
            width = facts.get("cross_attention_dim")
            if width is not None and j["fastdiff.labels"]["embed_dim"] != width:
                raise InvalidInput(f"the file's label table has embed_dim {j['fastdiff.labels']['embed_dim']} but "
                                   f"the model's cross_attention_dim is {width}; re-export the model")
        profile = j.get("fastdiff.profile", {})
        try:
            return cls(kind=meta.get("fastdiff.kind", "unet"),
                       inputs=_specs(j, "fastdiff.inputs"), outputs=_specs(j, "fastdiff.outputs"),
                       dims={k: DimRange(k, *v) for k, v in j.get("fastdiff.dims", {}).items()},
                       facts=facts, scheduler=j.get("fastdiff.scheduler", {}),
                       defaults=j.get("fastdiff.defaults", {}), labels=j.get("fastdiff.labels"),
                       sampler=j.get("fastdiff.sampler"), profile=profile, model=meta.get("fastdiff.model", ""),
                       latent_scale=check_int("fastdiff.profile latent_scale", profile.get("latent_scale", 1), 1))
        except (TypeError, ValueError) as e:  # DimRange's own checks, a dims value that is not a list
            raise InvalidInput(f"the file's fastdiff metadata is malformed ({e}); re-export the model") from e

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


def _read_json_values(meta: dict[str, str]) -> dict[str, Any]:
    """The JSON ``fastdiff.*`` values, each checked for length (before decoding) and type."""
    out = {}
    for k, v in meta.items():
        if not k.startswith("fastdiff.") or k in PLAIN_KEYS:
            continue
        if len(v) > MAX_VALUE_CHARS:
            raise InvalidInput(f"metadata {k} is {len(v)} characters long, more than the {MAX_VALUE_CHARS} fastdiff "
                               "writes; the file was not exported by fastdiff (or was altered)")
        try:
            out[k] = json.loads(v)
        except ValueError as e:
            raise InvalidInput(f"metadata {k} is not valid JSON ({e}); re-export the model") from None
        kind = _JSON_TYPES.get(k, list if k in ("fastdiff.inputs", "fastdiff.outputs") else None)
        if kind is not None and not isinstance(out[k], kind):
            raise InvalidInput(f"metadata {k} must be a JSON {'object' if kind is dict else 'list'}, got "
                               f"{type(out[k]).__name__}; re-export the model")
    return out


def _specs(j: dict[str, Any], key: str) -> list[TensorSpec]:
    if key not in j:
        raise InvalidInput(f"the file's fastdiff metadata lacks {key}; re-export the model")
    try:
        return [TensorSpec.from_dict(d) for d in j[key]]
    except (KeyError, TypeError) as e:
        raise InvalidInput(f"metadata {key} holds a tensor spec without name / dtype / dims ({e!r}); re-export "
                           "the model") from None


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
