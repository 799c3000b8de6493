"""Loading and saving label-conditioned models: the embedded ``"digits"`` / ``"digits-onestep"`` or a directory.

A model directory holds ``config.json`` (the UNet config, label-conditioning sizes, the scheduler config it samples
with, default sampling settings, training metadata) and ``model.safetensors`` (tensors ``unet.*`` and
``label_embedding.weight``, stored in float16 to keep the package small, loaded as float32). Loading never touches
the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes
from fastdiff.errors import ModelNotFound
from fastdiff.models.label_unet import LabelConditionedUNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Models that ship inside the package, by name -> short description.
EMBEDDED: dict[str, str] = {
    "digits": "class-conditional 16x16 digits UNet (DPM-Solver++ 20 steps, CFG 1.5)",
    "digits-onestep": "one-step student distilled from 'digits' (1 step, no CFG)",
}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "fastdiff.label_conditioned_unet"


def available_models() -> dict[str, str]:
    """Embedded model names -> descriptions (only those whose weights are present)."""
    return {k: v for k, v in EMBEDDED.items() if (WEIGHTS_DIR / k / WEIGHTS_NAME).is_file()}


def _not_found(what: str) -> ModelNotFound:
    names = ", ".join(repr(n) for n in EMBEDDED)
    return ModelNotFound(
        f"{what}. Embedded models: {names}; or pass a directory holding {CONFIG_NAME} + {WEIGHTS_NAME} "
        "(written by fastdiff.models.save), or a LabelConditionedUNet / diffusers UNet object."
    )


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The directory of an embedded model name or a model path; raises :class:`ModelNotFound`."""
    s = os.fspath(name_or_path)
    if s in EMBEDDED:
        d = WEIGHTS_DIR / s
        if not (d / WEIGHTS_NAME).is_file() or not (d / CONFIG_NAME).is_file():
            hint = ("python -m fastdiff train digits" if s == "digits"
                    else "python -m fastdiff distill generate ..., then python -m fastdiff distill train ...")
            raise ModelNotFound(f"the weights of the embedded model {s!r} are missing from {d} (a broken install?); "
                                f"reinstall fastdiff or rebuild them with `{hint}`")
        return d
    p = Path(s).expanduser()
    if not p.exists():
        raise _not_found(f"unknown model {s!r}: it is neither an embedded model name nor an existing path")
    if p.is_file():
        if p.name in (WEIGHTS_NAME, CONFIG_NAME):
            p = p.parent
        else:
            raise _not_found(f"model path {s!r} is a file; expected a model directory")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (p / n).is_file()]
    if missing:
        raise _not_found(f"model directory {s!r} lacks {' and '.join(missing)}")
    return p


def read_config(name_or_path: str | os.PathLike) -> dict:
    """The ``config.json`` of a model (see the module docstring)."""
    d = resolve(name_or_path)
    try:
        return json.loads((d / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFound(f"cannot read {d / CONFIG_NAME}: {e}") from e


def load(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> LabelConditionedUNet:
    """Load an embedded model (``"digits"``, ``"digits-onestep"``) or a model directory, offline.

    Returns a :class:`LabelConditionedUNet` in eval mode (float32 on CPU unless ``device`` / ``dtype`` say
    otherwise) whose ``scheduler_config`` is the config it samples with and ``defaults`` the default sampling
    settings (``scheduler``, ``num_inference_steps``, ``guidance_scale``).
    Unknown names and bad paths raise :class:`fastdiff.errors.ModelNotFound`.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    d = resolve(name_or_path)
    cfg = read_config(d)
    if cfg.get("format") != FORMAT:
        raise ModelNotFound(f"{d / CONFIG_NAME} is not a fastdiff model config (format {cfg.get('format')!r})")
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    model = LabelConditionedUNet(unet, int(cfg["num_classes"]), tokens=int(cfg.get("tokens", 1)),
                                 scheduler_config=cfg.get("scheduler"), name=cfg.get("name", d.name))
    try:
        state = load_file(str(d / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelNotFound(f"cannot read weights {d / WEIGHTS_NAME}: {e}") from e
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelNotFound(f"weights {d / WEIGHTS_NAME} do not match the config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    model.defaults = dict(cfg.get("defaults", {}))
    model.model_config = cfg
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def save(model: LabelConditionedUNet, directory: str | os.PathLike, *, scheduler_config: dict | None = None,
         defaults: dict | None = None, metadata: dict | None = None, name: str | None = None,
         dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model`` to ``directory`` (config.json + model.safetensors), each file atomically (tmp + os.replace).

    ``scheduler_config`` defaults to ``model.scheduler_config``; ``dtype`` is the storage dtype of the weights.
    """
    from safetensors.torch import save as st_save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    unet_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.unet.config).items()
                if not k.startswith("_")}
    cfg = {
        "format": FORMAT,
        "name": name or model.name,
        "num_classes": model.num_classes,
        "tokens": model.tokens,
        "unet": unet_cfg,
        "scheduler": dict(scheduler_config if scheduler_config is not None else model.scheduler_config),
        "defaults": dict(defaults if defaults is not None else getattr(model, "defaults", {})),
        "metadata": dict(metadata or {}),
    }
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, st_save(state, metadata={"format": FORMAT}))
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=False) + "\n").encode())
    return d
