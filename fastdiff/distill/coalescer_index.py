"""The coalescer's vector index: a model's training pairs keyed by ``concat(desc_scale * cond_emb, latent)`` in faiss.

A pair is (condition, image latent): for ``digits`` the label and the 16x16 pixels (the model works in pixel space).
The condition embedding is the label's one-hot vector, not the teacher's learned label embedding: a coalescer needs
no teacher, and one-hot labels are all ``sqrt(2)`` apart, so ``desc_scale`` has one meaning for every pair of
classes -- a query of class ``c`` reaches an image of another class only when that image is nearer in latent space
by more than ``2 desc_scale^2`` in squared distance (measured on digits: queries ``R ~ N(0, I)`` stay in
their class 14% of the time at desc_scale 1, 85% at 4, 100% at 8; ``R = 4 z`` needs 32). The null label
(classifier-free guidance) queries with a zero condition part, which is equally far (``desc_scale^2``) from every
class, so it finds the nearest image of any class.

Building runs like the triplets (:mod:`fastdiff.distill.triplets`): pairs are split into shards of ``shard_size``,
rank ``r`` of ``W`` (under ``torchrun``) encodes shards ``r, r+W, ...`` into latents (the costly part for latent
models; for digits the pixels) and writes each atomically; a restarted job skips the complete ones. Rank 0 merges
them in index order into ``pairs.safetensors``, builds the faiss index into ``index.faiss`` and records the settings
and every file's sha256 in ``manifest.json``. Loading checks the manifest, the files and the model it was built for.

    torchrun --nproc_per_node 2 -m fastdiff.distill coalescer-index --model digits --out runs/digits-index
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text, check_writable, sha256_file
from fastdiff.errors import InvalidInput

FORMAT = "fastdiff.coalescer_index"
MANIFEST = "manifest.json"
PAIRS = "pairs.safetensors"
INDEX = "index.faiss"
INDEX_TYPES = ("flat", "hnsw", "ivf")
#: HNSW graph degree and search breadth; IVF lists and lists probed. Measured on the 1,797 digits pairs (see
#: docs/notes/coalescer.md): with these, both agree with the exact search on >= 99% of training queries.
HNSW_M, HNSW_EF_SEARCH = 32, 128
IVF_LISTS, IVF_PROBE = 16, 4


@dataclass
class IndexSpec:
    """What an index directory holds; a restart must use the same spec (checked against ``manifest.json``)."""

    model: str = "digits"
    desc_scale: float = 32.0
    index_type: str = "flat"
    shard_size: int = 500

    def check(self) -> None:
        if self.model not in PAIR_SOURCES:
            raise InvalidInput(f"no training pairs known for model {self.model!r}; supported: "
                               f"{', '.join(PAIR_SOURCES)}")
        d = self.desc_scale
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not np.isfinite(d) or d <= 0:
            raise InvalidInput(f"desc_scale must be a finite number > 0 (> 1 keeps queries in their class), got {d!r}")
        if self.index_type not in INDEX_TYPES:
            raise InvalidInput(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        s = self.shard_size
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise InvalidInput(f"shard_size must be an integer >= 1, got {s!r}")


def _digits_pairs() -> tuple[torch.Tensor, torch.Tensor, int]:
    from fastdiff.models import digits

    x, y = digits.load_digits_tensors()
    return x, y, digits.NUM_CLASSES


#: model name -> () -> (latents (N, C, H, W), labels (N,), num_classes). All 1,797 digits: the data the teacher
#: was trained on, so every fast model in the comparison learned from the same images.
PAIR_SOURCES = {"digits": _digits_pairs}


def _encode(model: str, latents: torch.Tensor) -> torch.Tensor:
    """The latents of a shard of images: pixels for digits (a latent model would run its VAE encoder here)."""
    return latents.float().contiguous()


def make_keys(latents: torch.Tensor, labels: torch.Tensor, num_classes: int, desc_scale: float) -> torch.Tensor:
    """``concat(desc_scale * onehot(label), flatten(latent))`` float32 ``(N, num_classes + D)``; the null label
    ``num_classes`` gets a zero condition part."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() and not bool(((labels >= 0) & (labels <= num_classes)).all()):
        raise InvalidInput(f"labels must be in [0, {num_classes}] ({num_classes} = null), got {labels.tolist()[:10]}")
    cond = torch.zeros(labels.shape[0], num_classes + 1)
    cond[torch.arange(labels.shape[0]), labels] = float(desc_scale)
    return torch.cat([cond[:, :num_classes], latents.reshape(latents.shape[0], -1).float()], dim=1).contiguous()


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InvalidInput("the coalescer index needs faiss: `pip install fastdiff[coalescer]` (or faiss-cpu)") from e
    return faiss


def build_faiss(keys: torch.Tensor, index_type: str):
    """A faiss index of ``keys (N, K)`` of the given type, built deterministically (one thread)."""
    faiss = _faiss()
    x = np.ascontiguousarray(keys.numpy(), dtype=np.float32)
    dim = x.shape[1]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # HNSW insertion order and k-means are then the same on every run
    try:
        if index_type == "flat":
            index = faiss.IndexFlatL2(dim)
        elif index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, HNSW_M)
            index.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            lists = max(1, min(IVF_LISTS, x.shape[0] // 39))  # faiss wants >= 39 training points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
            index.train(x)
            index.nprobe = min(IVF_PROBE, lists)
        index.add(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return index


class CoalescerIndex:
    """A loaded index: ``pairs`` (``latent``, ``label``), the faiss index and its spec. ``nearest(labels, points)``
    is the training step's query."""

    def __init__(self, spec: IndexSpec, latents: torch.Tensor, labels: torch.Tensor, num_classes: int, index,
                 path: Path | None = None, sha256: str = ""):
        self.spec, self.latents, self.labels, self.num_classes = spec, latents, labels, num_classes
        self.index, self.path, self.sha256 = index, path, sha256  # sha256: of the pairs file (what it stores)

    def conditions(self, pick: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The labels of pairs ``pick``, the null label where ``drop`` (the training loop's conditions)."""
        y = self.labels[pick].long().clone()
        y[drop] = self.num_classes
        return y

    def query_keys(self, labels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return make_keys(points, labels, self.num_classes, self.spec.desc_scale)

    def nearest(self, labels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Index ``(B,)`` of the stored pair nearest to ``concat(desc_scale * onehot(label), point)``."""
        if points.shape[1:] != self.latents.shape[1:]:
            raise InvalidInput(f"query points of shape {tuple(points.shape[1:])} do not match the index's latents "
                               f"{tuple(self.latents.shape[1:])}")
        q = np.ascontiguousarray(self.query_keys(labels, points.detach().cpu()).numpy(), dtype=np.float32)
        _, idx = self.index.search(q, 1)
        return torch.from_numpy(idx[:, 0].astype(np.int64))


def nearest_reference(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest neighbour in plain torch (float64): the reference the faiss search is tested against."""
    return torch.cdist(queries.double(), keys.double()).argmin(dim=1)


# ----- building ---------------------------------------------------------------------------------------------------
def _shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def read_build_manifest(out: Path, fmt: str = FORMAT, what: str = "coalescer index") -> dict | None:
    """``out/manifest.json`` of an index being built (None when there is none yet); :class:`InvalidInput` when it
    is unreadable or another kind's (``fmt``), so a build never mixes its shards into another's folder."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path} is unreadable ({e}); delete it to build this index over") from None
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise InvalidInput(f"{path} is not a {what} manifest; use another --out directory")
    return m


def _check_spec(out: Path, spec, fmt: str = FORMAT, what: str = "coalescer index") -> dict:
    m = read_build_manifest(out, fmt, what)
    if m is None:
        return {}
    have = m.get("spec", {})
    if have != asdict(spec):
        diff = {k: (have.get(k), v) for k, v in asdict(spec).items() if have.get(k) != v}
        raise InvalidInput(f"{out} holds an index built with other settings (existing, requested): {diff}; "
                           "use another --out directory or delete it")
    return m


def run_sharded_build(spec, out: Path, build, merge, fmt: str = FORMAT, what: str = "coalescer index"):
    """What every process of a (torchrun) index build runs: refuse an ``out`` built with other settings, write the
    spec first (rank 0: a restart with other settings is then refused), ``build(rank, world_size)`` this rank's
    shards between barriers, and ``merge()`` on rank 0 (its result; None on the other ranks)."""
    from fastdiff.distill.triplets import _dist_info

    rank, world, _ = _dist_info()
    check_writable(out, "dir", what="--out")
    existing = _check_spec(out, spec, fmt, what)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not existing:
        atomic_write_text(out / MANIFEST, json.dumps({"format": fmt, "spec": asdict(spec)}, indent=1) + "\n")
    pg = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only barriers: the encoding work is per shard
            pg = True
    try:
        if world > 1:
            torch.distributed.barrier()
        build(rank, world)
        if world > 1:
            torch.distributed.barrier()
        return merge() if rank == 0 else None
    finally:
        if pg:
            torch.distributed.destroy_process_group()


def build_shards(spec: IndexSpec, out: Path, rank: int = 0, world_size: int = 1, progress: bool = True) -> list[int]:
    """Encode this rank's missing shards; returns the shard indices written. A shard file that exists is complete
    (written atomically) and was made with this spec (checked by the caller against the manifest)."""
    from safetensors.torch import save
    from tqdm.auto import tqdm

    latents, labels, _ = PAIR_SOURCES[spec.model]()
    n = latents.shape[0]
    shards = (n + spec.shard_size - 1) // spec.shard_size
    todo = [k for k in range(rank, shards, world_size) if not _shard_path(out, k).exists()]
    for k in tqdm(todo, desc=f"coalescer index rank {rank}/{world_size}", disable=not progress, position=rank):
        idx = torch.arange(k * spec.shard_size, min((k + 1) * spec.shard_size, n))
        data = {"index": idx, "label": labels[idx], "latent": _encode(spec.model, latents[idx])}
        atomic_write_bytes(_shard_path(out, k), save({a: b.contiguous() for a, b in data.items()}))
    return todo


def merge_and_index(spec: IndexSpec, out: Path) -> Path:
    """Merge the shards into ``pairs.safetensors``, build ``index.faiss``, write the manifest (rank 0)."""
    from safetensors.torch import load_file, save

    faiss = _faiss()
    _, _, num_classes = PAIR_SOURCES[spec.model]()
    shards = sorted(out.glob("shard-*.safetensors"))
    parts = [load_file(str(p)) for p in shards]
    if not parts:
        raise InvalidInput(f"no shards in {out}; run the build, it resumes where it stopped")
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    n = merged["index"].shape[0]
    if merged["index"].tolist() != list(range(n)):
        raise InvalidInput(f"shards in {out} do not cover pairs 0..{n - 1} in order; rerun the build")
    keys = make_keys(merged["latent"], merged["label"], num_classes, spec.desc_scale)
    index = build_faiss(keys, spec.index_type)
    atomic_write_bytes(out / PAIRS, save({"label": merged["label"], "latent": merged["latent"]}))
    atomic_write_bytes(out / INDEX, faiss.serialize_index(index).tobytes())
    manifest = {"format": FORMAT, "spec": asdict(spec), "num_pairs": n, "num_classes": num_classes,
                "latent_shape": list(merged["latent"].shape[1:]),
                "files": {name: {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
                          for name in (PAIRS, INDEX)}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


def build_index(spec: IndexSpec, out: str | os.PathLike, progress: bool = True) -> Path | None:
    """Entry point for every process of a (torchrun) job: encode this rank's shards, barrier, rank 0 merges and
    builds the faiss index. Returns the directory on rank 0, None on the others."""
    out = Path(out)
    spec.check()
    return run_sharded_build(spec, out, lambda rank, world: build_shards(spec, out, rank, world, progress=progress),
                             lambda: merge_and_index(spec, out))


def load_index(path: str | os.PathLike, model: str | None = None) -> CoalescerIndex:
    """Load a built index, checking its manifest and files; ``model``: the model it must have been built for."""
    from safetensors.torch import load_file

    out = Path(path)
    try:
        fmt = json.loads((out / MANIFEST).read_text()).get("format") if (out / MANIFEST).is_file() else None
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt == "fastdiff.text_coalescer_index":
        raise InvalidInput(f"the index at {path} is a text (shapes) coalescer index: train on it with "
                           "`coalescer-train --model shapes`")
    m = read_build_manifest(out) if out.is_dir() else None
    if m is None or "files" not in m:
        raise InvalidInput(f"no complete coalescer index at {path} (expected {MANIFEST} with its files; build one "
                           "with `python -m fastdiff distill coalescer-index`)")
    spec = IndexSpec(**m["spec"])
    if model is not None and spec.model != model:
        raise InvalidInput(f"the index at {path} was built for model {spec.model!r}, not {model!r}; build one for "
                           f"{model!r} with `python -m fastdiff distill coalescer-index --model {model}`")
    for name, rec in m["files"].items():
        f = out / name
        if not f.is_file() or f.stat().st_size != rec["size"] or sha256_file(f) != rec["sha256"]:
            raise InvalidInput(f"{f} is missing or not the file its manifest records (modified or truncated); "
                               "rebuild the index")
    pairs = load_file(str(out / PAIRS))
    index = _faiss().deserialize_index(np.frombuffer((out / INDEX).read_bytes(), dtype=np.uint8))
    return CoalescerIndex(spec, pairs["latent"], pairs["label"], int(m["num_classes"]), index, out,
                          sha256=m["files"][PAIRS]["sha256"])
