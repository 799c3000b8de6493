"""Consistency distillation with classifier-free guidance folded in (LCM: latent consistency distillation).

The student ``f(x_t, t, w)`` maps any point of the teacher's guided probability-flow ODE trajectory to its end.
It is a copy of the teacher's network with one new input, the guidance scale: ``UNet2DConditionModel``'s
``time_cond_proj_dim`` (a sinusoidal embedding of ``w = g - 1``, projected and added to the timestep features;
:mod:`fastdiff.models.folded_guidance`). The projection starts at zero, so step 0 is the teacher. Per training
example (Luo et al., 2023, Algorithm 1, with a DDIM solver)::

    t      = (n + 1) k - 1,  n ~ U{0..N-1}       (the skipping-step grid of N points, k = T / N)
    t'     = max(t - k, 0)
    g      ~ U[g_min, g_max]                     (guidance scale, standard CFG convention)
    x_t    = sqrt(a_t) x0 + sqrt(1 - a_t) eps    (x0: a real training image)
    m      = m_u + g (m_c - m_u)                 (teacher, one 2B batch: null label, then the label)
    x_t'   = sqrt(a_t') x0(m) + sqrt(1 - a_t') eps(m)              (one DDIM step of the teacher's guided ODE)
    target = f_target(x_t', t', g)               (EMA "target" copy of the student, no gradient)
    loss   = pseudo_huber(f_student(x_t, t, g) - target)

with the consistency-model boundary parametrisation ``f(x, t) = c_skip(t) x + c_out(t) x0(model(x, t, g))``,
``c_skip = s_d^2 / ((10 t)^2 + s_d^2)``, ``c_out = 10 t / sqrt((10 t)^2 + s_d^2)``, ``s_d = 0.5``: at ``t = 0``
``c_skip = 1`` and ``c_out = 0`` exactly, so ``f(x, 0) = x`` whatever the network says. These are the numbers
fastdiff's (and diffusers') ``lcm`` scheduler uses, so the saved student samples with it in 1..N steps.

``target="trajectory"`` learns the same function from the other side: the teacher's guided ODE is solved once,
ahead of training, from ``num_trajectories`` noises (DDIM on the same grid, per-trajectory label and guidance
scale), and the student regresses every recorded point of a trajectory onto its end (mean squared error)::

    x_{t_N-1} = noise,  x_{t_n-1} = DDIM(x_{t_n}),  end = x0 at the last grid point    (teacher, no gradient)
    loss      = mean((f_student(x_{t_n}, t_n, g) - end)^2),   (trajectory, n) drawn uniformly

This is the consistency function's definition used directly (as the one-step triplet student does at t = T - 1
only), with no bootstrapped target: on the digits model the bootstrapped objective plateaued (FD 47 at 4 steps),
see the README's fast-models section for both.

Training is seeded (one generator drives data order, timesteps, guidance and noise), shows a progress bar and
writes ``checkpoint.pt`` into ``out`` every ``checkpoint_every`` steps (student, target, optimiser, generator
state, data order); the same command resumes from it and continues bit for bit (the learning rate is constant
after a warm-up, so a run can also be extended with a larger ``steps``). A checkpoint of another objective or
other settings is refused with the difference named.
"""

from __future__ import annotations

import copy
import io
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, check_writable
from fastdiff._checks import check_int, check_number
from fastdiff.errors import InvalidInput
from fastdiff.models.folded_guidance import guidance_scale_embedding
from fastdiff.models.running_mean import running_mean
from fastdiff.models.train_digits import ema_update

OBJECTIVE = "consistency"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastdiff.distill.checkpoint"
#: consistency-model boundary parametrisation: data standard deviation, and LCM's timestep scaling (its value in
#: diffusers' LCMScheduler and train_lcm_distill scripts).
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
#: The most inference steps a saved student allows. It is trained on all 50 grid points, but LCM-style students
#: stop improving after a few steps (the per-step re-noising adds back what the extra steps would refine); 8 is
#: the most this project measured (see docs/notes/consistency.md), so asking for more is refused, not guessed.
MAX_INFERENCE_STEPS = 8
#: the two training targets: LCM's bootstrapped self-consistency, or regression onto precomputed teacher trajectories
TARGETS = ("bootstrap", "trajectory")
TRAJECTORIES = "trajectories.pt"
TRAJECTORIES_FORMAT = "fastdiff.distill.trajectories"
#: settings a resumed run may change: how long it runs and how often it saves or prints.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")


@dataclass
class ConsistencySpec:
    """Everything that decides the trained weights (checked against a checkpoint on resume)."""

    teacher: str = "digits"
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 50
    seed: int = 0
    guidance_min: float = 1.0
    guidance_max: float = 3.0
    # N: the skipping-step grid (LCM's original_inference_steps). LCM uses 50 (k = 20) over thousands of steps; a
    # short run propagates consistency from t = 0 to T - 1 in fewer hops with 10 (k = 100), and the teacher's DDIM
    # at 10 steps is accurate (FD 10.1 in docs/sweep.md)
    grid_steps: int = 10
    target_decay: float = 0.95  # EMA of the target network (LCM's mu)
    huber_c: float = 0.001
    cond_dim: int = 32  # width of the guidance embedding (time_cond_proj_dim)
    target: str = "bootstrap"  # TARGETS
    num_trajectories: int = 4096  # teacher trajectories solved ahead of training (target "trajectory")
    checkpoint_every: int = 100
    log_every: int = 100

    def check(self) -> None:
        if self.target not in TARGETS:
            raise InvalidInput(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        for name in ("steps", "batch_size", "grid_steps", "cond_dim", "num_trajectories"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name), 0)
        check_int("seed", self.seed)
        check_number("lr", self.lr, 0.0)
        check_number("huber_c", self.huber_c, 0.0)
        check_number("target_decay", self.target_decay, 0.0, 1.0)
        lo = check_number("guidance_min", self.guidance_min, 1.0, hint="guidance 1 means no guidance")
        check_number("guidance_max", self.guidance_max, lo, hint="the range is [guidance_min, guidance_max]")
        if self.cond_dim < 4:
            raise InvalidInput(f"cond_dim must be >= 4 (sin and cos of two frequencies at least), got {self.cond_dim}")


# ----- the math (each piece has a plain reference in tests/distill/test_consistency.py) -------------------------
def boundary_coefs(t: torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING,
                   sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at integer timesteps ``t`` (float32, computed in float64): exactly (1, 0) at t = 0."""
    st = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / torch.sqrt(st**2 + sigma_data**2)
    return c_skip.float(), c_out.float()


def grid_timesteps(num_train_timesteps: int, grid_steps: int) -> torch.Tensor:
    """The skipping-step grid ``(n + 1) k - 1`` for ``n = 0..N-1``, ``k = T // N`` (the ``lcm`` scheduler's)."""
    k = num_train_timesteps // grid_steps
    return torch.arange(1, grid_steps + 1, dtype=torch.long) * k - 1


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def x0_eps(prediction_type: str, m: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    """``(x0, eps)`` of a sample ``x = sqrt(a) x0 + sqrt(1 - a) eps`` from the model output ``m``."""
    sa, sb = _bc(a.sqrt()), _bc((1 - a).sqrt())
    if prediction_type == "v_prediction":
        return sa * x - sb * m, sa * m + sb * x
    if prediction_type == "epsilon":
        return (x - sb * m) / sa, m
    if prediction_type == "sample":
        return m, (x - sa * m) / sb
    raise InvalidInput(f"unknown prediction_type {prediction_type!r}")


def boundary_output(m: torch.Tensor, x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """``c_skip(t) x + c_out(t) x0(m)``: the consistency function's value from the network output ``m`` at ``x``."""
    c_skip, c_out = boundary_coefs(t)
    x0, _ = x0_eps(prediction_type, m, x, abar[t])
    return _bc(c_skip) * x + _bc(c_out) * x0


def consistency_fn(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w_emb: torch.Tensor,
                   abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``f(x, t, w) = c_skip(t) x + c_out(t) x0(model(x, t, w))`` for a student with folded guidance."""
    m = model.unet(x, t, encoder_hidden_states=model.encode_labels(labels), timestep_cond=w_emb,
                   return_dict=False)[0]
    return boundary_output(m, x, t, abar, prediction_type)


@torch.no_grad()
def teacher_ddim_step(teacher, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, labels: torch.Tensor,
                      guidance: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """One DDIM (eta 0) step of the teacher's guided ODE from ``t`` to ``t_prev``: a single 2B network call
    (null labels, then the labels), per-sample guidance ``m = m_u + g (m_c - m_u)``."""
    m = label_guided_output(teacher, x, t, labels, guidance)
    return ddim_from_output(m, x, t, t_prev, abar, prediction_type)


def label_guided_output(teacher, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                        guidance: torch.Tensor) -> torch.Tensor:
    """A label-conditioned teacher's guided output ``m_u + g (m_c - m_u)``: one 2B call (null labels first)."""
    both = torch.cat([torch.full_like(labels, teacher.null_label), labels])
    m_u, m_c = teacher(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return m_u + _bc(guidance) * (m_c - m_u)


def ddim_from_output(m: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, abar: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """DDIM (eta 0) from ``t`` to ``t_prev`` given the (guided) model output ``m`` at ``x``."""
    x0, eps = x0_eps(prediction_type, m, x, abar[t])
    a_prev = abar[t_prev]
    return _bc(a_prev.sqrt()) * x0 + _bc((1 - a_prev).sqrt()) * eps


@torch.no_grad()
def consistency_targets(teacher, target, x_t, t, labels, guidance, abar, skip: int, prediction_type: str,
                        cond_dim: int) -> torch.Tensor:
    """The regression target ``f_target(DDIM(x_t, t -> t'), t', g)`` with ``t' = max(t - skip, 0)``."""
    t_prev = (t - skip).clamp(min=0)
    x_prev = teacher_ddim_step(teacher, x_t, t, t_prev, labels, guidance, abar, prediction_type)
    w_emb = guidance_scale_embedding(guidance - 1.0, cond_dim)
    return consistency_fn(target, x_prev, t_prev, labels, w_emb, abar, prediction_type)


@torch.no_grad()
def teacher_trajectories(teacher, noise: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor,
                         grid: torch.Tensor, abar: torch.Tensor, prediction_type: str, batch_size: int = 256,
                         progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve a label-conditioned teacher's guided ODE down the grid: :func:`guided_ddim_trajectories` with
    :func:`label_guided_output`."""
    return guided_ddim_trajectories(lambda x, t, y, g: label_guided_output(teacher, x, t, y, g), noise, labels,
                                    guidance, grid, abar, prediction_type, batch_size, progress)


@torch.no_grad()
def guided_ddim_trajectories(guided, noise: torch.Tensor, conds: torch.Tensor, guidance: torch.Tensor,
                             grid: torch.Tensor, abar: torch.Tensor, prediction_type: str, batch_size: int = 256,
                             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve a teacher's guided ODE with DDIM (eta 0) down the grid from each noise (taken as the sample at the
    top grid point): ``(points (B, N, *S), ends (B, *S))``, ``points[:, n]`` the sample at ``grid[n]`` and ``ends``
    the x0 predicted at ``grid[0]`` -- what a diffusers DDIMScheduler with trailing spacing, ``set_alpha_to_one``
    and N steps returns. ``guided(x, t, conds[rows], guidance[rows])`` is the teacher's guided output (labels,
    text features: whatever ``conds`` holds per sample)."""
    from tqdm.auto import tqdm

    b, n = noise.shape[0], grid.numel()
    points = torch.empty((b, n, *noise.shape[1:]), dtype=torch.float32)
    ends = torch.empty_like(noise, dtype=torch.float32)
    for lo in tqdm(range(0, b, batch_size), desc="teacher trajectories", disable=not progress, mininterval=2.0):
        x, c, g = noise[lo:lo + batch_size].float(), conds[lo:lo + batch_size], guidance[lo:lo + batch_size]
        for k in range(n - 1, -1, -1):
            points[lo:lo + len(x), k] = x
            t = grid[k].expand(len(x))
            m = guided(x, t, c, g)
            if k > 0:
                x = ddim_from_output(m, x, t, grid[k - 1].expand(len(x)), abar, prediction_type)
            else:
                ends[lo:lo + len(x)] = x0_eps(prediction_type, m, x, abar[t])[0]
    return points, ends


def _trajectory_settings(spec: ConsistencySpec, teacher_name: str) -> dict:
    return {"teacher": teacher_name, "seed": spec.seed, "num_trajectories": spec.num_trajectories,
            "grid_steps": spec.grid_steps, "guidance": [spec.guidance_min, spec.guidance_max]}


def load_or_make_trajectories(spec: ConsistencySpec, teacher, out: Path, grid, abar, prediction_type: str,
                              expected_sha256: str | None, progress: bool) -> tuple[dict, str]:
    """The run's teacher trajectories: read from ``out/trajectories.pt`` when it was written for these settings
    (and, on resume, has the sha256 the checkpoint recorded), else solved again (deterministic: same numbers) and
    written atomically. Returns the tensors and the file's sha256."""
    from fastdiff.models.generate import balanced_labels, make_noise, stream_seed

    path = out / TRAJECTORIES
    want = _trajectory_settings(spec, str(getattr(teacher, "name", spec.teacher)))
    cached = read_cached_trajectories(path, want, expected_sha256)
    if cached is not None:
        return cached
    idx = torch.arange(spec.num_trajectories)
    base = stream_seed(spec.seed, "trajectories")
    cfg = teacher.unet.config
    noise = make_noise(base, idx, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    labels = balanced_labels(idx, teacher.num_classes)
    g = torch.Generator().manual_seed(base)
    guidance = spec.guidance_min + (spec.guidance_max - spec.guidance_min) * torch.rand(len(idx), generator=g)
    t0 = time.time()
    points, ends = teacher_trajectories(teacher, noise, labels, guidance, grid, abar, prediction_type,
                                        progress=progress)
    data = {"format": TRAJECTORIES_FORMAT, "settings": want, "points": points, "ends": ends, "labels": labels,
            "guidance": guidance, "solve_s": round(time.time() - t0, 1)}
    return data, write_trajectories(path, data)


def read_cached_trajectories(path: Path, settings: dict, expected_sha256: str | None) -> tuple[dict, str] | None:
    """``(data, sha256)`` of the trajectories file at ``path`` when it holds trajectories made with ``settings``
    (and, when given, has ``expected_sha256``: the one a checkpoint recorded); else None, with a warning naming
    why when the file exists (damaged, other settings), so the caller solves them again."""
    import hashlib
    import warnings

    if not path.is_file():
        return None
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    problem = None
    if expected_sha256 is not None and sha != expected_sha256:
        problem = "its sha256 is not the one the checkpoint recorded"
    else:
        try:
            data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != TRAJECTORIES_FORMAT:
                problem = "it is not a trajectories file"
            elif data.get("settings") != settings:
                problem = f"it was made with other settings ({data.get('settings')})"
        except Exception as e:  # damaged file: torch raises several types
            problem = f"it cannot be read ({type(e).__name__})"
    if problem is None:
        return data, sha
    warnings.warn(f"{path}: {problem}; solving the teacher trajectories again", stacklevel=3)
    return None


def write_trajectories(path: Path, data: dict) -> str:
    """Write ``data`` (with ``format`` :data:`TRAJECTORIES_FORMAT`) atomically to ``path``; returns its sha256."""
    import hashlib

    buf = io.BytesIO()
    torch.save(data, buf)
    atomic_write_bytes(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``mean(sqrt((a - b)^2 + c^2) - c)`` elementwise (LCM's loss); ``c = 0`` is the mean absolute error."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


# ----- the student ------------------------------------------------------------------------------------------
def lcm_scheduler_config(teacher_scheduler: dict, grid_steps: int) -> dict:
    """The student's scheduler: diffusers' ``LCMScheduler`` on the teacher's noise schedule and prediction type,
    with the training grid as ``original_inference_steps``."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    cfg = {k: teacher_scheduler[k] for k in keep if k in teacher_scheduler}
    return {"_class_name": "LCMScheduler", **cfg, "original_inference_steps": grid_steps,
            "timestep_scaling": TIMESTEP_SCALING, "clip_sample": False, "set_alpha_to_one": True}


def guidance_conditioned_copy(unet, cond_dim: int):
    """A float32 copy of a ``UNet2DConditionModel`` with a guidance input (``time_cond_proj_dim=cond_dim``): the
    same weights and a zero ``cond_proj``, so before training its output is the original's whatever the guidance."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = cond_dim
    copy_ = UNet2DConditionModel.from_config(cfg)
    missing, unexpected = copy_.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise InvalidInput(f"the teacher's UNet does not map onto a guidance-conditioned copy (missing {missing}, "
                           f"unexpected {unexpected})")
    with torch.no_grad():
        copy_.time_embedding.cond_proj.weight.zero_()
    return copy_.float()


def init_consistency_student(teacher, cond_dim: int = 32, grid_steps: int = 10):
    """A trainable copy of ``teacher`` (LabelConditionedUNet) with a guidance input (``time_cond_proj_dim``);
    the new projection is zero, so before training the student's network output is the teacher's conditional
    output."""
    from fastdiff.models.label_unet import LabelConditionedUNet

    unet = guidance_conditioned_copy(teacher.unet, cond_dim)
    student = LabelConditionedUNet(unet, teacher.num_classes, tokens=teacher.tokens,
                                   scheduler_config=lcm_scheduler_config(teacher.scheduler_config, grid_steps),
                                   name=f"{teacher.name}-consistency")
    student.label_embedding.load_state_dict(teacher.label_embedding.state_dict())
    return student.float().train().requires_grad_(True)


# ----- checkpoints ------------------------------------------------------------------------------------------
def _settings(spec: ConsistencySpec) -> dict:
    return {k: v for k, v in asdict(spec).items() if k not in RESUMABLE_CHANGES}


def _other_objective(out: Path) -> str | None:
    """What ``out`` holds when it is the output of another objective (a one-step triplet student), else None."""
    import json

    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    meta = cfg.get("metadata") or {}
    objective = meta.get("objective") or ("triplet-regression" if "triplets" in meta else None)
    if objective is None and (cfg.get("defaults") or {}).get("scheduler") == "onestep":
        objective = "triplet-regression"
    return objective if objective not in (None, OBJECTIVE) else None


def read_checkpoint(path: Path, spec: ConsistencySpec) -> dict:
    """The checkpoint at ``path``, checked: written by this objective with ``spec``'s settings."""
    try:
        ck = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise InvalidInput(f"cannot read the checkpoint {path} ({type(e).__name__}: {str(e)[:120]}); delete it to "
                           "start over") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{path} is not a fastdiff distillation checkpoint; use another --out or delete it")
    if ck.get("objective") != OBJECTIVE:
        raise InvalidInput(f"{path} is a checkpoint of the {ck.get('objective')!r} objective, not {OBJECTIVE!r}; "
                           "resume it with its own command, or use another --out for a consistency run")
    want, have = _settings(spec), ck.get("settings") or {}
    if have != want:
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        raise InvalidInput(f"{path} was written with other settings (checkpoint, requested): {diff}; rerun with "
                           f"the checkpoint's settings (only {', '.join(RESUMABLE_CHANGES)} may change) or use "
                           "another --out")
    return ck


def _write_checkpoint(path: Path, spec, step, student, target, opt, gen, perm, pos, avg, wall,
                      trajectories_sha256: str | None = None) -> None:
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "objective": OBJECTIVE, "settings": _settings(spec), "step": step,
                "student": student.state_dict(), "target": target.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "perm": perm, "pos": pos, "loss_avg": avg, "wall_s": wall,
                "trajectories_sha256": trajectories_sha256}, buf)
    atomic_write_bytes(path, buf.getvalue())


# ----- training ---------------------------------------------------------------------------------------------
def _digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from fastdiff.models.digits import load_digits_tensors

    return load_digits_tensors()


def train_consistency(spec: ConsistencySpec, out: str | os.PathLike, *, teacher=None,
                      data: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True,
                      name: str | None = None, stop_after: int | None = None):
    """Distil ``spec.teacher`` into a consistency student saved to ``out`` (model folder + ``checkpoint.pt``).

    ``teacher``: the loaded teacher (default: load ``spec.teacher``). ``data``: ``(images (N, C, H, W) in the
    teacher's space, labels (N,))`` to start trajectories from (default: the real digits). ``stop_after``
    (testing): return after that many steps of this call, as a crash would, leaving the last checkpoint.
    Returns the target network (what gets saved) as a LabelConditionedUNet.
    """
    from tqdm.auto import tqdm

    from fastdiff.models import load, save
    from fastdiff.models.train_digits import alphas_cumprod

    spec.check()
    out = Path(out)
    check_writable(out, "dir", what="--out")
    other = _other_objective(out)
    if other is not None:
        raise InvalidInput(f"{out} holds a model of the {other!r} objective (e.g. a one-step triplet student); a "
                           "consistency run would resume from and overwrite it: use another --out")
    ck_path = out / CHECKPOINT
    ck = read_checkpoint(ck_path, spec) if ck_path.exists() else None
    t_model = teacher if teacher is not None else load(spec.teacher)
    t_model = t_model.float().eval().requires_grad_(False)
    sched = dict(t_model.scheduler_config)
    pred = sched.get("prediction_type", "epsilon")
    T = int(sched.get("num_train_timesteps", 1000))
    if T % spec.grid_steps:
        raise InvalidInput(f"grid_steps={spec.grid_steps} must divide the teacher's {T} training timesteps")
    abar = alphas_cumprod(T, sched.get("beta_schedule", "linear"))
    skip = T // spec.grid_steps
    grid = grid_timesteps(T, spec.grid_steps)
    trajectories = traj_sha = None
    if spec.target == "trajectory":
        trajectories, traj_sha = load_or_make_trajectories(
            spec, t_model, out, grid, abar, pred, None if ck is None else ck.get("trajectories_sha256"), progress)
        x_all = y_all = None
        n = spec.num_trajectories
    else:
        x_all, y_all = data if data is not None else _digits_data()
        n = x_all.shape[0]

    torch.manual_seed(spec.seed)
    student = init_consistency_student(t_model, spec.cond_dim, spec.grid_steps)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(spec.seed)
    perm, pos, start, avg, wall0 = torch.randperm(n, generator=gen), 0, 0, None, 0.0
    if ck is not None:
        student.load_state_dict(ck["student"])
        target.load_state_dict(ck["target"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        perm, pos, start, avg, wall0 = ck["perm"], int(ck["pos"]), int(ck["step"]), ck["loss_avg"], ck["wall_s"]
    elif trajectories is not None:
        wall0 = float(trajectories.get("solve_s", 0.0))  # the training's wall time includes solving its data
    name = name or f"{getattr(t_model, 'name', 'model')}-consistency"
    limits = {"max_inference_steps": MAX_INFERENCE_STEPS, "guidance_scale": [spec.guidance_min, spec.guidance_max],
              "why_max_steps": "the most steps its quality was measured at"}
    defaults = {"scheduler": "lcm", "num_inference_steps": 4,
                "guidance_scale": min(max(1.5, spec.guidance_min), spec.guidance_max)}
    solved = {} if trajectories is None else {"trajectories_s": trajectories.get("solve_s")}  # part of wall_s
    meta = {"objective": OBJECTIVE, **asdict(spec), **solved, "teacher": str(getattr(t_model, "name", spec.teacher)),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores"}

    def save_all(step_done: int) -> None:
        wall = round(wall0 + time.time() - t0, 1)
        _write_checkpoint(ck_path, spec, step_done, student, target, opt, gen, perm, pos, avg, wall, traj_sha)
        save(target, out, name=name, defaults=defaults, limits=limits,
             metadata={**meta, "steps_done": step_done, "wall_s": wall,
                       "loss_ema": None if avg is None else round(avg, 6)})

    t0 = time.time()
    done_here = 0
    bar = tqdm(range(start, spec.steps), desc="distill consistency", disable=not progress, mininterval=2.0,
               initial=start, total=spec.steps)
    for step in bar:
        if pos + spec.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + spec.batch_size]
        pos += spec.batch_size
        b = len(idx)
        if trajectories is not None:  # a recorded point of each drawn trajectory, and the trajectory's end
            k = torch.randint(0, spec.grid_steps, (b,), generator=gen)
            t, x_t, tgt = grid[k], trajectories["points"][idx, k], trajectories["ends"][idx]
            y, g = trajectories["labels"][idx], trajectories["guidance"][idx]
        else:
            x0, y = x_all[idx], y_all[idx]
            t = grid[torch.randint(0, spec.grid_steps, (b,), generator=gen)]
            g = spec.guidance_min + (spec.guidance_max - spec.guidance_min) * torch.rand(b, generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            a = _bc(abar[t])
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            tgt = consistency_targets(t_model, target, x_t, t, y, g, abar, skip, pred, spec.cond_dim)
        for grp in opt.param_groups:
            grp["lr"] = spec.lr * min(1.0, (step + 1) / max(1, spec.warmup))
        w_emb = guidance_scale_embedding(g - 1.0, spec.cond_dim)
        pred_end = consistency_fn(student, x_t, t, y, w_emb, abar, pred)
        if trajectories is not None:
            loss = torch.nn.functional.mse_loss(pred_end, tgt)
        else:
            loss = pseudo_huber(pred_end, tgt, spec.huber_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, student, spec.target_decay)
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.5f}", refresh=False)
        if spec.log_every and (step + 1) % spec.log_every == 0:
            print(f"step {step + 1}/{spec.steps} loss {avg:.5f} elapsed {wall0 + time.time() - t0:.0f}s", flush=True)
        done_here += 1
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            save_all(step + 1)
        if stop_after is not None and done_here >= stop_after:
            return target
    save_all(max(start, spec.steps))
    if progress:
        print(f"saved consistency student to {out} ({max(start, spec.steps)} steps, "
              f"{wall0 + time.time() - t0:.0f}s)", flush=True)
    return target


__all__ = ["ConsistencySpec", "boundary_coefs", "boundary_output", "consistency_fn", "consistency_targets",
           "ddim_from_output", "grid_timesteps", "guidance_conditioned_copy", "guided_ddim_trajectories",
           "init_consistency_student", "label_guided_output", "lcm_scheduler_config", "load_or_make_trajectories",
           "pseudo_huber", "read_cached_trajectories", "read_checkpoint", "teacher_ddim_step", "teacher_trajectories",
           "train_consistency", "write_trajectories", "x0_eps"]
