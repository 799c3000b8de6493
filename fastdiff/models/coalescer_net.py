"""Coalescer networks: ``(R, condition) -> (distance, direction)``, one jump from a random point to an image.

A coalescer is trained (:mod:`fastdiff.distill.coalescer`) to point from a point ``R`` of the latent space to the
training image nearest to it among those of the requested condition, and to say how far that image is::

    target = R + normalize(direction) * distance

One call is one sampling step; a second step repeats it from ``target``. ``|direction|`` is the network's
confidence: the direction head is trained with a median-like loss towards a unit vector, so it stays near 1 where
the nearest image is clear and shrinks where several images (pointing different ways) are about as near.

The model plugs into the samplers as a label model: :class:`CoalescerModel` is a
:class:`~fastdiff.models.label_unet.LabelConditionedUNet` whose ``unet`` is a :class:`CoalescerNet` returning the
target point, sampled with the ``coalescer`` scheduler (every step: ``x <- model output``). Classifier-free guidance
is then the loop's usual extrapolation, applied to the predicted targets: ``t_u + g (t_c - t_u)`` with ``t_u`` the
target under the null label (trained by label dropout).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff._atomic import atomic_write_bytes
from fastdiff.errors import InvalidInput, ModelConfigError, ModelNotFound
from fastdiff.models.label_unet import LabelConditionedUNet

FORMAT = "fastdiff.coalescer"
#: the model-folder file names of fastdiff.models.registry (which imports this module to load coalescers)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
#: below this length a direction is treated as zero when normalised (no NaN from 0 / 0)
NORM_FLOOR = 1e-6
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(this) = 1


@dataclass
class CoalescerConfig:
    """Sizes of a coalescer network. ``cross_attention_dim`` is the label embedding's width (the name the samplers
    read from a UNet config); ``hidden`` / ``depth``: width and number of residual blocks of the MLP."""

    in_channels: int = 1
    sample_size: int = 16
    cross_attention_dim: int = 32
    hidden: int = 1024
    depth: int = 2
    num_steps: int = 2  # the most sampling steps the model supports (its scheduler's max_steps)
    prior_scale: float = 1.0  # the starting points are R = prior_scale * z, z ~ N(0, I)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def latent_dim(self) -> int:
        return self.in_channels * self.sample_size * self.sample_size

    def check(self, where: str = "coalescer config") -> None:
        for k, v in asdict(self).items():
            if k == "prior_scale":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                    raise ModelConfigError(f"{where}: prior_scale must be a finite number > 0, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ModelConfigError(f"{where}: {k} must be an integer >= 1, got {v!r}")
        if self.latent_dim * self.hidden > 2**31:
            raise ModelConfigError(f"{where}: a {self.latent_dim} x {self.hidden} first layer is far beyond a "
                                   "coalescer's size; check sample_size / hidden")


class _Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h))))


class CoalescerNet(nn.Module):
    """An MLP on ``concat(flatten(R), embedding)``: the first layer's rows are templates whose dot products with
    ``R`` are what a nearest-image search computes (``|R - x|^2 = |R|^2 - 2 <R, x> + |x|^2``).

    Residual parametrisation of the direction: the last layer gives an image estimate ``I_hat`` and a confidence
    ``c``, and ``direction = c * normalize(I_hat - R)``. The direction has to cancel ``R`` (|R| ~ 16 for digits)
    to the last pixel; written out directly, an MLP must re-create ``-R`` through its hidden layers, and its error,
    times a distance of ~18, left visible speckle noise in every sample (FD 256 after 500 steps, hidden 1024;
    this form: clean strokes, FD 158 after 1,000 steps, hidden 512 -- not a controlled comparison, the first run
    was stopped). ``|direction| = c`` is the confidence the issue reads from the direction's magnitude.

    ``heads(x, emb)`` -> ``(distance (N,), direction (N, C, H, W))``; ``forward(sample, timestep,
    encoder_hidden_states)`` -> ``(target,)`` as diffusers UNets return with ``return_dict=False``. The timestep
    is not used: a step from a point is the same whichever step it is.
    """

    def __init__(self, config: CoalescerConfig):
        super().__init__()
        config.check()
        self.config = config
        d, e, h = config.latent_dim, config.cross_attention_dim, config.hidden
        self.inp = nn.Linear(d + e, h)
        self.blocks = nn.ModuleList(_Block(h) for _ in range(config.depth))
        self.norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, d + 2)  # image estimate, distance, confidence

    def heads(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = x.shape[0], self.config.latent_dim
        flat = x.reshape(n, d)
        h = self.inp(torch.cat([flat, emb.reshape(n, -1)], dim=1))
        for b in self.blocks:
            h = b(h)
        o = self.out(torch.nn.functional.silu(self.norm(h)))
        # distance in units of sqrt(d) (the size of |R| for R ~ N(0, I)): the head then works at unit scale
        distance = torch.nn.functional.softplus(o[:, d]) * math.sqrt(d)
        confidence = torch.nn.functional.softplus(o[:, d + 1] + _SOFTPLUS_INV_1)  # 1 at initialisation
        toward = o[:, :d] - flat
        unit = toward / toward.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)
        return distance, (confidence[:, None] * unit).reshape(x.shape)

    def forward(self, sample, timestep=None, encoder_hidden_states=None, return_dict: bool = False, **unused):
        distance, direction = self.heads(sample, encoder_hidden_states)
        return (coalesce_step(sample, distance, direction),)


def coalesce_step(x: torch.Tensor, distance: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``x + normalize(direction) * distance`` per sample (``x``, ``direction`` ``(N, ...)``, ``distance (N,)``)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    norm = direction.flatten(1).norm(dim=1).clamp_min(NORM_FLOOR)
    return x + direction * (distance / norm).view(shape)


class CoalescerModel(LabelConditionedUNet):
    """A coalescer as a label model: ``unet`` is the :class:`CoalescerNet`, ``label_embedding`` its own learned
    embedding (row ``num_classes`` = the null label for CFG), sampled with the ``coalescer`` scheduler."""

    def __init__(self, net: CoalescerNet, num_classes: int, name: str = "coalescer"):
        super().__init__(net, num_classes, tokens=1, scheduler_config=scheduler_config(net.config.num_steps,
                                                                                   net.config.prior_scale),
                         name=name)
        self.defaults = {"scheduler": "coalescer", "num_inference_steps": 1, "guidance_scale": 1.0}

    def heads(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distance (N,), direction (N, C, H, W))`` at points ``x`` for ``labels`` (null label allowed)."""
        return self.unet.heads(x, self.encode_labels(labels))

    def null_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """The null label for each of ``labels`` (the unconditional branch of guidance)."""
        return torch.full_like(labels, self.null_label)

    def forward(self, sample, timestep, labels):
        return self.unet(sample, timestep, self.encode_labels(labels))[0]


def scheduler_config(num_steps: int, prior_scale: float = 1.0) -> dict:
    """The config of the ``coalescer`` scheduler a model samples with (``max_steps``: the most it supports;
    ``prior_scale``: unit noise is scaled by it into the starting points)."""
    return {"_class_name": "CoalescerScheduler", "prediction_type": "sample", "max_steps": int(num_steps),
            "prior_scale": float(prior_scale)}


def save_coalescer(model: CoalescerModel, directory: str | os.PathLike, *, metadata: dict | None = None,
                   defaults: dict | None = None, dtype: torch.dtype = torch.float16, name: str | None = None) -> Path:
    """Write a model folder (``config.json`` + ``model.safetensors`` in ``dtype``), each file atomically;
    ``name``: the name stored in its config (default: the model's)."""
    from safetensors.torch import save as st_save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"format": FORMAT, "name": name or model.name, "num_classes": model.num_classes,
           "net": asdict(model.unet.config), "scheduler": dict(model.scheduler_config),
           "defaults": dict(defaults if defaults is not None else model.defaults), "metadata": dict(metadata or {})}
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, st_save(state, metadata={"format": FORMAT}))
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return d


def load_coalescer(d: Path, cfg: dict, device=None, dtype=None) -> CoalescerModel:
    """The model of folder ``d`` whose ``config.json`` is ``cfg`` (called by :func:`fastdiff.models.load`)."""
    from safetensors.torch import load_file

    where = str(d / CONFIG_NAME)
    net_cfg, k = cfg.get("net"), cfg.get("num_classes")
    if not isinstance(net_cfg, dict) or isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ModelConfigError(f"{where}: a coalescer config needs 'net' (an object) and 'num_classes' (an int >= 1)")
    try:
        config = CoalescerConfig(**net_cfg)
    except TypeError as e:
        raise ModelConfigError(f"{where}: bad 'net' ({e}); rewrite it with save_coalescer") from None
    config.check(where)
    model = CoalescerModel(CoalescerNet(config), k, name=cfg.get("name") or d.name)
    try:
        state = load_file(str(d / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelNotFound(f"cannot read weights {d / WEIGHTS_NAME}: {e}") from e
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as e:
        raise ModelNotFound(f"weights {d / WEIGHTS_NAME} do not match the config: {str(e)[:500]}") from e
    if missing or unexpected:
        raise ModelNotFound(f"weights {d / WEIGHTS_NAME} do not match the config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    if isinstance(cfg.get("defaults"), dict):
        model.defaults = dict(cfg["defaults"])
    model.model_config = cfg
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def check_steps(model: CoalescerModel, steps: int) -> int:
    """``steps`` if the model supports it, else :class:`InvalidInput` naming the limit."""
    limit = model.unet.config.num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise InvalidInput(f"{model.name!r} supports 1 to {limit} coalescer steps, got {steps!r}")
    return steps


# ----- generation (label and text coalescers) ---------------------------------------------------------------------
@torch.no_grad()
def guided_target(model: CoalescerModel, x: torch.Tensor, labels: torch.Tensor, guidance: float):
    """(target, confidence ``|direction|`` of the conditional branch) at ``x``: with ``guidance != 1`` the targets
    under the condition and the null condition (``model.null_condition``: the null label, or the empty prompt's
    embedding) are extrapolated, ``t_u + g (t_c - t_u)``. ``labels``: class labels, or condition embeddings."""
    labels = torch.as_tensor(labels, device=x.device)
    if not labels.is_floating_point():
        labels = labels.long()
    d_c, dir_c = model.heads(x, labels)
    t_c = coalesce_step(x, d_c, dir_c)
    conf = dir_c.flatten(1).norm(dim=1)
    if guidance == 1.0:
        return t_c, conf
    d_u, dir_u = model.heads(x, model.null_condition(labels))
    t_u = coalesce_step(x, d_u, dir_u)
    return t_u + guidance * (t_c - t_u), conf


@torch.no_grad()
def generate(model: CoalescerModel, labels: torch.Tensor, noise: torch.Tensor, steps: int = 1,
             guidance: float = 1.0, adaptive_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, steps used per sample) from unit ``noise`` ``z`` (the points ``R = prior_scale * z``).

    ``steps``: how many steps (at most the model's ``num_steps``); with ``adaptive_threshold``, ``steps`` is the
    most taken and a sample stops after a step whose direction is at least that long (the network is sure)."""
    check_steps(model, steps)
    x = noise * model.unet.config.prior_scale
    used = torch.zeros(x.shape[0], dtype=torch.long)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    for _ in range(steps):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        target, conf = guided_target(model, x[idx], labels[idx], guidance)
        x[idx] = target
        used[idx] += 1
        if adaptive_threshold is not None:
            active[idx[conf >= adaptive_threshold]] = False
    return x, used
