"""(label, noise, teacher image) triplets for distillation, generated across processes and machines.

Sample ``i`` gets label ``i % num_classes`` and noise seeded by ``(seed, i)`` (:mod:`fastdiff.models.generate`).
Samples are grouped in shards of ``shard_size``; shard ``k`` (samples ``k*S .. k*S+S-1``) is always computed as
one batch, whichever process computes it, so a shard's bytes do not depend on the number of workers. Rank ``r``
of ``W`` takes shards ``r, r+W, r+2W, ...`` and writes each as ``shard-{k:05d}.safetensors`` atomically (a temp
file then ``os.replace``), so a file that exists is complete; a restarted job skips existing shards. After a
barrier, rank 0 records every shard's size and sha256 in ``manifest.json`` and merges the shards in index order
into ``triplets.safetensors``.

``manifest.json`` (the settings, then the shard records) is written only once the settings are known to work (the
teacher loads, the sizes are valid), so a mistyped command leaves nothing that refuses the corrected one. On a
restart each existing shard is checked against its record (or, without one, opened and its sample indices
compared) and a bad one (truncated, modified) is regenerated with a :class:`ShardRegenerated` warning.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the process group is initialised with NCCL on GPUs and gloo on
CPUs; each rank uses ``cuda:LOCAL_RANK`` when GPUs are present.

    torchrun --nproc_per_node 2 -m fastdiff.distill generate --teacher digits --out runs/triplets -n 10000
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text, check_writable, sha256_file
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

    def check(self) -> None:
        """Raise :class:`InvalidInput` for sizes no job can run with (before anything is written)."""
        for name in ("num_samples", "shard_size", "num_inference_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInput(f"{name} must be an integer >= 1, got {v!r}")


class ShardRegenerated(UserWarning):
    """An existing shard failed its check on a restart and is generated again (the message says which, why)."""


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) when absent."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path} is unreadable ({e}); delete it to start this directory over") from None
    if not isinstance(have, dict):
        raise InvalidInput(f"{path} is not a triplet manifest; use another --out directory or delete it")
    return have


def _check_manifest(out: Path, spec: TripletSpec) -> dict:
    """The shard records of an existing manifest ({} when there is none); raises when its settings are not
    ``spec``'s. Writes nothing."""
    have = _read_manifest(out)
    if have is None:
        return {}
    want = asdict(spec)
    settings = {k: v for k, v in have.items() if k != "shards"}
    if settings != want:
        diff = {k: (settings.get(k), v) for k, v in want.items() if settings.get(k) != v}
        raise InvalidInput(f"{out} holds triplets made with different settings (existing, requested): {diff}; "
                           "use another --out directory or delete it")
    return dict(have.get("shards") or {})


def _write_manifest(out: Path, spec: TripletSpec, records: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps({**asdict(spec), "shards": dict(sorted(records.items()))},
                                                 indent=1) + "\n")


def _record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _shard_problem(spec: TripletSpec, out: Path, k: int, record: dict | None) -> str | None:
    """Why the existing shard ``k`` cannot be used (None: it can). Against its record when there is one; a shard
    written by a job killed before it recorded it is opened and its sample indices compared instead."""
    path = shard_path(out, k)
    if record:
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{size} bytes, {record.get('size')} recorded"
        if sha256_file(path) != record.get("sha256"):
            return "its sha256 is not the recorded one (modified)"
        return None
    from safetensors.torch import load_file

    try:
        index = load_file(str(path))["index"]
    except Exception as e:  # any way a damaged file fails to parse
        return f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    if index.tolist() != list(spec.shard_range(k)):
        return "it holds other samples than its name says"
    return None


def pending_shards(spec: TripletSpec, out: Path, records: dict, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's shards that are missing or bad (warning :class:`ShardRegenerated` for each bad one)."""
    todo = []
    for k in range(rank, spec.num_shards, world_size):
        if not shard_path(out, k).exists():
            todo.append(k)
            continue
        problem = _shard_problem(spec, out, k, records.get(f"{k:05d}"))
        if problem is not None:
            warnings.warn(f"shard {shard_path(out, k)} is bad ({problem}); regenerating it", ShardRegenerated,
                          stacklevel=3)
            todo.append(k)
    return todo


def save_shard(spec: TripletSpec, out: Path, k: int, tensors: dict[str, torch.Tensor], records: dict,
               world_size: int = 1) -> None:
    """Write shard ``k`` atomically; alone (``world_size`` 1) record it in the manifest at once (ranks would race
    on the file: rank 0 records every shard after the barrier)."""
    _atomic_save(tensors, shard_path(out, k), metadata={"shard": str(k)})
    if world_size == 1:
        records[f"{k:05d}"] = _record(shard_path(out, k))
        _write_manifest(out, spec, records)


def generate_shards(spec: TripletSpec, out: str | os.PathLike, rank: int = 0, world_size: int = 1,
                    device=None, backend: str = "auto", progress: bool = True,
                    fail_after: int | None = None, teacher=None) -> list[int]:
    """Generate this rank's missing or bad shards; returns the shard indices it wrote.

    ``teacher``: the loaded teacher (default: load ``spec.teacher``). ``fail_after`` (testing): raise
    ``SystemExit(17)`` after writing that many shards, as a crash would.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    records = _check_manifest(out, spec)
    todo = pending_shards(spec, out, records, rank, world_size)
    if not todo:
        return []
    if teacher is None:
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
        save_shard(spec, out, k, {"index": idx, "label": labels, "noise": noise, "image": images}, records,
                   world_size)
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
    spec.check()
    check_writable(out, "dir", what="--out")
    _check_manifest(out, spec)  # refuse other settings before loading anything
    from fastdiff.models import load

    teacher = load(spec.teacher)  # a mistyped teacher fails here, before anything is written
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
        if rank == 0 and not (out / MANIFEST).exists():
            _write_manifest(out, spec, {})
        if world > 1:
            torch.distributed.barrier()  # the other ranks read the manifest rank 0 wrote
        t0 = time.time()
        written = generate_shards(spec, out, rank, world, device=device, backend=backend, progress=progress,
                                  fail_after=fail_after, teacher=teacher)
        if progress:
            print(f"rank {rank}: wrote {len(written)} shards in {time.time() - t0:.1f}s", flush=True)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            return None
        # every shard was checked or written by its rank in this run: record them all (ranks did not, see above)
        return record_and_merge(spec, out)
    finally:
        if pg:
            torch.distributed.destroy_process_group()


def record_and_merge(spec, out: Path) -> Path:
    """Record every shard on disk in the manifest (size, sha256), then merge them: the end of a generation run."""
    records = _check_manifest(out, spec)
    for k in range(spec.num_shards):
        if shard_path(out, k).exists():
            records[f"{k:05d}"] = _record(shard_path(out, k))
    _write_manifest(out, spec, records)
    return merge_shards(spec, out)


def load_triplets(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The merged triplets: ``label (N,)``, ``noise (N, C, H, W)``, ``image (N, C, H, W)``, ``index (N,)``."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / MERGED
    if not p.is_file():
        raise InvalidInput(f"no triplets at {path}: expected {MERGED} (run `python -m fastdiff.distill generate`)")
    return load_file(str(p))
