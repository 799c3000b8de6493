"""Train a coalescer network (no teacher) and generate with it: fixed steps, adaptive steps, guidance.

Training step (batch ``B``): draw pairs from the data and take their labels as the conditions ``DE`` (a fraction
``label_dropout`` replaced by the null label, for CFG); draw points ``R = prior_scale * z``, ``z ~ N(0, I)``, in
latent space -- and, for a fraction ``refine_fraction`` of the batch, ``R = x + sigma z`` near a data image ``x``
of that condition (``sigma ~ U(0.05, 1)``), so that a second step, taken from a point near the data, is not outside
what the network saw; look up the stored pair nearest to ``concat(desc_scale * onehot(DE), R)`` in the faiss index
(:mod:`fastdiff.distill.coalescer_index`); its image ``I`` is the target::

    loss = distance_weight * (distance - |I - R|)^2 + sqrt(|direction - normalize(I - R)|)

``sqrt(|v|)`` has an infinite gradient at ``v = 0`` (and ``|v|`` none), so the direction term is computed as
``(|v|^2 + eps^2)^(1/4)`` with ``eps = 1e-4``: equal to ``sqrt(|v|)`` within ``eps^(1/2) = 0.01`` and smooth at 0.
``distance_weight`` defaults to ``1 / D`` (``D`` = latent size, 256 for digits): the distance error per latent
element, so that the two heads' losses are of the same order (~1) at the start.

Generation: ``x <- x + normalize(direction) * distance`` once or twice (:func:`generate`); ``adaptive`` takes the
second step only for samples whose first direction is shorter than ``threshold`` (the network is unsure). Seeded
(one generator drives data order, noise and dropout), tqdm progress, checkpoints every ``save_every`` steps to
``checkpoint``, resumed automatically with the same settings.
"""

from __future__ import annotations

import copy
import io
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, check_writable
from fastdiff.errors import InvalidInput
from fastdiff.models.coalescer_net import (  # generate / guided_target: re-exported, they were defined here
    NORM_FLOOR,
    CoalescerConfig,
    CoalescerModel,
    CoalescerNet,
    check_steps,
    generate,
    guided_target,
    save_coalescer,
)
from fastdiff.models.running_mean import running_mean
from fastdiff.models.train_digits import ema_update

__all__ = ["CoalescerTrainSpec", "coalescer_loss", "build_model", "load_checkpoint", "train_coalescer", "generate",
           "guided_target"]

OBJECTIVE = "coalescer"
#: smoothing of the direction loss's sqrt at 0 (see the module docstring)
DIRECTION_EPS = 1e-4


@dataclass
class CoalescerTrainSpec:
    """Everything that determines a training run (a checkpoint resumes only under the same spec)."""

    index_sha256: str
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    hidden: int = 512
    depth: int = 2
    embed_dim: int = 32
    label_dropout: float = 0.1
    refine_fraction: float = 0.25
    distance_weight: float | None = None  # None: 1 / latent size
    num_steps: int = 2
    ema_decay: float = 0.995
    prior_scale: float = 1.0

    def check(self) -> None:
        for k in ("steps", "batch_size", "hidden", "depth", "embed_dim", "num_steps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInput(f"{k} must be an integer >= 1, got {v!r}")
        for k in ("label_dropout", "refine_fraction", "ema_decay"):
            v = getattr(self, k)
            if not 0.0 <= v < 1.0:
                raise InvalidInput(f"{k} must be in [0, 1), got {v!r}")
        if not 0 < self.prior_scale < math.inf:
            raise InvalidInput(f"prior_scale must be a finite number > 0, got {self.prior_scale!r}")
        if not self.lr > 0 or (self.distance_weight is not None and not self.distance_weight >= 0):
            raise InvalidInput(f"lr must be > 0 and distance_weight >= 0, got {self.lr!r}, {self.distance_weight!r}")


def coalescer_loss(distance: torch.Tensor, direction: torch.Tensor, image: torch.Tensor, start: torch.Tensor,
                   distance_weight: float, eps: float = DIRECTION_EPS) -> tuple[torch.Tensor, dict]:
    """The training loss (mean over the batch) and its two parts (floats): see the module docstring."""
    diff = (image - start).flatten(1)
    true_distance = diff.norm(dim=1)
    unit = diff / true_distance.clamp_min(NORM_FLOOR)[:, None]
    l_dist = (distance - true_distance).pow(2)
    l_dir = ((direction.flatten(1) - unit).pow(2).sum(dim=1) + eps * eps).pow(0.25)
    loss = (distance_weight * l_dist + l_dir).mean()
    return loss, {"distance_mse": float(l_dist.detach().mean()), "direction": float(l_dir.detach().mean())}


def build_model(spec: CoalescerTrainSpec, latent_shape, num_classes: int, name: str) -> CoalescerModel:
    c, h, w = latent_shape
    if h != w:
        raise InvalidInput(f"coalescers take square latents, got {h}x{w}")
    cfg = CoalescerConfig(in_channels=c, sample_size=h, cross_attention_dim=spec.embed_dim, hidden=spec.hidden,
                          depth=spec.depth, num_steps=spec.num_steps, prior_scale=float(spec.prior_scale))
    return CoalescerModel(CoalescerNet(cfg), num_classes, name=name)


def _save_checkpoint(path: Path, spec, step, model, ema, opt, gen, avg, wall_s: float = 0.0) -> None:
    buf = io.BytesIO()
    torch.save({"objective": OBJECTIVE, "spec": asdict(spec), "step": step, "model": model.state_dict(),
                "ema": ema.state_dict(), "opt": opt.state_dict(), "generator": gen.get_state(), "avg": avg,
                "wall_s": wall_s}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, spec: CoalescerTrainSpec | None = None) -> dict:
    """A coalescer checkpoint; :class:`InvalidInput` for another objective's, a damaged one or other settings."""
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged / foreign files
        raise InvalidInput(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:120]})") from None
    objective = ck.get("objective") if isinstance(ck, dict) else None
    if objective != OBJECTIVE:
        raise InvalidInput(f"{path} is a checkpoint of objective {objective!r}, not {OBJECTIVE!r}; pass another "
                           "--checkpoint path")
    if spec is not None and ck["spec"] != asdict(spec):
        diff = {k: (ck["spec"].get(k), v) for k, v in asdict(spec).items() if ck["spec"].get(k) != v}
        raise InvalidInput(f"checkpoint {path} was made with other settings (checkpoint, requested): {diff}; "
                           "pass another --checkpoint path or delete it")
    return ck


def _lr_at(step: int, total: int, lr: float) -> float:
    # Not lr_schedule.lr_at: the shipped coalescer was trained with this one (a 100-step ramp multiplying a cosine
    # over the whole run), and a resumed checkpoint must keep the schedule it started with.
    warm = min(1.0, (step + 1) / 100)
    return lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, total))))


def train_coalescer(index, out: str | os.PathLike | None, spec: CoalescerTrainSpec, *, checkpoint=None,
                    save_every: int = 500, name: str = "digits-coalescer", progress: bool = True,
                    log_every: int = 250, stop_after: int | None = None, metadata: dict | None = None,
                    defaults: dict | None = None, build=None, save=None):
    """Train on a loaded :class:`~fastdiff.distill.coalescer_index.CoalescerIndex`; save the EMA model to ``out``.

    ``checkpoint``: a file path; resumed from when it exists (same spec), written every ``save_every`` steps.
    ``stop_after`` (testing): return after that many steps of this call, as a killed job would (no final save).
    ``defaults``: the sampling defaults stored with the model (scheduler, num_inference_steps, guidance_scale).
    The index supplies the conditions (``index.conditions(pick, drop)``: the pairs' conditions, the null one where
    ``drop``) and the lookup (``index.nearest(conditions, points)``), so one loop trains label and text coalescers;
    ``build(spec, latent_shape)`` makes the model (default: a label model, :func:`build_model`) and
    ``save(model, out, metadata, defaults)`` writes it (default :func:`save_coalescer`). The metadata records
    ``wall_s_train``: training wall time summed over resumed runs. Returns the EMA model.
    """
    from tqdm.auto import tqdm

    spec.check()
    if out is not None:
        check_writable(out, "dir", what="--out")
    latents = index.latents.float()
    n = latents.shape[0]
    shape = tuple(latents.shape[1:])
    dw = spec.distance_weight if spec.distance_weight is not None else 1.0 / latents[0].numel()
    torch.manual_seed(spec.seed)
    model = (build(spec, shape) if build is not None else build_model(spec, shape, index.num_classes, name)).train()
    if defaults is not None:  # a default the model cannot sample with is refused before training, not after
        check_steps(model, defaults.get("num_inference_steps", 1))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(spec.seed)
    start, avg, spent = 0, None, 0.0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None:
        check_writable(ckpt, "file", what="--checkpoint")
        if ckpt.exists():
            ck = load_checkpoint(ckpt, spec)
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["opt"])
            gen.set_state(ck["generator"])
            start, avg, spent = int(ck["step"]), ck["avg"], float(ck.get("wall_s", 0.0))
            print(f"resuming from {ckpt} at step {start}", flush=True)  # also without progress: it changes the run
    t0 = time.time()
    parts = {}
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc="train coalescer",
               disable=not progress, mininterval=2.0)
    for step in bar:
        pick = torch.randint(0, n, (spec.batch_size,), generator=gen)
        y = index.conditions(pick, torch.rand(spec.batch_size, generator=gen) < spec.label_dropout)
        z = torch.randn((spec.batch_size, *shape), generator=gen)
        near = torch.rand(spec.batch_size, generator=gen) < spec.refine_fraction
        sigma = 0.05 + 0.95 * torch.rand(spec.batch_size, generator=gen)
        r = torch.where(near.view(-1, 1, 1, 1), latents[pick] + sigma.view(-1, 1, 1, 1) * z, spec.prior_scale * z)
        target = latents[index.nearest(y, r)]
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, spec.steps, spec.lr)
        distance, direction = model.heads(r, y)
        loss, parts = coalescer_loss(distance, direction, target, r, dw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(spec.ema_decay, (1 + step) / (10 + step)))
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        done = step + 1
        if log_every and done % log_every == 0:
            print(f"step {done}/{spec.steps} loss {avg:.4f} (distance mse {parts['distance_mse']:.3f}, direction "
                  f"{parts['direction']:.3f}) elapsed {time.time() - t0:.0f}s", flush=True)
        if ckpt is not None and save_every and (done % save_every == 0 or done == spec.steps):
            _save_checkpoint(ckpt, spec, done, model, ema, opt, gen, avg, spent + time.time() - t0)
        if stop_after is not None and done - start >= stop_after and done < spec.steps:
            return ema
    if out is not None:
        meta = {"objective": OBJECTIVE, **asdict(spec), "distance_weight": dw, "index": str(index.path),
                "index_spec": asdict(index.spec), "final_loss_ema": avg, "wall_s_this_run": round(time.time() - t0, 1),
                "wall_s_train": round(spent + time.time() - t0, 3),
                "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                **(metadata or {})}
        (save or save_coalescer)(ema, out, metadata=meta, defaults=defaults)
        if progress:
            print(f"saved coalescer to {out} ({spec.steps} steps, {meta['wall_s_this_run']:.0f}s)", flush=True)
    return ema
