"""``python -m fastdiff.distill``: ``generate`` triplets (also under torchrun) and ``train`` a one-step student;
``coalescer-index`` / ``coalescer-train`` / ``coalescer-eval``: coalescer networks (:mod:`fastdiff.distill.coalescer`);
``consistency``: a few-step consistency student with the guidance folded in (LCM).

    torchrun --nproc_per_node 2 -m fastdiff.distill generate --teacher digits --out runs/digits-triplets -n 10000
    python -m fastdiff.distill train --teacher digits --triplets runs/digits-triplets \\
        --out fastdiff/models/weights/digits-onestep --name digits-onestep
    python -m fastdiff.distill consistency --teacher digits --out runs/digits-consistency --steps 400
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastdiff._checks import cli_int, cli_number
from fastdiff.distill import coalescer_cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``generate`` / ``train`` subcommands to ``p`` (this module's parser, or ``python -m fastdiff
    distill``'s: the sub-parsers take ``p``'s class and program name)."""
    sub = p.add_subparsers(dest="distill_command", required=True)
    g = sub.add_parser("generate", help="teacher (label, noise, image) triplets in resumable shards")
    g.add_argument("--teacher", default="digits", help="embedded model name or model directory")
    g.add_argument("--out", required=True, help="output directory (shards, manifest, merged triplets)")
    g.add_argument("-n", "--num-samples", type=cli_int(1), default=10000)
    g.add_argument("--shard-size", type=cli_int(1), default=250)
    g.add_argument("--seed", type=cli_int(None), default=0)
    g.add_argument("--scheduler", default="dpmpp_2m")
    g.add_argument("--steps", type=cli_int(1), default=20, help="teacher sampling steps (>= 20 recommended)")
    g.add_argument("--guidance", type=cli_number(), default=1.5)
    g.add_argument("--backend", default="auto")
    g.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads per process")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--fail-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: crash after N shards

    t = sub.add_parser("train", help="train a one-step student on merged triplets")
    t.add_argument("--teacher", default="digits")
    t.add_argument("--triplets", required=True, help="triplet directory (or its triplets.safetensors)")
    t.add_argument("--out", required=True, help="student model directory")
    t.add_argument("--name", default=None, help="model name stored in its config (default: <teacher>-onestep)")
    t.add_argument("--steps", type=cli_int(1), default=2000)
    t.add_argument("--batch-size", type=cli_int(1), default=128)
    t.add_argument("--lr", type=cli_number(minimum=0.0), default=2e-4)
    t.add_argument("--seed", type=cli_int(None), default=0)
    t.add_argument("--save-every", type=cli_int(0), default=0, help="also save the EMA every N steps")
    t.add_argument("--threads", type=cli_int(1), default=None)
    t.add_argument("--no-progress", action="store_true")
    coalescer_cli.add_subcommands(sub)

    from fastdiff.distill.consistency import ConsistencySpec

    d = ConsistencySpec()
    c = sub.add_parser("consistency", help="consistency distillation (LCM) with CFG folded in; resumes from --out")
    c.add_argument("--teacher", default=d.teacher, help="embedded model name or model directory (digits-like)")
    c.add_argument("--out", required=True, help="student model directory; checkpoint.pt there resumes the run")
    c.add_argument("--name", default=None, help="model name stored in its config (default: <teacher>-consistency)")
    c.add_argument("--steps", type=cli_int(1), default=d.steps, help="total training steps (a resumed run may "
                   "raise it)")
    c.add_argument("--batch-size", type=cli_int(1), default=d.batch_size)
    c.add_argument("--lr", type=cli_number(minimum=0.0), default=d.lr)
    c.add_argument("--warmup", type=cli_int(0), default=d.warmup)
    c.add_argument("--seed", type=cli_int(None), default=d.seed)
    c.add_argument("--guidance-min", type=cli_number(1.0), default=d.guidance_min,
                   help="guidance scales are drawn from [min, max] per example (the student's supported range)")
    c.add_argument("--guidance-max", type=cli_number(1.0), default=d.guidance_max)
    c.add_argument("--grid-steps", type=cli_int(1), default=d.grid_steps,
                   help="skipping-step grid size N (teacher DDIM steps of T/N timesteps)")
    c.add_argument("--target-decay", type=cli_number(0.0, 1.0), default=d.target_decay)
    c.add_argument("--huber-c", type=cli_number(minimum=0.0), default=d.huber_c)
    c.add_argument("--cond-dim", type=cli_int(4), default=d.cond_dim, help="guidance embedding width")
    c.add_argument("--target", choices=("bootstrap", "trajectory"), default=d.target,
                   help="bootstrap: LCM's self-consistency target; trajectory: regress points of teacher trajectories "
                   "(solved ahead of training, kept in --out) onto their ends")
    c.add_argument("--num-trajectories", type=cli_int(1), default=d.num_trajectories,
                   help="teacher trajectories for --target trajectory")
    c.add_argument("--checkpoint-every", type=cli_int(0), default=d.checkpoint_every)
    c.add_argument("--log-every", type=cli_int(0), default=d.log_every)
    c.add_argument("--threads", type=cli_int(1), default=None)
    c.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdiff.distill", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def run(a: argparse.Namespace) -> int:
    """Run a parsed ``generate`` / ``train`` command; returns the exit status."""
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    from fastdiff.errors import FastDiffError

    try:
        if a.distill_command.startswith("coalescer-"):
            return coalescer_cli.run(a)
        if a.distill_command == "generate":
            from fastdiff.distill.triplets import TripletSpec, run_distributed

            spec = TripletSpec(teacher=a.teacher, num_samples=a.num_samples, shard_size=a.shard_size, seed=a.seed,
                               scheduler=a.scheduler, num_inference_steps=a.steps, guidance_scale=a.guidance)
            path = run_distributed(spec, a.out, backend=a.backend, progress=not a.no_progress,
                                   fail_after=a.fail_after)
            if path is not None:
                print(f"wrote {spec.num_samples} triplets to {path}")
        elif a.distill_command == "consistency":
            from fastdiff.distill.consistency import ConsistencySpec, train_consistency

            spec = ConsistencySpec(
                teacher=a.teacher, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, seed=a.seed,
                guidance_min=a.guidance_min, guidance_max=a.guidance_max, grid_steps=a.grid_steps,
                target_decay=a.target_decay, huber_c=a.huber_c, cond_dim=a.cond_dim, target=a.target,
                num_trajectories=a.num_trajectories, checkpoint_every=a.checkpoint_every, log_every=a.log_every)
            train_consistency(spec, a.out, progress=not a.no_progress, name=a.name)
        else:
            from fastdiff._atomic import check_writable
            from fastdiff.distill.train import train_student

            check_writable(a.out, "dir", what="--out")  # before the training, not when saving its result
            train_student(a.teacher, a.triplets, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                          seed=a.seed, name=a.name, progress=not a.no_progress, save_every=a.save_every,
                          metadata={"triplets": str(a.triplets)})
    except FastDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (also ``python -m fastdiff distill``)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
