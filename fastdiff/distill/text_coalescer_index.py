"""The text coalescer's vector index: ``shapes`` pairs keyed by ``concat(desc_scale * DE, latent)`` in faiss.

A pair is (caption, image) from :func:`fastdiff.models.shapes.render.example` (``seed``, ``i``): its condition
embedding ``DE`` is the caption's pooled text embedding from the shipped ``shapes`` text encoder (frozen; CLIP's
``pooler_output``, 64-d: the end-of-text token's final hidden state), its latent the shipped VAE's latent of the
render (16x16x4, posterior mode times ``scaling_factor``, as ``train shapes`` encodes). The null condition for
classifier-free guidance is the empty prompt's embedding (:attr:`TextCoalescerIndex.null_embedding`); a query under
it looks up the stored latent nearest to ``R`` whatever its caption (the unconditional target), the text analogue of
the digits index's null label, which is equally far from every class. Keyed like the others, it would instead reach
only the pairs whose captions embed nearest to the empty prompt (its embedding is 12 from the data's on average,
they are 10 from each other: no caption is "equally far" in this space).

The digits index (:mod:`fastdiff.distill.coalescer_index`) keys one-hot labels; here the condition is continuous,
so ``desc_scale`` trades caption fidelity (a query reaches the pairs whose captions embed nearest) against how much
the random point ``R`` chooses among them (see docs/notes/shapes-coalescer.md for the measured trade-off).

Building is sharded and resumable like the digits index (and runs under ``torchrun``): rank ``r`` of ``W`` renders
and encodes shards ``r, r+W, ...`` (the costly part: ~2 ms per render plus the VAE encoder), each written
atomically; rank 0 merges them into ``pairs.safetensors``, builds ``index.faiss`` and writes ``manifest.json`` with
every file's sha256 and the sha256 of the text encoder and VAE that made the embeddings and latents (an index made
by other weights is refused on load).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff._atomic import atomic_write_bytes, atomic_write_text, sha256_file
from fastdiff.distill.coalescer_index import (
    INDEX_TYPES,
    _faiss,
    _shard_path,
    build_faiss,
    read_build_manifest,
    run_sharded_build,
)
from fastdiff.errors import InvalidInput
from fastdiff.models.shapes.encoders import ShapesEncoder

FORMAT = "fastdiff.text_coalescer_index"
MANIFEST = "manifest.json"
PAIRS = "pairs.safetensors"
INDEX = "index.faiss"
MODELS = ("shapes",)


@dataclass
class TextIndexSpec:
    """What a text index directory holds; a restart must use the same spec (checked against ``manifest.json``)."""

    model: str = "shapes"
    num_pairs: int = 50000
    data_seed: int = 0
    desc_scale: float = 256.0
    index_type: str = "flat"
    shard_size: int = 1000

    def check(self) -> None:
        if self.model not in MODELS:
            raise InvalidInput(f"text coalescer indexes are built for {MODELS}, got model {self.model!r}")
        d = self.desc_scale
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not np.isfinite(d) or d <= 0:
            raise InvalidInput(f"desc_scale must be a finite number > 0, got {d!r}")
        if self.index_type not in INDEX_TYPES:
            raise InvalidInput(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        for k in ("num_pairs", "shard_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInput(f"{k} must be an integer >= 1, got {v!r}")
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int) or self.data_seed < 0:
            raise InvalidInput(f"data_seed must be an integer >= 0, got {self.data_seed!r}")


def make_keys(latents: torch.Tensor, embeddings: torch.Tensor, desc_scale: float) -> torch.Tensor:
    """``concat(desc_scale * DE, flatten(latent))`` float32 ``(N, E + D)``."""
    if latents.shape[0] != embeddings.shape[0]:
        raise InvalidInput(f"{latents.shape[0]} latents but {embeddings.shape[0]} condition embeddings")
    return torch.cat([float(desc_scale) * embeddings.reshape(embeddings.shape[0], -1).float(),
                      latents.reshape(latents.shape[0], -1).float()], dim=1).contiguous()


class TextCoalescerIndex:
    """A loaded text index: pairs (``latents``, ``embeddings``, ``captions``), the empty prompt's embedding, the
    faiss index and its spec. ``nearest(embeddings, points)`` is the training step's query."""

    def __init__(self, spec: TextIndexSpec, latents: torch.Tensor, embeddings: torch.Tensor, null_embedding,
                 index, captions: list[str] | None = None, path: Path | None = None, sha256: str = "",
                 encoders: dict | None = None):
        self.spec, self.latents, self.embeddings = spec, latents, embeddings
        self.null_embedding, self.index, self.captions = null_embedding.reshape(-1), index, captions
        self.path, self.sha256, self.encoders = path, sha256, dict(encoders or {})
        self._latent_index = None  # built on first use: the null condition's lookup (latents only, exact)

    def conditions(self, pick: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The condition embeddings of pairs ``pick``, the null (empty prompt) one where ``drop``."""
        de = self.embeddings[pick].float().clone()
        de[drop] = self.null_embedding.float()
        return de

    def is_null(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Which rows are the null condition (the stored empty-prompt embedding, exactly)."""
        return (embeddings.float() == self.null_embedding.float()).all(dim=1)

    def nearest(self, embeddings: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Index ``(B,)`` of the stored pair nearest to ``concat(desc_scale * DE, point)``; for the null condition,
        of the stored latent nearest to ``point``."""
        if points.shape[1:] != self.latents.shape[1:]:
            raise InvalidInput(f"query points of shape {tuple(points.shape[1:])} do not match the index's latents "
                               f"{tuple(self.latents.shape[1:])}")
        if embeddings.shape[-1] != self.embeddings.shape[-1]:
            raise InvalidInput(f"condition embeddings of width {embeddings.shape[-1]}, the index's are "
                               f"{self.embeddings.shape[-1]}")
        embeddings, points = embeddings.detach().cpu(), points.detach().cpu()
        q = make_keys(points, embeddings, self.spec.desc_scale).numpy()
        _, idx = self.index.search(np.ascontiguousarray(q, dtype=np.float32), 1)
        out = torch.from_numpy(idx[:, 0].astype(np.int64))
        null = self.is_null(embeddings)
        if bool(null.any()):
            if self._latent_index is None:
                self._latent_index = build_faiss(self.latents.reshape(self.latents.shape[0], -1).float(), "flat")
            flat = points[null].reshape(int(null.sum()), -1).float().numpy()
            _, idx_u = self._latent_index.search(np.ascontiguousarray(flat, dtype=np.float32), 1)
            out[null] = torch.from_numpy(idx_u[:, 0].astype(np.int64))
        return out


# ----- building ---------------------------------------------------------------------------------------------------
def encode_pairs(encoder: ShapesEncoder, seed: int, start: int, count: int) -> dict[str, torch.Tensor | list]:
    """Pairs ``start .. start + count - 1`` of dataset ``seed``: latents, embeddings, captions."""
    from fastdiff.models.shapes import render

    images, examples = render.batch(seed, start, count)
    captions = [e.caption for e in examples]
    return {"latent": encoder.encode(images), "embedding": encoder.embed(captions), "captions": captions}


def build_shards(spec: TextIndexSpec, out: Path, encoder: ShapesEncoder, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> list[int]:
    """Render and encode this rank's missing shards (a shard file that exists is complete: written atomically)."""
    from safetensors.torch import save
    from tqdm.auto import tqdm

    shards = (spec.num_pairs + spec.shard_size - 1) // spec.shard_size
    todo = [k for k in range(rank, shards, world_size) if not _shard_path(out, k).exists()]
    for k in tqdm(todo, desc=f"text coalescer index rank {rank}/{world_size}", disable=not progress,
                  position=rank):
        start = k * spec.shard_size
        count = min(spec.shard_size, spec.num_pairs - start)
        t0 = time.perf_counter()
        p = encode_pairs(encoder, spec.data_seed, start, count)
        data = {"index": torch.arange(start, start + count), "latent": p["latent"].contiguous(),
                "embedding": p["embedding"].contiguous()}
        meta = {"captions": json.dumps(p["captions"]), "seconds": f"{time.perf_counter() - t0:.3f}"}
        atomic_write_bytes(_shard_path(out, k), save(data, metadata=meta))
    return todo


def merge_and_index(spec: TextIndexSpec, out: Path, encoder: ShapesEncoder) -> Path:
    """Merge the shards into ``pairs.safetensors``, build ``index.faiss``, write the manifest (rank 0)."""
    from safetensors import safe_open
    from safetensors.torch import save

    faiss = _faiss()
    t0 = time.perf_counter()
    parts, captions, encode_s = [], [], 0.0
    for p in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(p), "pt") as f:
            parts.append({k: f.get_tensor(k) for k in f.keys()})
            captions += json.loads(f.metadata()["captions"])
            encode_s += float(f.metadata()["seconds"])
    if not parts:
        raise InvalidInput(f"no shards in {out}; run the build, it resumes where it stopped")
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    n = merged["index"].shape[0]
    if n != spec.num_pairs or merged["index"].tolist() != list(range(n)):
        raise InvalidInput(f"shards in {out} do not cover pairs 0..{spec.num_pairs - 1} in order; rerun the build")
    null = encoder.embed([""])[0]
    index = build_faiss(make_keys(merged["latent"], merged["embedding"], spec.desc_scale), spec.index_type)
    atomic_write_bytes(out / PAIRS, save({"latent": merged["latent"], "embedding": merged["embedding"],
                                          "null_embedding": null.contiguous()},
                                         metadata={"captions": json.dumps(captions)}))
    atomic_write_bytes(out / INDEX, faiss.serialize_index(index).tobytes())
    manifest = {"format": FORMAT, "spec": asdict(spec), "num_pairs": n,
                "latent_shape": list(merged["latent"].shape[1:]), "embedding_dim": int(merged["embedding"].shape[1]),
                "encoders": {"text_encoder_sha256": encoder.text_sha256, "vae_sha256": encoder.vae_sha256},
                # the wall time of building: rendering + encoding (summed over shards, whichever run or rank made
                # them) and this merge + faiss build; a coalescer's recorded wall_s adds it to its training time
                "build_wall_s": round(encode_s + time.perf_counter() - t0, 1),
                "files": {name: {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
                          for name in (PAIRS, INDEX)}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


def build_index(spec: TextIndexSpec, out: str | os.PathLike, progress: bool = True,
                encoder: ShapesEncoder | None = None) -> Path | None:
    """Entry point for every process of a (torchrun) job: encode this rank's shards, barrier, rank 0 merges and
    builds the faiss index. Returns the directory on rank 0, None on the others."""
    out = Path(out)
    spec.check()
    loaded = []  # the encoder is loaded after the settings check (a refused --out costs no model load)

    def build(rank: int, world: int) -> None:
        loaded.append(encoder or ShapesEncoder())
        build_shards(spec, out, loaded[0], rank, world, progress=progress)

    return run_sharded_build(spec, out, build, lambda: merge_and_index(spec, out, loaded[0]), FORMAT,
                             "text coalescer index")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a complete text index, else :class:`InvalidInput` (also for a digits index)."""
    out = Path(path)
    if out.is_dir() and (out / MANIFEST).is_file():
        try:
            fmt = json.loads((out / MANIFEST).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt == "fastdiff.coalescer_index":
            raise InvalidInput(f"the index at {path} is a label (digits) coalescer index, not a text one; build one "
                               "with `python -m fastdiff distill coalescer-index --model shapes`")
    m = read_build_manifest(out, FORMAT, "text coalescer index") if out.is_dir() else None
    if m is None or "files" not in m:
        raise InvalidInput(f"no complete text coalescer index at {path} (expected {MANIFEST} with its files; build "
                           "one with `python -m fastdiff distill coalescer-index --model shapes`)")
    return m


def load_index(path: str | os.PathLike, model: str | None = None,
               encoder: ShapesEncoder | None = None) -> TextCoalescerIndex:
    """Load a built index, checking its manifest, its files' sha256, the model it was built for, and (given an
    ``encoder``) that the embeddings and latents came from that encoder's weights."""
    from safetensors import safe_open

    out = Path(path)
    m = read_manifest(out)
    spec = TextIndexSpec(**m["spec"])
    if model is not None and spec.model != model:
        raise InvalidInput(f"the index at {path} was built for model {spec.model!r}, not {model!r}")
    if encoder is not None:
        want = {"text_encoder_sha256": encoder.text_sha256, "vae_sha256": encoder.vae_sha256}
        if m.get("encoders") != want:
            raise InvalidInput(f"the index at {path} was built with another text encoder or VAE than the shipped "
                               "shapes pipeline's (their sha256 differ): rebuild the index")
    for name, rec in m["files"].items():
        f = out / name
        if not f.is_file() or f.stat().st_size != rec["size"] or sha256_file(f) != rec["sha256"]:
            raise InvalidInput(f"{f} is missing or not the file its manifest records (modified or truncated); "
                               "rebuild the index")
    with safe_open(str(out / PAIRS), "pt") as f:
        pairs = {k: f.get_tensor(k) for k in f.keys()}
        captions = json.loads(f.metadata()["captions"])
    index = _faiss().deserialize_index(np.frombuffer((out / INDEX).read_bytes(), dtype=np.uint8))
    return TextCoalescerIndex(spec, pairs["latent"], pairs["embedding"], pairs["null_embedding"], index, captions,
                              out, sha256=m["files"][PAIRS]["sha256"], encoders=m.get("encoders"))
