"""The one-step student of the ``shapes`` text-to-image pipeline: ``python -m fastdiff train shapes-onestep``.

The recipe of :mod:`fastdiff.distill.train` (the digits student) with text prompts:

1. triplets (prompt, noise latent, teacher latent) from :mod:`fastdiff.distill.text_triplets` (the teacher at its
   defaults, 20 DPM-Solver++ steps at CFG 5), generated into ``WORK/triplets`` (resumable) unless already there;
2. the student is a copy of the teacher's UNet and text encoder, called once at the last training timestep
   ``T - 1`` on the starting noise, trained by MSE to the teacher's final latent::

       loss = mean((unet(z, T - 1, text_encoder(ids)) - teacher_latent(z, prompt))^2)

   The guidance is folded in: the targets were made at CFG 5, the student runs at guidance 1 (one network call,
   no unconditional batch). Initialisation as the digits student: the UNet's output layer scaled by
   ``-sqrt(1 - a_T)`` turns the teacher's v-prediction at ``T - 1`` into its one-step x0 guess, so training starts
   from the teacher's blurry guess rather than from noise (:func:`init_student`).
   The text encoder is fine-tuned jointly (79k parameters, ~2 % of the step's time): CFG at 5 pushes the
   conditional direction of the prompt embedding, and a student whose text features may move can absorb that
   push where a frozen encoder leaves it all to the UNet;
3. AdamW, warm-up + cosine learning rate, gradient clipping, an EMA of both networks (what is saved). Batch ``s``
   holds the triplets drawn by a generator seeded by ``(seed, s)`` (with replacement), so the data stream is
   indexed by step: ``--resume`` from ``WORK/checkpoint.pt`` continues bit-for-bit with the same thread count;
4. saved with :func:`fastdiff.models.shapes.pipeline.save_components` to ``OUT`` (default the package's
   ``weights/shapes-onestep``): ``unet`` + ``text_encoder`` in float16, ``scheduler`` the one-step DDIM config
   (:func:`fastdiff.distill.train.onestep_scheduler_config`: at one step diffusers returns the model output), the
   defaults 1 step / guidance 1 and the limits (at most 1 step, guidance 1), a manifest of sha256; the VAE and
   tokenizer are the teacher's (shared, not copied).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff._atomic import atomic_write_bytes, check_writable
from fastdiff._checks import cli_int, cli_number
from fastdiff.distill.text_triplets import TextTripletSpec
from fastdiff.distill.train import onestep_scheduler_config, output_x0_at_last_step
from fastdiff.distill.triplets import load_triplets
from fastdiff.errors import InvalidInput
from fastdiff.models.generate import sample_seed
from fastdiff.models.lr_schedule import default_warmup, set_lr
from fastdiff.models.registry import WEIGHTS_DIR
from fastdiff.models.running_mean import running_mean
from fastdiff.models.train_digits import optimizer_step_with_ema

NAME = "shapes-onestep"
STUDENT_DIR = WEIGHTS_DIR / NAME
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastdiff.shapes_onestep_checkpoint"
DEFAULTS: dict = {"num_inference_steps": 1, "guidance_scale": 1.0}
#: what the student supports (checked by fastdiff.Sampler): it learned the 20-step CFG-5 result in one call at
#: ``T - 1``; a second DDIM step would feed it a partly denoised latent at a timestep it never saw, and CFG > 1 an
#: unconditional branch it never learned
LIMITS: dict = {"max_inference_steps": 1, "guidance_scale": [1.0, 1.0],
                "why_max_steps": "a one-step student: trained only at the last timestep, on pure noise"}


def student_scheduler_config(teacher_scheduler: dict) -> dict:
    """The student's scheduler: the one-step DDIM config of the teacher's schedule, with ``steps_offset`` 1:
    ``StableDiffusionPipeline`` rewrites any other value to 1 with a FutureWarning on every load, and trailing
    spacing does not read it (one step is ``t = 999`` either way)."""
    return {**onestep_scheduler_config(teacher_scheduler), "steps_offset": 1}


def init_student(unet, text_encoder, teacher_scheduler: dict):
    """Trainable float32 copies of the teacher's ``unet`` / ``text_encoder``; the UNet's output at ``T - 1`` is
    the teacher's one-step x0 estimate (for a v-prediction teacher, ``conv_out`` scaled by ``-sqrt(1 - a_T)``)."""
    pred = teacher_scheduler.get("prediction_type", "epsilon")
    if pred not in ("v_prediction", "sample"):
        raise InvalidInput(f"the one-step student needs a v- or sample-prediction teacher, this one predicts "
                           f"{pred!r}")
    s_unet = copy.deepcopy(unet).float().train().requires_grad_(True)
    s_text = copy.deepcopy(text_encoder).float().train().requires_grad_(True)
    output_x0_at_last_step(s_unet, teacher_scheduler)
    return s_unet, s_text


def student_latents(unet, text_encoder, noise: torch.Tensor, input_ids: torch.Tensor, t_last: int) -> torch.Tensor:
    """The student's output: one call at ``t_last`` on ``noise`` with the prompts' text features."""
    cond = text_encoder(input_ids)[0]
    t = torch.full((noise.shape[0],), t_last, dtype=torch.long, device=noise.device)
    return unet(noise, t, cond).sample


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    """The triplets of training step ``step`` (drawn with replacement by a generator of ``(seed, step)``)."""
    return torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(sample_seed(seed, step)))


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def train(pipe, triplets: dict, out: str | os.PathLike, work: str | os.PathLike, steps: int = 2000,
          batch_size: int = 64, lr: float = 3e-4, ema_decay: float = 0.995, seed: int = 0, resume: bool = False,
          save_every: int = 250, progress: bool = True, log_every: int = 100, metadata: dict | None = None,
          fail_after: int | None = None):
    """Train the student of ``pipe`` (the teacher pipeline) on loaded ``triplets`` (``input_ids``, ``noise``,
    ``latent``); write it to ``out`` and checkpoints to ``work/checkpoint.pt``. Returns ``(unet_ema, text_ema,
    metadata)``. ``fail_after`` (testing): raise ``SystemExit(17)`` after the first checkpoint at or past that
    step, as a crash would."""
    from tqdm.auto import tqdm

    from fastdiff.models.shapes import pipeline as P

    out, work = Path(out), Path(work)
    check_writable(out, "dir", what="--out")
    check_writable(work, "dir", what="--work")
    ckpt = work / CHECKPOINT
    if resume and not ckpt.is_file():
        raise InvalidInput(f"--resume: there is no checkpoint {ckpt} to resume from")
    z, ids, x0 = triplets["noise"].float(), triplets["input_ids"].long(), triplets["latent"].float()
    n = z.shape[0]
    if n == 0 or z.shape != x0.shape or ids.shape[0] != n:
        raise InvalidInput(f"triplets must hold N > 0 noises, latents and token ids, got {tuple(z.shape)}, "
                           f"{tuple(x0.shape)} and {tuple(ids.shape)}")
    teacher_sched = dict(pipe.scheduler.config)
    torch.manual_seed(seed)
    unet, text = init_student(pipe.unet, pipe.text_encoder, teacher_sched)
    unet_ema = copy.deepcopy(unet).eval().requires_grad_(False)
    text_ema = copy.deepcopy(text).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    t_last = int(teacher_sched.get("num_train_timesteps", 1000)) - 1
    start, spent = 0, 0.0
    meta = {"command": "python -m fastdiff train shapes-onestep " + " ".join(sys.argv[2:]), "teacher": "shapes",
            "num_triplets": n, "steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
            "seed": seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", **(metadata or {})}
    if resume:
        state = torch.load(ckpt, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise InvalidInput(f"{ckpt} is not a checkpoint of `train shapes-onestep` (another trainer's?)")
        for module, key in ((unet, "unet"), (text, "text_encoder"), (unet_ema, "unet_ema"),
                            (text_ema, "text_encoder_ema")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        start, spent = int(state["step"]), float(state["meta"].get("wall_s", 0.0))
        if start >= steps:
            raise InvalidInput(f"--resume: the checkpoint is at step {start}; ask for more --steps than that")
        meta["resumed_from"] = state["meta"].get("resumed_from", []) + [start]

    def checkpoint(step: int) -> None:
        _save_checkpoint(ckpt, {
            "format": CHECKPOINT_FORMAT, "unet": unet.state_dict(), "text_encoder": text.state_dict(),
            "unet_ema": unet_ema.state_dict(), "text_encoder_ema": text_ema.state_dict(), "opt": opt.state_dict(),
            "step": step, "meta": {**meta, "wall_s": spent + time.time() - t0}})

    t0 = time.time()
    avg = None
    bar = tqdm(range(start, steps), desc="distill shapes-onestep", initial=start, total=steps,
               disable=not progress, mininterval=2.0)
    for step in bar:
        idx = batch_indices(seed, step, n, batch_size)
        set_lr(opt, step, steps, lr, default_warmup(steps, cap=100))
        loss = F.mse_loss(student_latents(unet, text, z[idx], ids[idx], t_last), x0[idx])
        optimizer_step_with_ema(opt, loss, params, ((unet_ema, unet), (text_ema, text)), ema_decay, step)
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {avg:.5f} elapsed {spent + time.time() - t0:.0f}s", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
            if fail_after is not None and step + 1 >= fail_after:
                raise SystemExit(17)
    meta["wall_s"] = round(spent + time.time() - t0, 1)
    meta["final_loss_ema"] = None if avg is None else round(avg, 5)
    meta["limits"] = LIMITS
    P.save_components(unet_ema, text_ema, out, meta, scheduler_config=student_scheduler_config(teacher_sched),
                      defaults=DEFAULTS)
    checkpoint(steps)
    if progress:
        print(f"saved the shapes-onestep student to {out} after {steps} steps ({meta['wall_s']:.0f}s)", flush=True)
    return unet_ema, text_ema, meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TextTripletSpec()
    p.add_argument("--teacher", default="shapes", help="the teacher pipeline: 'shapes' or a folder")
    p.add_argument("--work", default="runs/shapes-onestep", help="triplets (WORK/triplets) and the checkpoint")
    p.add_argument("--out", default=None, help="the student's pipeline folder (default: the package's "
                   "weights/shapes-onestep)")
    p.add_argument("-n", "--num-triplets", type=cli_int(1), default=d.num_samples)
    p.add_argument("--shard-size", type=cli_int(1), default=d.shard_size)
    p.add_argument("--steps", type=cli_int(1), default=2000)
    p.add_argument("--batch-size", type=cli_int(1), default=64)
    p.add_argument("--lr", type=cli_number(minimum=0.0), default=3e-4)
    p.add_argument("--ema-decay", type=cli_number(0.0, 1.0), default=0.995)
    p.add_argument("--seed", type=cli_int(None), default=0, help="noise of the triplets and the training stream")
    p.add_argument("--save-every", type=cli_int(0), default=250, help="checkpoint period in steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the training from WORK/checkpoint.pt "
                   "(the triplets resume by themselves)")
    p.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    from fastdiff.distill import text_triplets
    from fastdiff.models import load_pipeline

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out is not None else STUDENT_DIR
    check_writable(out, "dir", what="--out")  # before hours of work, not when saving its result
    spec = TextTripletSpec(teacher=a.teacher, num_samples=a.num_triplets, shard_size=a.shard_size, seed=a.seed)
    pipe = load_pipeline(a.teacher)
    t0 = time.time()
    merged = text_triplets.run(spec, Path(a.work) / "triplets", pipe=pipe, progress=not a.no_progress)
    gen_s = time.time() - t0
    train(pipe, load_triplets(merged), out, a.work, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
          ema_decay=a.ema_decay, seed=a.seed, resume=a.resume, save_every=a.save_every, progress=not a.no_progress,
          metadata={"command": command or "python -m fastdiff train shapes-onestep", "triplets": str(merged),
                    "triplet_spec": {k: v for k, v in vars(spec).items()}, "triplets_wall_s_this_run": round(gen_s, 1)})
    return 0
