"""The consistency student of the ``shapes`` text-to-image pipeline: ``python -m fastdiff train shapes-consistency``.

The digits consistency recipe with ``target="trajectory"`` (:mod:`fastdiff.distill.consistency`, whose math,
trajectory solver, trajectory cache and checkpoint check it reuses) on the text-to-image teacher, with the one-step
student's choice of networks (:mod:`fastdiff.distill.text_student`: copies of the teacher's UNet *and* text
encoder, trained jointly):

1. trajectories, solved once and cached in ``OUT/trajectories.pt`` (sha256 recorded in the checkpoint): caption
   ``i`` of the teacher's own training stream (:func:`fastdiff.distill.text_triplets.caption_of`), a seeded noise
   latent and a guidance scale ``g_i ~ U[guidance_min, guidance_max]``; the teacher's guided ODE solved with DDIM
   (eta 0) down the LCM grid of ``grid_steps`` points, one 2B call per step (empty prompt first, as
   ``StableDiffusionPipeline.encode_prompt`` makes the unconditional branch), every grid point kept;
2. the student: the teacher's UNet with a guidance input (``time_cond_proj_dim``, zero-initialised: step 0 is the
   teacher's conditional model) and a copy of its text encoder; ``f(x, t, g) = c_skip(t) x + c_out(t) x0(unet)``
   (LCM's boundary parametrisation, ``f(x, 0) = x``); per example a random grid point of a random trajectory::

       loss = mean((f_student(x_{t_n}, t_n, g, text_student(ids)) - end)^2)

3. AdamW, linear warm-up then a constant learning rate (so a finished run can be extended with more ``--steps``),
   gradient clipping, an EMA of both networks (what is saved); the batch of step ``s`` (trajectories and grid
   points) is drawn by a generator seeded by ``(seed, s)``, so a run resumed from ``OUT/checkpoint.pt`` continues
   bit for bit (same thread count);
4. saved with :func:`fastdiff.models.shapes.pipeline.save_components` into ``OUT``: an ordinary
   ``StableDiffusionPipeline`` folder with diffusers' ``LCMScheduler``, which ``fastdiff.Sampler`` runs with one
   UNet call per step (the guidance as ``timestep_cond``, no CFG batch); ``limits`` (steps, guidance range) and
   ``wall_s`` (trajectories + training) in the UNet config's ``_fastdiff``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, check_writable
from fastdiff._checks import check_int, check_number, cli_int, cli_number
from fastdiff.distill import consistency as C
from fastdiff.errors import InvalidInput
from fastdiff.models.running_mean import running_mean

NAME = "shapes-consistency"
TARGET = "trajectory"
#: the most inference steps the saved student allows: the step counts its quality was measured at (1, 2, 4); LCM
#: students stop improving after a few steps (each step re-noises), see docs/notes/shapes-consistency.md
MAX_INFERENCE_STEPS = 4
DEFAULT_STEPS = 4


@dataclass
class ShapesConsistencySpec:
    """Everything that decides the trained weights (checked against a checkpoint on resume; only ``steps``,
    ``checkpoint_every`` and ``log_every`` may change, :data:`fastdiff.distill.consistency.RESUMABLE_CHANGES`)."""

    teacher: str = "shapes"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 100
    seed: int = 0
    # a narrow range around the teacher's CFG 5: a short run learns the guidance input only where it has data
    guidance_min: float = 4.0
    guidance_max: float = 6.0
    grid_steps: int = 10  # N of the LCM grid (k = T / N = 100): the lcm scheduler's original_inference_steps
    ema_decay: float = 0.995
    cond_dim: int = 32  # width of the guidance embedding (time_cond_proj_dim), as digits-consistency
    num_trajectories: int = 3072
    caption_seed: int = 0  # the teacher's training stream whose captions the trajectories use
    p_two: float = 0.5  # share of two-object captions (the teacher's stream)
    target: str = TARGET
    checkpoint_every: int = 100
    log_every: int = 100

    def check(self) -> None:
        if self.target != TARGET:
            raise InvalidInput(f"the shapes consistency student learns target {TARGET!r} only, got {self.target!r}")
        for name in ("steps", "batch_size", "grid_steps", "num_trajectories"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup", "checkpoint_every", "log_every", "caption_seed"):
            check_int(name, getattr(self, name), 0)
        check_int("cond_dim", self.cond_dim, 4)
        check_int("seed", self.seed)
        check_number("lr", self.lr, 0.0)
        check_number("ema_decay", self.ema_decay, 0.0, 1.0)
        check_number("p_two", self.p_two, 0.0, 1.0)
        lo = check_number("guidance_min", self.guidance_min, 1.0, hint="guidance 1 means no guidance")
        check_number("guidance_max", self.guidance_max, lo, hint="the range is [guidance_min, guidance_max]")


def trajectory_settings(spec: ShapesConsistencySpec) -> dict:
    """What decides the trajectories' numbers (recorded in the cache and compared on every load)."""
    return {"teacher": spec.teacher, "seed": spec.seed, "num_trajectories": spec.num_trajectories,
            "grid_steps": spec.grid_steps, "guidance": [spec.guidance_min, spec.guidance_max],
            "caption_seed": spec.caption_seed, "p_two": spec.p_two}


def teacher_schedule(pipe) -> tuple[dict, str, torch.Tensor]:
    """``(scheduler config, prediction type, alphas_cumprod (T,) float32)`` of the teacher pipeline."""
    sched = dict(pipe.scheduler.config)
    return sched, sched.get("prediction_type", "epsilon"), pipe.scheduler.alphas_cumprod.float().clone()


@torch.no_grad()
def text_features(text_encoder, input_ids: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``text_encoder(ids)[0]`` (the per-token features the UNet attends to) in batches."""
    return torch.cat([text_encoder(input_ids[i:i + batch_size])[0] for i in range(0, len(input_ids), batch_size)])


def text_guided_output(unet, uncond: torch.Tensor):
    """``guided(x, t, text_features, g)`` for :func:`~fastdiff.distill.consistency.guided_ddim_trajectories`: one
    2B UNet call (the empty prompt's features ``uncond`` (1, L, D) first, as the pipeline batches CFG)."""
    def guided(x, t, cond, g):
        both = torch.cat([uncond.expand(len(x), -1, -1), cond])
        m_u, m_c = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both).sample.chunk(2)
        return m_u + g.view(-1, 1, 1, 1) * (m_c - m_u)

    return guided


def make_trajectories(spec: ShapesConsistencySpec, pipe, progress: bool = False) -> dict:
    """Solve the teacher's guided ODE for the spec's trajectories (deterministic: same numbers every time)."""
    from fastdiff.distill.text_triplets import caption_of
    from fastdiff.models.generate import make_noise, stream_seed
    from fastdiff.models.shapes.train_unet import tokenize

    _, pred, abar = teacher_schedule(pipe)
    grid = C.grid_timesteps(len(abar), spec.grid_steps)
    idx = torch.arange(spec.num_trajectories)
    base = stream_seed(spec.seed, "trajectories")
    cfg = pipe.unet.config
    noise = make_noise(base, idx, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    g = torch.Generator().manual_seed(base)
    guidance = spec.guidance_min + (spec.guidance_max - spec.guidance_min) * torch.rand(len(idx), generator=g)
    ids = tokenize(pipe.tokenizer, [caption_of(spec.caption_seed, i, spec.p_two) for i in idx.tolist()])
    unet, text = pipe.unet.float().eval(), pipe.text_encoder.float().eval()
    cond = text_features(text, ids)
    uncond = text_features(text, tokenize(pipe.tokenizer, [""]))
    t0 = time.time()
    points, ends = C.guided_ddim_trajectories(text_guided_output(unet, uncond), noise, cond, guidance, grid, abar,
                                              pred, progress=progress)
    return {"format": C.TRAJECTORIES_FORMAT, "settings": trajectory_settings(spec), "points": points, "ends": ends,
            "input_ids": ids, "guidance": guidance, "solve_s": round(time.time() - t0, 1)}


def load_or_make_trajectories(spec: ShapesConsistencySpec, pipe, out: Path, expected_sha256: str | None,
                              progress: bool) -> tuple[dict, str]:
    """``out/trajectories.pt`` when it holds these settings' trajectories (and the sha256 a checkpoint recorded),
    else solved again and written atomically; returns the tensors and the file's sha256."""
    path = out / C.TRAJECTORIES
    cached = C.read_cached_trajectories(path, trajectory_settings(spec), expected_sha256)
    if cached is not None:
        return cached
    data = make_trajectories(spec, pipe, progress)
    return data, C.write_trajectories(path, data)


def init_student(pipe, cond_dim: int):
    """Trainable float32 copies of the teacher's UNet (with a zero-initialised guidance input) and text encoder."""
    unet = C.guidance_conditioned_copy(pipe.unet, cond_dim).train().requires_grad_(True)
    text = copy.deepcopy(pipe.text_encoder).float().train().requires_grad_(True)
    return unet, text


def student_consistency(unet, text_encoder, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor,
                        guidance: torch.Tensor, cond_dim: int, abar: torch.Tensor, prediction_type: str):
    """The student's ``f(x, t, g)``: one UNet call with the guidance embedding as ``timestep_cond``."""
    from fastdiff.models.folded_guidance import guidance_scale_embedding

    w = guidance_scale_embedding(guidance - 1.0, cond_dim)
    m = unet(x, t, encoder_hidden_states=text_encoder(input_ids)[0], timestep_cond=w).sample
    return C.boundary_output(m, x, t, abar, prediction_type)


def batch_of_step(seed: int, step: int, num_trajectories: int, batch_size: int, grid_steps: int):
    """``(trajectory indices, grid indices)`` of training step ``step``, drawn with replacement by a generator of
    ``(seed, step)``: the data stream is indexed by step, so a resumed run draws what an uninterrupted one would."""
    from fastdiff.models.generate import sample_seed

    gen = torch.Generator().manual_seed(sample_seed(seed, step))
    rows = torch.randint(num_trajectories, (batch_size,), generator=gen)
    return rows, torch.randint(grid_steps, (batch_size,), generator=gen)


def other_objective(out: Path) -> str | None:
    """What ``out`` holds when it is another trainer's output (a one-step student pipeline, or its checkpoint),
    else None: a consistency run there would mix or overwrite it."""
    from fastdiff.distill import text_student

    cfg_path = out / "unet" / "config.json"
    if cfg_path.is_file():
        try:
            meta = json.loads(cfg_path.read_text()).get("_fastdiff") or {}
        except (OSError, ValueError, AttributeError):
            meta = {}
        if meta.get("objective") not in (None, C.OBJECTIVE):
            return str(meta["objective"])
        if meta.get("objective") is None and (meta.get("limits") or {}).get("max_inference_steps") == 1:
            return "triplet-regression (shapes-onestep)"
        if meta.get("objective") is None and "command" in meta:
            return "the teacher's diffusion loss (train shapes)"
    ck = out / C.CHECKPOINT
    if ck.is_file():
        try:
            fmt = torch.load(io.BytesIO(ck.read_bytes()), map_location="cpu", weights_only=True).get("format")
        except Exception:  # damaged: read_checkpoint names it
            return None
        if fmt == text_student.CHECKPOINT_FORMAT:
            return "triplet-regression (a `train shapes-onestep` checkpoint)"
    return None


def _save_checkpoint(path: Path, spec, step, unet, text, unet_ema, text_ema, opt, avg, wall, traj_sha) -> None:
    buf = io.BytesIO()
    torch.save({"format": C.CHECKPOINT_FORMAT, "objective": C.OBJECTIVE, "settings": C._settings(spec),
                "step": step, "unet": unet.state_dict(), "text_encoder": text.state_dict(),
                "unet_ema": unet_ema.state_dict(), "text_encoder_ema": text_ema.state_dict(),
                "optimizer": opt.state_dict(), "loss_avg": avg, "wall_s": wall, "trajectories_sha256": traj_sha,
                "threads": torch.get_num_threads()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def student_scheduler_config(teacher_scheduler: dict, grid_steps: int) -> dict:
    """diffusers' ``LCMScheduler`` on the teacher's schedule (``steps_offset`` 1: StableDiffusionPipeline rewrites
    other values with a warning on every load; LCM does not read it)."""
    return {**C.lcm_scheduler_config(teacher_scheduler, grid_steps), "steps_offset": 1}


def train(spec: ShapesConsistencySpec, out: str | os.PathLike, pipe=None, progress: bool = True,
          command: str | None = None, stop_after: int | None = None):
    """Distil ``spec.teacher`` (or the loaded pipeline ``pipe``) into a consistency student in ``out`` (a pipeline
    folder plus ``trajectories.pt`` and ``checkpoint.pt``); resumes from ``out/checkpoint.pt`` when there is one.
    ``stop_after`` (testing): return after that many steps of this call, as a crash would. Returns the UNet config's
    ``_fastdiff`` metadata."""
    from tqdm.auto import tqdm

    from fastdiff.models.shapes import pipeline as P
    from fastdiff.models.train_digits import optimizer_step_with_ema

    spec.check()
    out = Path(out)
    check_writable(out, "dir", what="--out")
    other = other_objective(out)
    if other is not None:
        raise InvalidInput(f"{out} holds the output of another objective ({other}); a consistency run would resume "
                           "from or overwrite it: use another --out")
    ck_path = out / C.CHECKPOINT
    ck = C.read_checkpoint(ck_path, spec) if ck_path.exists() else None
    if ck is not None and "unet" not in ck:
        raise InvalidInput(f"{ck_path} is a consistency checkpoint of a label-conditioned model (digits), not of a "
                           "text-to-image pipeline; use another --out")
    if pipe is None:
        from fastdiff.models import load_pipeline

        pipe = load_pipeline(spec.teacher)
    pipe.unet.float().eval().requires_grad_(False)
    pipe.text_encoder.float().eval().requires_grad_(False)
    sched, pred, abar = teacher_schedule(pipe)
    if len(abar) % spec.grid_steps:
        raise InvalidInput(f"grid_steps={spec.grid_steps} must divide the teacher's {len(abar)} training timesteps")
    grid = C.grid_timesteps(len(abar), spec.grid_steps)
    data, traj_sha = load_or_make_trajectories(spec, pipe, out, None if ck is None else ck["trajectories_sha256"],
                                               progress)

    torch.manual_seed(spec.seed)
    unet, text = init_student(pipe, spec.cond_dim)
    unet_ema = copy.deepcopy(unet).eval().requires_grad_(False)
    text_ema = copy.deepcopy(text).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.99))
    start, avg, wall0 = 0, None, float(data.get("solve_s", 0.0))  # the wall time includes solving the data
    if ck is not None:
        for module, key in ((unet, "unet"), (text, "text_encoder"), (unet_ema, "unet_ema"),
                            (text_ema, "text_encoder_ema")):
            module.load_state_dict(ck[key])
        opt.load_state_dict(ck["optimizer"])
        start, avg, wall0 = int(ck["step"]), ck["loss_avg"], float(ck["wall_s"])
        if progress:
            print(f"resuming from {ck_path} at step {start}", flush=True)
    limits = {"max_inference_steps": min(MAX_INFERENCE_STEPS, spec.grid_steps),
              "guidance_scale": [spec.guidance_min, spec.guidance_max],
              "why_max_steps": "the most steps its quality was measured at"}
    defaults = {"num_inference_steps": min(DEFAULT_STEPS, spec.grid_steps),
                "guidance_scale": min(max(5.0, spec.guidance_min), spec.guidance_max)}
    meta = {"objective": C.OBJECTIVE, **asdict(spec), "teacher": spec.teacher,
            "command": command or f"python -m fastdiff train {NAME}", "trajectories_s": data.get("solve_s"),
            "limits": limits, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    points, ends, ids, guidance = data["points"], data["ends"], data["input_ids"], data["guidance"]

    def save_all(step_done: int) -> dict:
        wall = round(wall0 + time.time() - t0, 1)
        _save_checkpoint(ck_path, spec, step_done, unet, text, unet_ema, text_ema, opt, avg, wall, traj_sha)
        m = {**meta, "steps_done": step_done, "wall_s": wall, "loss_ema": None if avg is None else round(avg, 6)}
        P.save_components(unet_ema, text_ema, out, m, scheduler_config=student_scheduler_config(sched,
                          spec.grid_steps), defaults=defaults)
        return m

    t0 = time.time()
    done_here = 0
    bar = tqdm(range(start, spec.steps), desc=f"distill {NAME}", disable=not progress, mininterval=2.0,
               initial=start, total=spec.steps)
    for step in bar:
        rows, k = batch_of_step(spec.seed, step, len(ends), spec.batch_size, spec.grid_steps)
        for grp in opt.param_groups:
            grp["lr"] = spec.lr * min(1.0, (step + 1) / max(1, spec.warmup))
        f = student_consistency(unet, text, points[rows, k], grid[k], ids[rows], guidance[rows], spec.cond_dim, abar,
                                pred)
        loss = torch.nn.functional.mse_loss(f, ends[rows])
        optimizer_step_with_ema(opt, loss, params, ((unet_ema, unet), (text_ema, text)), spec.ema_decay, step)
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.5f}", refresh=False)
        if spec.log_every and (step + 1) % spec.log_every == 0:
            print(f"step {step + 1}/{spec.steps} loss {avg:.5f} elapsed {wall0 + time.time() - t0:.0f}s", flush=True)
        done_here += 1
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            save_all(step + 1)
        if stop_after is not None and done_here >= stop_after:
            return None
    m = save_all(max(start, spec.steps))
    if progress:
        print(f"saved the {NAME} student to {out} ({m['steps_done']} steps, {m['wall_s']:.0f}s with the "
              "trajectories)", flush=True)
    return m


# ----- CLI: python -m fastdiff train shapes-consistency ----------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ShapesConsistencySpec()
    p.add_argument("--teacher", default=d.teacher, help="the teacher pipeline: 'shapes' or a folder")
    p.add_argument("--out", default=f"runs/{NAME}", help="the student's pipeline folder, with trajectories.pt and "
                   "checkpoint.pt (the same command resumes from it)")
    p.add_argument("-n", "--num-trajectories", type=cli_int(1), default=d.num_trajectories)
    p.add_argument("--steps", type=cli_int(1), default=d.steps)
    p.add_argument("--batch-size", type=cli_int(1), default=d.batch_size)
    p.add_argument("--lr", type=cli_number(minimum=0.0), default=d.lr)
    p.add_argument("--warmup", type=cli_int(0), default=d.warmup)
    p.add_argument("--ema-decay", type=cli_number(0.0, 1.0), default=d.ema_decay)
    p.add_argument("--guidance-min", type=cli_number(minimum=1.0), default=d.guidance_min)
    p.add_argument("--guidance-max", type=cli_number(minimum=1.0), default=d.guidance_max)
    p.add_argument("--grid-steps", type=cli_int(1), default=d.grid_steps, help="points of the LCM grid")
    p.add_argument("--cond-dim", type=cli_int(4), default=d.cond_dim, help="width of the guidance embedding")
    p.add_argument("--seed", type=cli_int(None), default=d.seed, help="noise, guidance and the training stream")
    p.add_argument("--checkpoint-every", type=cli_int(0), default=d.checkpoint_every)
    p.add_argument("--log-every", type=cli_int(0), default=d.log_every)
    p.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = ShapesConsistencySpec(
        teacher=a.teacher, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, seed=a.seed,
        guidance_min=a.guidance_min, guidance_max=a.guidance_max, grid_steps=a.grid_steps, ema_decay=a.ema_decay,
        cond_dim=a.cond_dim, num_trajectories=a.num_trajectories, checkpoint_every=a.checkpoint_every,
        log_every=a.log_every)
    spec.check()  # before loading anything
    train(spec, a.out, progress=not a.no_progress, command=command)
    return 0


__all__ = ["ShapesConsistencySpec", "batch_of_step", "init_student", "load_or_make_trajectories",
           "make_trajectories", "other_objective", "student_consistency", "text_guided_output", "train"]
