"""What to export: resolve a MODEL argument (embedded name, fastdiff model folder, diffusers folder, torch module)
into a UNet in eval mode plus the facts the export needs (channels, sizes, conditioning, scheduler config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.models.label_unet import is_label_model

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")


@dataclass
class ModelSource:
    """A resolved model. ``unet`` is the denoising network (float32, eval); ``label_model`` the
    :class:`~fastdiff.models.LabelConditionedUNet` around it, if any."""

    name: str
    unet: torch.nn.Module
    label_model: torch.nn.Module | None = None
    scheduler_config: dict | None = None
    defaults: dict = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


def check_exportable(unet: torch.nn.Module) -> None:
    """Refuse a network that is not a diffusers UNet (a coalescer's MLP would fail deep inside the tracing with an
    AttributeError) and a UNet patched by ``fastdiff.optimize`` (its fused custom ops have no ONNX form). Every
    UNet export goes through here: the export command, the on-the-fly export of the onnxruntime / tensorrt model
    backends, Triton model repositories."""
    if getattr(getattr(unet, "config", None), "down_block_types", None) is None:
        kind = type(unet).__name__
        hint = (" This is a coalescer network, not a UNet: export its whole 1-2 step sampler with --format onnx "
                "(fastdiff.export.coalescer), and sample it with backend='auto' (PyTorch)."
                if kind == "CoalescerNet" else "")
        raise InvalidInput(f"the network is a {kind}, not a UNet: ONNX / TensorRT exports, Triton model "
                           f"repositories and the onnxruntime / tensorrt backends trace diffusers UNets.{hint}")
    if getattr(unet, "_fastdiff_optimized", None):
        raise InvalidInput("this UNet was patched by fastdiff.optimize (fused custom ops that ONNX cannot express); "
                           "call fastdiff.restore(unet) before exporting, and optimize again afterwards")


def unet_facts(unet: torch.nn.Module, label_model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The config facts exports and profiles use (plain JSON values)."""
    check_exportable(unet)
    cfg = unet.config
    kind = type(unet).__name__
    size = cfg.sample_size
    size = size if isinstance(size, int) or size is None else int(size[0])
    conditional = kind != "UNet2DModel"
    facts: dict[str, Any] = {
        "class": kind,
        "in_channels": int(cfg.in_channels),
        "out_channels": int(cfg.out_channels),
        "sample_size": size,
        "cross_attention_dim": int(cfg.cross_attention_dim) if conditional and cfg.cross_attention_dim else None,
        "addition_embed_type": getattr(cfg, "addition_embed_type", None),
        # every down block but the last halves the size: inputs must be divisible by 2^(blocks - 1)
        "down_factor": 2 ** (len(cfg.down_block_types) - 1),
        "class_embeddings": bool(getattr(cfg, "class_embed_type", None) is not None
                                 or getattr(cfg, "num_class_embeds", None) is not None),
        "time_cond_proj_dim": getattr(cfg, "time_cond_proj_dim", None),
    }
    if isinstance(facts["cross_attention_dim"], (list, tuple)):
        raise InvalidInput("UNets with per-block cross_attention_dim lists are not supported by the export")
    if facts["addition_embed_type"] == "text_time":
        time_dim = int(cfg.addition_time_embed_dim)
        facts["time_ids_dim"] = 6
        facts["text_embeds_dim"] = int(cfg.projection_class_embeddings_input_dim) - 6 * time_dim
    elif facts["addition_embed_type"] is not None:
        raise InvalidInput(f"addition_embed_type={facts['addition_embed_type']!r} is not supported by the export "
                           "(supported: None and SDXL's 'text_time')")
    if getattr(cfg, "num_class_embeds", None):
        facts["num_classes"] = int(cfg.num_class_embeds)  # class_labels must stay below this
    if label_model is not None:
        facts["tokens"] = int(label_model.tokens)
        facts["num_classes"] = int(label_model.num_classes)
    return facts


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot read {path}: {e}") from e


def _load_diffusers_unet(folder: Path) -> torch.nn.Module:
    import diffusers

    cls_name = _read_json(folder / "config.json").get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise ModelNotFound(f"{folder / 'config.json'} describes a {cls_name!r}; the export takes a "
                            f"{' or '.join(UNET_CLASSES)} (or a pipeline folder with a unet/ subfolder)")
    cls = getattr(diffusers, cls_name)
    weights = {p.name for p in folder.iterdir()}
    variant = None
    if not any(n.startswith("diffusion_pytorch_model.") and n.count(".") == 1 for n in weights) and any(
            n.startswith("diffusion_pytorch_model.fp16.") for n in weights):
        variant = "fp16"
    try:
        unet = cls.from_pretrained(str(folder), variant=variant, torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot load the UNet in {folder}: {e}") from e
    return unet


def resolve_model(model: Any) -> ModelSource:
    """A :class:`ModelSource` from an embedded model name (``"digits"``, ``"digits-onestep"``), a fastdiff model
    folder (``config.json`` + ``model.safetensors``, e.g. a distilled one-step student), a diffusers pipeline
    folder (with ``unet/``) or UNet folder, a ``LabelConditionedUNet`` or a diffusers UNet object."""
    if isinstance(model, torch.nn.Module):
        if is_label_model(model):
            return _from_label_model(model, getattr(model, "name", "custom"), "torch module")
        if type(model).__name__ not in UNET_CLASSES and not hasattr(model, "config"):
            raise InvalidInput(f"cannot export a {type(model).__name__}: pass a diffusers UNet2DConditionModel / "
                               "UNet2DModel, a LabelConditionedUNet, an embedded model name or a model folder")
        unet = model.eval()
        return ModelSource(name=getattr(model, "name", type(model).__name__), unet=unet, facts=unet_facts(unet),
                           origin="torch module")
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidInput(f"cannot export a {type(model).__name__}; pass a model name, a folder or a torch module")
    from fastdiff.models import EMBEDDED, load

    s = os.fspath(model)
    path = Path(s).expanduser()
    if s in EMBEDDED:
        return _from_label_model(load(s), s, f"embedded model {s!r}")
    if not path.exists():
        raise ModelNotFound(f"unknown model {s!r}: not an embedded model ({', '.join(EMBEDDED)}) nor an existing "
                            "folder; pass a fastdiff model folder, a diffusers pipeline folder (with unet/) or a "
                            "diffusers UNet folder")
    if path.is_file():
        path = path.parent
    cfg_path = path / "config.json"
    if cfg_path.is_file() and _read_json(cfg_path).get("format") == "fastdiff.label_conditioned_unet":
        return _from_label_model(load(path), path.name, str(path))
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise ModelNotFound(f"{path} holds no model: expected config.json (a fastdiff or diffusers UNet folder) or "
                            "unet/config.json (a diffusers pipeline folder)")
    unet = _load_diffusers_unet(unet_dir).eval()
    sched = None
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.is_file():
            sched = _read_json(cand)
            break
    return ModelSource(name=path.name, unet=unet, scheduler_config=sched, facts=unet_facts(unet), origin=str(path))


def _from_label_model(model: torch.nn.Module, name: str, origin: str) -> ModelSource:
    model = model.eval()
    facts = unet_facts(model.unet, model)
    model_cfg = getattr(model, "model_config", {}) or {}
    if name.startswith("digits") or str(model_cfg.get("name", "")).startswith("digits"):
        facts["family"] = "digits"
    return ModelSource(name=name, unet=model.unet, label_model=model, scheduler_config=model.scheduler_config or None,
                       defaults=dict(getattr(model, "defaults", {}) or {}), facts=facts, origin=origin)
