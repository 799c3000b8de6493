"""Train a one-step student on (label, noise, teacher image) triplets.

The student is a copy of the teacher's network (same UNet, same label embedding) called once at the last training
timestep ``T - 1`` on the starting noise; it is trained to output the teacher's final image directly
(``prediction_type="sample"``)::

    loss = mean((student(z, T - 1, label) - teacher_image(z, label))^2)

Initialisation: if the teacher predicts ``v``, its one-step x0 estimate at ``T - 1`` is
``sqrt(a_T) z - sqrt(1 - a_T) v ~ -sqrt(1 - a_T) v`` (``a_T`` ~ 0), so the student starts from the teacher with its
output layer scaled by ``-sqrt(1 - a_T)``: at step 0 it already returns the teacher's one-step guess (a blurry
class mean), and training sharpens it. ``"sample"`` teachers are copied as they are; for ``"epsilon"`` teachers the
output layer cannot be turned into an x0 estimate and is copied unchanged.
The saved student samples with the ``onestep`` scheduler (one call at ``T - 1``, the output is the image).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.distill.triplets import load_triplets
from fastdiff.errors import InvalidInput
from fastdiff.models.running_mean import running_mean
from fastdiff.models.train_digits import ema_update


def onestep_scheduler_config(teacher_scheduler: dict) -> dict:
    """The student's scheduler config: one call at ``T - 1`` returning the model output (sample prediction).

    Written as the equivalent diffusers config (``DDIMScheduler``, trailing spacing, final alpha 1: at one step it
    returns x0), which fastdiff's ``onestep`` scheduler reads and diffusers pipelines can use as is."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    cfg = {k: teacher_scheduler[k] for k in keep if k in teacher_scheduler}
    return {"_class_name": "DDIMScheduler", **cfg, "prediction_type": "sample", "timestep_spacing": "trailing",
            "set_alpha_to_one": True, "steps_offset": 0, "clip_sample": False}


def last_alpha_bar(scheduler_config: dict) -> float:
    """``alpha_bar`` at the last training timestep of a diffusers-style schedule."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    s = DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
    return float(s.alphas_cumprod[-1])


def output_x0_at_last_step(unet, scheduler_config: dict) -> None:
    """For a v-prediction ``scheduler_config``: scale ``unet.conv_out`` in place by ``-sqrt(1 - a_T)``, so that the
    network's output at ``T - 1`` is its one-step x0 estimate (see the module docstring). Other types: unchanged."""
    if scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
        scale = -math.sqrt(1.0 - last_alpha_bar(scheduler_config))
        with torch.no_grad():
            unet.conv_out.weight.mul_(scale)
            unet.conv_out.bias.mul_(scale)


def init_student(teacher) -> torch.nn.Module:
    """A trainable copy of ``teacher`` whose output at ``T - 1`` is the teacher's one-step x0 estimate."""
    student = copy.deepcopy(teacher).float().train().requires_grad_(True)
    sched = dict(teacher.scheduler_config)
    output_x0_at_last_step(student.unet, sched)
    student.scheduler_config = onestep_scheduler_config(sched)
    return student


def train_student(teacher, triplets: str | os.PathLike | dict, out: str | os.PathLike, *, steps: int = 2000,
                  batch_size: int = 128, lr: float = 2e-4, ema_decay: float = 0.995, seed: int = 0,
                  name: str | None = None, progress: bool = True, log_every: int = 100, metadata: dict | None = None,
                  save_every: int = 0):
    """Distil ``teacher`` (name, path or LabelConditionedUNet) into a one-step student saved to ``out``.

    ``triplets``: a directory / file written by :mod:`fastdiff.distill.triplets` or its loaded dict.
    ``save_every``: also save the EMA every that many steps (to watch a long run). Returns the EMA student.
    """
    from tqdm.auto import tqdm

    from fastdiff.models import load, save

    t_model = load(teacher) if isinstance(teacher, (str, os.PathLike)) else teacher
    data = triplets if isinstance(triplets, dict) else load_triplets(triplets)
    z, y, x0 = data["noise"].float(), data["label"].long(), data["image"].float()
    n = z.shape[0]
    if n == 0 or z.shape != x0.shape:
        raise InvalidInput(f"triplets must hold N > 0 noises and images of the same shape, got {tuple(z.shape)} "
                           f"and {tuple(x0.shape)}")
    torch.manual_seed(seed)
    student = init_student(t_model)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    t_last = int(student.scheduler_config.get("num_train_timesteps", 1000)) - 1
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    defaults = {"scheduler": "onestep", "num_inference_steps": 1, "guidance_scale": 1.0}
    meta = {"teacher": str(getattr(t_model, "name", teacher)), "num_triplets": n, "steps": steps,
            "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed,
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            **(metadata or {})}
    t0 = time.time()
    avg = None
    bar = tqdm(range(steps), desc="distill one-step", disable=not progress, mininterval=2.0)
    for step in bar:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        warm = min(1.0, (step + 1) / 100)
        for grp in opt.param_groups:
            grp["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        t = torch.full((len(idx),), t_last, dtype=torch.long)
        loss = F.mse_loss(student(z[idx], t, y[idx]), x0[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, min(ema_decay, (1 + step) / (10 + step)))
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {avg:.5f} elapsed {time.time() - t0:.0f}s", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            # a checkpoint of a longer run: the full settings, so it is reproducible on its own
            save(ema, Path(out), name=name or f"{getattr(t_model, 'name', 'model')}-onestep", defaults=defaults,
                 metadata={**meta, "steps_done": step + 1, "wall_s": round(time.time() - t0, 1), "loss_ema": avg})
    meta.update(steps_done=steps, wall_s=round(time.time() - t0, 1), final_loss_ema=avg)
    save(ema, Path(out), name=name or f"{getattr(t_model, 'name', 'model')}-onestep", defaults=defaults, metadata=meta)
    if progress:
        print(f"saved student to {out} ({steps} steps, {meta['wall_s']:.0f}s)", flush=True)
    return ema
