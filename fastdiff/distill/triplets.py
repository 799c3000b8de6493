"""(label, noise, teacher image) triplets for distillation, generated across processes and machines.

Sample ``i`` gets label ``i % num_classes`` and noise seeded by ``(seed, i)`` (:mod:`fastdiff.models.generate`).
Samples are grouped in shards of ``shard_size``; shard ``k`` (samples ``k*S .. k*S+S-1``) is always computed as
one batch, whichever process computes it, so a shard's bytes do not depend on the number of workers. Rank ``r``
of ``W`` takes shards ``r, r+W, r+2W, ...`` and writes each as ``shard-{k:05d}.safetensors`` atomically (a temp
file then ``os.replace``), so a file that exists is complete; a restarted job skips existing shards. After a
barrier, rank 0 merges the shards in index order into ``triplets.safetensors``.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the process group is initialised with NCCL on GPUs and gloo on
CPUs; each rank uses ``cuda:LOCAL_RANK`` when GPUs are present.

    torchrun --nproc_per_node 2 -m fastdiff.distill generate --teacher digits --out runs/triplets -n 10000
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text
from fastdiff.errors import InvalidInput
from fastdiff.models.generate import balanced_labels, generate, make_noise, make_sampler

MANIFEST = "manifest.json"
MERGED = "triplets.safetensors"


@dataclass
class TripletSpec:
    """What a triplet directory holds. A restart must use the same spec (checked against ``manifest.json``)."""

    teacher: str
    num_samples: int
    shard_size: int = 250
    seed: int = 0
    scheduler: str = "dpmpp_2m"
    num_inference_steps: int = 20
    guidance_scale: float = 1.5

    @property
    def num_shards(self) -> int:
        return (self.num_samples + self.shard_size - 1) // self.shard_size

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) when absent."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _check_manifest(out: Path, spec: TripletSpec, rank: int, world: int) -> None:
    """Write the manifest (rank 0) or check that an existing one matches ``spec``."""
    path = out / MANIFEST
    want = asdict(spec)
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            raise InvalidInput(f"{out} holds triplets made with different settings (existing, requested): {diff}; "
                               "use another --out directory or delete it")
    elif rank == 0:
        atomic_write_text(path, json.dumps(want, indent=1) + "\n")


def generate_shards(spec: TripletSpec, out: str | os.PathLike, rank: int = 0, world_size: int = 1,
                    device=None, backend: str = "auto", progress: bool = True,
                    fail_after: int | None = None) -> list[int]:
    """Generate this rank's missing shards; returns the shard indices it wrote.

    ``fail_after`` (testing): raise ``SystemExit(17)`` after writing that many shards, as a crash would.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    mine = [k for k in range(spec.num_shards) if k % world_size == rank]
    todo = [k for k in mine if not shard_path(out, k).exists()]
    if not todo:
        return []
    from fastdiff.models import load

    teacher = load(spec.teacher)
    sampler = make_sampler(teacher, scheduler=spec.scheduler, backend=backend, device=device)
    c, size = teacher.unet.config.in_channels, teacher.unet.config.sample_size
    written = []
    bar = tqdm(todo, desc=f"triplets rank {rank}/{world_size}", disable=not progress, position=rank)
    for k in bar:
        idx = torch.tensor(list(spec.shard_range(k)))
        labels = balanced_labels(idx, teacher.num_classes)
        noise = make_noise(spec.seed, idx, (c, size, size))
        images = generate(sampler, labels, noise, spec.num_inference_steps, spec.guidance_scale)
        _atomic_save({"index": idx, "label": labels, "noise": noise, "image": images}, shard_path(out, k),
                     metadata={"shard": str(k)})
        written.append(k)
        if fail_after is not None and len(written) >= fail_after:
            raise SystemExit(17)
    return written


def merge_shards(spec: TripletSpec, out: str | os.PathLike) -> Path:
    """Concatenate every shard in index order into ``triplets.safetensors`` (atomically); returns its path."""
    from safetensors.torch import load_file

    out = Path(out)
    missing = [k for k in range(spec.num_shards) if not shard_path(out, k).exists()]
    if missing:
        raise InvalidInput(f"cannot merge: {len(missing)} shards missing from {out} (first: {missing[:5]}); "
                           "rerun the generation, it resumes where it stopped")
    parts = [load_file(str(shard_path(out, k))) for k in range(spec.num_shards)]
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if merged["index"].tolist() != list(range(spec.num_samples)):
        raise InvalidInput(f"shards in {out} do not cover samples 0..{spec.num_samples - 1} in order")
    _atomic_save(merged, out / MERGED, metadata={"spec": json.dumps(asdict(spec))})
    return out / MERGED


def run_distributed(spec: TripletSpec, out: str | os.PathLike, backend: str = "auto", progress: bool = True,
                    fail_after: int | None = None) -> Path | None:
    """Entry point for every process of a (torchrun) job: generate this rank's shards, barrier, rank 0 merges.

    Returns the merged file's path on rank 0, None on the other ranks.
    """
    rank, world, local_rank = _dist_info()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    pg = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device is not None else "gloo")
            pg = True
    try:
        if rank == 0:
            _check_manifest(out, spec, rank, world)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            _check_manifest(out, spec, rank, world)
        t0 = time.time()
        written = generate_shards(spec, out, rank, world, device=device, backend=backend, progress=progress,
                                  fail_after=fail_after)
        if progress:
            print(f"rank {rank}: wrote {len(written)} shards in {time.time() - t0:.1f}s", flush=True)
        if world > 1:
            torch.distributed.barrier()
        return merge_shards(spec, out) if rank == 0 else None
    finally:
        if pg:
            torch.distributed.destroy_process_group()


def load_triplets(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The merged triplets: ``label (N,)``, ``noise (N, C, H, W)``, ``image (N, C, H, W)``, ``index (N,)``."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / MERGED
    if not p.is_file():
        raise InvalidInput(f"no triplets at {path}: expected {MERGED} (run `python -m fastdiff.distill generate`)")
    return load_file(str(p))
