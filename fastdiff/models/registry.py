"""Loading and saving label-conditioned models: the embedded ones (:data:`EMBEDDED`) or a directory.

A model directory holds ``config.json`` (the UNet config, label-conditioning sizes, the scheduler config it samples
with, default sampling settings, training metadata, and for distilled students the ``limits`` they support) and
``model.safetensors`` (tensors ``unet.*`` and ``label_embedding.weight``, stored in float16 to keep the package
small, loaded as float32). Loading never touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes
from fastdiff._checks import check_int, check_number
from fastdiff.errors import InvalidInput, ModelConfigError, ModelNotFound
from fastdiff.models.coalescer_net import FORMAT as COALESCER_FORMAT
from fastdiff.models.coalescer_net import CoalescerModel, load_coalescer, save_coalescer
from fastdiff.models.label_unet import LabelConditionedUNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Models that ship inside the package, by name -> short description.
EMBEDDED: dict[str, str] = {
    "digits": "class-conditional 16x16 digits UNet (DPM-Solver++ 20 steps, CFG 1.5)",
    "digits-onestep": "one-step student distilled from 'digits' (1 step, no CFG)",
    "digits-coalescer": "coalescer network on the digits data, no teacher (1 or 2 steps)",
    "digits-consistency": "consistency student of 'digits', guidance folded in (lcm, 1 to 8 steps, CFG 1 to 3)",
}
#: Text-to-image pipelines that ship inside the package (diffusers pipelines: :func:`load_pipeline`).
EMBEDDED_PIPELINES: dict[str, str] = {
    "shapes": "text-to-image 64x64 shapes: a diffusers StableDiffusionPipeline (DPM-Solver++ 20 steps, CFG 5)",
    "shapes-onestep": "one-step student distilled from 'shapes' (1 step, CFG 5 folded in: guidance 1)",
    "shapes-consistency": "consistency student of 'shapes', guidance folded in (lcm, 1 to 4 steps, CFG 4 to 6)",
}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "fastdiff.label_conditioned_unet"
#: UNet config keys a model folder must state: diffusers' defaults for missing ones describe Stable Diffusion's
#: 860M-parameter UNet, which would be built (gigabytes) before the weights fail to match.
REQUIRED_UNET_KEYS = ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block",
                      "cross_attention_dim", "down_block_types", "up_block_types")
#: the largest network a model folder may describe, whatever the memory: above SDXL's 2.6B-parameter UNet.
MAX_PARAMETERS = 5_000_000_000


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
    if s in EMBEDDED_PIPELINES:
        raise ModelNotFound(f"{s!r} is a text-to-image pipeline, not a label-conditioned model: load it with "
                            f"fastdiff.models.load_pipeline({s!r}) or sample it with "
                            f"fastdiff.sample(model={s!r}, prompt=[...])")
    if s in EMBEDDED:
        d = WEIGHTS_DIR / s
        if not (d / WEIGHTS_NAME).is_file() or not (d / CONFIG_NAME).is_file():
            hint = ("python -m fastdiff train digits" if s == "digits"
                    else "python -m fastdiff distill coalescer-index ..., then ... coalescer-train ..."
                    if s.endswith("-coalescer")
                    else "python -m fastdiff distill generate ..., then python -m fastdiff distill train ...")
            raise ModelNotFound(f"the weights of the embedded model {s!r} are missing from {d} (a broken install?); "
                                f"reinstall fastdiff or rebuild them with `{hint}`")
        return d
    p = Path(s).expanduser()
    try:
        exists = p.exists()
    except OSError:  # e.g. a name longer than the file system allows
        exists = False
    if not exists:
        raise _not_found(f"unknown model {s[:200]!r}: it is neither an embedded model name nor an existing path")
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
    """The ``config.json`` of a model (see the module docstring); it must be a JSON object."""
    d = resolve(name_or_path)
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON and bad UTF-8 alike
        raise ModelNotFound(f"cannot read {d / CONFIG_NAME}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{d / CONFIG_NAME} must hold a JSON object, it holds a {type(cfg).__name__}; "
                               "rewrite it with fastdiff.models.save")
    return cfg


def estimate_parameters(unet_cfg: dict) -> int:
    """About how many parameters ``UNet2DConditionModel.from_config(unet_cfg)`` builds (within ~20%), from the
    channel widths, layers and cross-attention width alone, so a config can be refused before it is built."""
    widths = [int(c) for c in unet_cfg["block_out_channels"]]
    layers = unet_cfg["layers_per_block"]
    layers = [int(n) for n in layers] if isinstance(layers, (list, tuple)) else [int(layers)] * len(widths)
    cross = unet_cfg["cross_attention_dim"]
    cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
    attn = ["Attn" in str(t) for t in unet_cfg["down_block_types"]]
    # resnet: two 3x3 convolutions (18 c^2); an up block's resnets read the skip concatenation (27 c^2); a
    # transformer: self- and cross-attention, GEGLU feed-forward and projections (~20 c^2 + 2 c D)
    total = 0
    for c, n, a in zip(widths, layers, attn, strict=True):
        total += n * 18 * c * c + (n + 1) * 27 * c * c + (2 * n + 1) * a * (20 * c * c + 2 * c * cross)
    c = widths[-1]
    return total + 2 * 18 * c * c + 20 * c * c + 2 * c * cross


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def check_config(cfg: dict, where: str) -> None:
    """Refuse a model config that cannot describe a label-conditioned UNet, naming the key and what it should be;
    a network larger than :data:`MAX_PARAMETERS` or than this machine's memory is refused before it is built."""
    def bad(msg: str) -> ModelConfigError:
        return ModelConfigError(f"{where}: {msg}; rewrite it with fastdiff.models.save")

    if cfg.get("format") != FORMAT:
        raise ModelConfigError(f"{where} is not a fastdiff model config (format {cfg.get('format')!r}, expected "
                               f"{FORMAT!r})")
    missing = [k for k in ("unet", "num_classes") if k not in cfg]
    if missing:
        raise bad(f"lacks the key(s) {missing}")
    unet = cfg["unet"]
    if not isinstance(unet, dict):
        raise bad(f"'unet' must be an object (the UNet2DConditionModel config), got {type(unet).__name__}")
    missing = [k for k in REQUIRED_UNET_KEYS if k not in unet]
    if missing:
        raise bad(f"'unet' lacks the key(s) {missing}")
    try:
        check_int("num_classes", cfg["num_classes"], 1, 2**20)
        check_int("tokens", cfg.get("tokens", 1), 1, 4096)
        for k in ("in_channels", "out_channels", "sample_size", "cross_attention_dim"):
            check_int(f"unet.{k}", unet[k], 1)
        widths, layers = unet["block_out_channels"], unet["layers_per_block"]
        if not isinstance(widths, list) or not widths:
            raise InvalidInput(f"unet.block_out_channels must be a non-empty list of integers, got {widths!r}")
        for i, c in enumerate(widths):
            check_int(f"unet.block_out_channels[{i}]", c, 1)
        if isinstance(layers, list) and len(layers) != len(widths):
            raise InvalidInput(f"unet.layers_per_block must be an integer or a list of {len(widths)}, got {layers!r}")
        for i, n in enumerate(layers if isinstance(layers, list) else [layers]):
            check_int(f"unet.layers_per_block[{i}]" if isinstance(layers, list) else "unet.layers_per_block", n, 1)
        for k in ("down_block_types", "up_block_types"):
            v = unet[k]
            if not isinstance(v, list) or len(v) != len(widths) or not all(isinstance(t, str) for t in v):
                raise InvalidInput(f"unet.{k} must be a list of {len(widths)} block names (one per "
                                   f"block_out_channels entry), got {v!r}")
    except InvalidInput as e:
        raise bad(str(e)) from None
    for k, kind in (("scheduler", dict), ("defaults", dict), ("name", str), ("limits", dict)):
        if cfg.get(k) is not None and not isinstance(cfg[k], kind):
            raise bad(f"{k!r} must be a {'JSON object' if kind is dict else 'string'}, got {type(cfg[k]).__name__}")
    _check_limits_config(cfg.get("limits") or {}, bad)
    params = estimate_parameters(unet)
    memory = _memory_bytes()
    # float32 weights, built once and loaded once (the safetensors copy): ~8 bytes per parameter at the peak
    limit = min(MAX_PARAMETERS, memory // 8) if memory else MAX_PARAMETERS
    if params > limit:
        raise bad(f"its UNet (block_out_channels {unet['block_out_channels']}) would have about {params / 1e9:.1f}B "
                  f"parameters ({params * 4 / 2**30:.0f} GiB in float32), more than the {limit / 1e9:.1f}B this "
                  "machine can build" + (f" ({memory / 2**30:.0f} GiB of memory)" if memory else ""))


def _check_limits_config(limits: dict, bad) -> None:
    """``limits`` (see :mod:`fastdiff.models.folded_guidance`): a step count >= 1 and a guidance range lo <= hi."""
    try:
        if "max_inference_steps" in limits:
            check_int("limits.max_inference_steps", limits["max_inference_steps"], 1)
        if "guidance_scale" in limits:
            g = limits["guidance_scale"]
            if not (isinstance(g, list) and len(g) == 2):
                raise InvalidInput(f"limits.guidance_scale must be a list [lo, hi], got {g!r}")
            lo = check_number("limits.guidance_scale[0]", g[0])
            check_number("limits.guidance_scale[1]", g[1], lo, hint="the range is [lo, hi]")
    except InvalidInput as e:
        raise bad(str(e)) from None


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
    if cfg.get("format") == COALESCER_FORMAT:  # a coalescer network, not a UNet (fastdiff.distill.coalescer)
        return load_coalescer(d, cfg, device=device, dtype=dtype)
    check_config(cfg, str(d / CONFIG_NAME))
    try:
        unet = UNet2DConditionModel.from_config(cfg["unet"])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # diffusers' own config checks
        raise ModelConfigError(f"{d / CONFIG_NAME}: its 'unet' config does not build a UNet2DConditionModel "
                               f"({type(e).__name__}: {e})") from e
    model = LabelConditionedUNet(unet, int(cfg["num_classes"]), tokens=int(cfg.get("tokens", 1)),
                                 scheduler_config=cfg.get("scheduler"), name=cfg.get("name") or d.name)
    try:
        state = load_file(str(d / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelNotFound(f"cannot read weights {d / WEIGHTS_NAME}: {e}") from e
    state = {k: v.float() for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of the wrong size: strict=False does not cover those
        raise ModelNotFound(f"weights {d / WEIGHTS_NAME} do not match the config: {str(e)[:500]}") from e
    if missing or unexpected:
        raise ModelNotFound(f"weights {d / WEIGHTS_NAME} do not match the config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    model.defaults = dict(cfg.get("defaults") or {})
    model.limits = dict(cfg.get("limits") or {})
    model.model_config = cfg
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def save(model: LabelConditionedUNet, directory: str | os.PathLike, *, scheduler_config: dict | None = None,
         defaults: dict | None = None, metadata: dict | None = None, name: str | None = None,
         dtype: torch.dtype = torch.float16, limits: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` (config.json + model.safetensors), each file atomically (tmp + os.replace).

    ``scheduler_config`` defaults to ``model.scheduler_config``; ``dtype`` is the storage dtype of the weights;
    ``limits`` (default ``model.limits``): the steps / guidance range a distilled model supports (written only when
    there are some, so other folders keep their bytes). A coalescer model is written as one (``scheduler_config``
    comes from its network there).
    """
    from safetensors.torch import save as st_save

    if isinstance(model, CoalescerModel):
        return save_coalescer(model, directory, metadata=metadata, defaults=defaults, dtype=dtype, name=name)

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
    limits = dict(limits if limits is not None else getattr(model, "limits", None) or {})
    if limits:
        cfg["limits"] = limits
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, st_save(state, metadata={"format": FORMAT}))
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=False) + "\n").encode())
    return d
