"""Train the embedded ``digits`` teacher: ``python -m fastdiff.models.train_digits [--steps N] [--out DIR]``.

A class-conditional ``UNet2DConditionModel`` (see :mod:`fastdiff.models.digits`) learns v-prediction on
scikit-learn's 1,797 bundled digits at 16x16, conditioned through cross-attention on a learned label embedding;
10% of labels are replaced by the null label so the same network also learns the unconditional model for CFG.
AdamW, warm-up + cosine learning rate, gradient clipping, and an exponential moving average of the weights,
which is what gets saved. Seeded: the same command on the same machine (and thread count) gives the same weights.
Time, measured (2,500 steps of batch 128, 2-core AMD EPYC VM, torch 2.13.0 CPU, 2026-11-23): ``--threads 2`` on idle
cores took 30 min 14 s wall (0.66-0.72 s/step), and its weights score like the shipped ones (100 % accuracy, FD 15.3
with ``python -m fastdiff eval``); the shipped weights took 54 minutes with 1 thread while other jobs kept both
cores busy (2 threads thrashed there). Thread count changes float summation order, so weights trained with a
different thread count are close but not bit-identical.

``--repa-weight`` adds representation alignment (:mod:`fastdiff.models.repa`; off by default, and 0 is the plain
loop bit for bit); ``--eval-every K --curve FILE`` writes the judge's FD and accuracy of the EMA weights every K
steps. Measured at 1,200 steps, REPA did not train faster here (docs/notes/repa.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff._atomic import atomic_write_text, check_writable
from fastdiff._checks import check_int, cli_int, cli_number
from fastdiff.models import digits, repa, repa_encoder
from fastdiff.models.lr_schedule import default_warmup, set_lr
from fastdiff.models.registry import WEIGHTS_DIR, save
from fastdiff.models.running_mean import running_mean


def alphas_cumprod(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> torch.Tensor:
    """``alpha_bar_t`` (float32, (T,)) of a diffusers ``DDPMScheduler`` with this schedule."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
    return sched.alphas_cumprod.float().clone()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over all parameters."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def optimizer_step_with_ema(opt, loss: torch.Tensor, params, ema_pairs, ema_decay: float, step: int) -> None:
    """Backward, gradients clipped to norm 1, one optimiser step, then every ``(ema, model)`` pair updated with the
    warm-started decay ``min(ema_decay, (1 + step) / (10 + step))`` (the text-to-image trainers' step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    for ema, model in ema_pairs:
        ema_update(ema, model, decay)


def train(steps: int = 2500, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, label_dropout: float = 0.1,
          ema_decay: float = 0.999, out: str | os.PathLike | None = None, save_every: int = 500,
          progress: bool = True, log_every: int = 100, command: str | None = None, repa_weight: float = 0.0,
          repa_encoder_dir: str | os.PathLike | None = None, repa_layer: str = repa.DEFAULT_LAYER,
          eval_every: int = 0, eval_per_class: int = 20, eval_steps: int = 10, curve: str | os.PathLike | None = None):
    """Train the digits teacher and save its EMA weights to ``out`` (default: the package's ``weights/digits``).
    ``command``: the command line recorded in the saved metadata (default: this module's, with ``sys.argv``).

    ``repa_weight`` (lambda >= 0): representation alignment (:mod:`fastdiff.models.repa`); 0 runs the plain loop,
    bit for bit. ``repa_encoder_dir``: the frozen encoder's folder (default: the shipped ``digits-repa-encoder``);
    ``repa_layer``: the UNet sub-module whose output is aligned (:data:`fastdiff.models.repa.LAYERS`).
    ``eval_every`` K > 0: every K steps (and at the end) score a copy of the EMA weights with the digits judge
    (:func:`evaluate_ema`: ``eval_per_class`` images per digit, ``eval_steps`` DPM-Solver++
    steps) and write the curve to ``curve`` (JSON). Evaluation draws from its own seeded streams, never from the
    training generator, and its time is not counted in ``train_s``.

    Returns the EMA :class:`LabelConditionedUNet`.
    """
    from tqdm.auto import tqdm

    out = Path(out) if out is not None else WEIGHTS_DIR / "digits"
    repa_weight = repa.check_weight(repa_weight)
    repa_layer = repa.check_layer(repa_layer)
    eval_every = check_int("eval_every", eval_every, minimum=0)
    curve = check_writable(curve, "file", what="--curve") if curve is not None else None
    encoder = repa_encoder.load(repa_encoder_dir) if repa_weight > 0 else None  # fails before any training
    torch.manual_seed(seed)
    x_all, y_all = digits.load_digits_tensors()
    n = x_all.shape[0]
    model = digits.build_model(seed)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    align = None
    if repa_weight > 0:  # hook + projector; the projector trains in the same optimizer (its own param group)
        align = repa.Alignment(model, encoder, layer=repa_layer, seed=seed)
        opt.add_param_group({"params": list(align.projector.parameters())})
    abar = alphas_cumprod(**digits.TRAIN_SCHEDULE)
    T = abar.shape[0]
    g = torch.Generator().manual_seed(seed)  # one generator drives data order, noise, timesteps, dropout
    perm, pos = torch.randperm(n, generator=g), 0
    meta = {
        "command": command or "python -m fastdiff.models.train_digits " + " ".join(sys.argv[1:]),
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "label_dropout": label_dropout,
        "ema_decay": ema_decay, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
    }
    if align is not None:
        meta.update(repa_weight=repa_weight, repa_layer=repa_layer)
    points: list[dict] = []
    eval_s = 0.0  # time spent scoring the curve, excluded from the training time
    align_avg = None
    t0 = time.time()
    bar = tqdm(range(steps), desc="train digits", disable=not progress, mininterval=2.0)
    avg = None
    for step in bar:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=g) < label_dropout] = model.null_label
        t = torch.randint(0, T, (len(y),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        set_lr(opt, step, steps, lr, default_warmup(steps, cap=100))
        target = a.sqrt() * eps - (1 - a).sqrt() * x0  # v-prediction (see digits.PREDICTION_TYPE)
        if align is None:  # the plain loop, unchanged
            loss = F.mse_loss(model(xt, t, y), target)
        else:
            diffusion_loss = F.mse_loss(model(xt, t, y), target)
            align_loss = align.loss(x0)
            loss = diffusion_loss + repa_weight * align_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if align is not None:
            torch.nn.utils.clip_grad_norm_(align.projector.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        if align is None:
            avg = running_mean(avg, loss.item())
            bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        else:  # ``avg`` stays the diffusion loss, comparable with a run without alignment
            avg = running_mean(avg, diffusion_loss.item())
            align_avg = running_mean(align_avg, align_loss.item())
            bar.set_postfix(loss=f"{avg:.4f}", align=f"{align_avg:.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            extra = f" align {align_avg:.4f}" if align is not None else ""
            print(f"step {step + 1}/{steps} loss {avg:.4f}{extra} elapsed {time.time() - t0:.0f}s", flush=True)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            te = time.time()
            point = {"step": step + 1, "train_s": round(te - t0 - eval_s, 1), "loss_ema": round(avg, 5),
                     **({"align_loss_ema": round(align_avg, 5)} if align is not None else {}),
                     **evaluate_ema(ema, eval_per_class, eval_steps, seed=seed)}
            eval_s += time.time() - te
            points.append(point)
            print(f"eval step {point['step']}: FD {point['fd']:.2f} accuracy {100 * point['accuracy']:.1f}% "
                  f"(train {point['train_s']:.0f}s, eval {time.time() - te:.0f}s)", flush=True)
            if curve is not None:
                atomic_write_text(curve, json.dumps({**meta, "eval_per_class": eval_per_class, "eval_steps": eval_steps,
                                                     "points": points}, indent=1) + "\n")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema, out, defaults=digits.TEACHER_DEFAULTS,
                 metadata={**meta, "steps_done": step + 1, "wall_s": round(time.time() - t0, 1)})
    if align is not None:
        align.remove()
        meta["final_align_loss_ema"] = round(align_avg, 5)
    meta["wall_s"] = round(time.time() - t0 - eval_s, 1)
    meta["steps_done"] = steps
    meta["final_loss_ema"] = round(avg, 5) if avg is not None else None
    save(ema, out, defaults=digits.TEACHER_DEFAULTS, metadata=meta)
    print(f"saved EMA weights to {out} after {steps} steps in {meta['wall_s']:.0f}s", flush=True)
    return ema


def evaluate_ema(ema: torch.nn.Module, num_per_class: int = 20, num_inference_steps: int = 10, seed: int = 0
                 ) -> dict:
    """``{"fd", "accuracy"}`` of a copy of ``ema`` judged by :func:`fastdiff.quality.evaluate.evaluate` with the
    model's default sampler and guidance (fixed noise per image, so every point of a curve sees the same noise)."""
    from fastdiff.quality.evaluate import evaluate

    r = evaluate(copy.deepcopy(ema).eval(), num_inference_steps=num_inference_steps, num_per_class=num_per_class,
                 seed=seed)
    return {"fd": round(r.fd, 3), "accuracy": round(r.accuracy, 4)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This trainer's options (its own parser's, and ``python -m fastdiff train digits``'s)."""
    p.add_argument("--steps", type=cli_int(1), default=2500)
    p.add_argument("--batch-size", type=cli_int(1), default=128)
    p.add_argument("--lr", type=cli_number(minimum=0.0), default=1e-3)
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--label-dropout", type=cli_number(0.0, 1.0), default=0.1)
    p.add_argument("--ema-decay", type=cli_number(0.0, 1.0), default=0.999)
    p.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output directory (default: the package's weights/digits)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--repa-weight", type=cli_number(minimum=0.0), default=0.0,
                   help="representation alignment weight lambda (0: off, the plain training; REPA's default 0.5)")
    p.add_argument("--repa-encoder", default=None,
                   help="folder of the frozen REPA encoder (default: the shipped digits-repa-encoder)")
    p.add_argument("--repa-layer", choices=repa.LAYERS, default=repa.DEFAULT_LAYER,
                   help="UNet block whose output is aligned")
    p.add_argument("--eval-every", type=cli_int(0), default=0,
                   help="score the EMA weights every K steps (FD, accuracy) and write --curve (0: never)")
    p.add_argument("--eval-per-class", type=cli_int(1), default=20, help="images per digit of each curve point")
    p.add_argument("--eval-steps", type=cli_int(1), default=10, help="sampler steps of each curve point")
    p.add_argument("--curve", default=None, help="JSON file for the quality curve (with --eval-every)")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    """Train with parsed options; ``command`` is recorded with the weights (see :func:`train`)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, label_dropout=a.label_dropout,
          ema_decay=a.ema_decay, out=a.out, progress=not a.no_progress, command=command,
          repa_weight=a.repa_weight, repa_encoder_dir=a.repa_encoder, repa_layer=a.repa_layer,
          eval_every=a.eval_every, eval_per_class=a.eval_per_class, eval_steps=a.eval_steps, curve=a.curve)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (also ``python -m fastdiff train digits``)."""
    p = argparse.ArgumentParser(prog="python -m fastdiff.models.train_digits", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
