"""The frozen encoder that representation alignment (:mod:`fastdiff.models.repa`) aligns the digits teacher to.

REPA needs a pretrained encoder of clean images; fastdiff trains its own here, **without labels**: a small masked
denoising autoencoder on scikit-learn's digits at 16x16. The encoder maps an image to a 4x4 grid of 64-wide
tokens; a 4-channel bottleneck (64 numbers, as many as the 8x8 source digit has pixels) and a decoder rebuild the
clean image from a corrupted copy (random 4x4 patches replaced by noise, plus Gaussian noise), so the tokens must
describe strokes and their context, not copy pixels. Only the encoder is shipped (float16 safetensors and a config
holding its sha256, checked on every load); the decoder is thrown away.

It is **never the judge**: quality is measured by :mod:`fastdiff.quality`'s classifier (trained with labels on a
fixed split), a different network trained with a different objective.

``python -m fastdiff train digits-repa-encoder`` retrains it (seeded; about a minute at 1 thread).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff._atomic import atomic_write_bytes, check_recorded_sha256, check_writable, read_format_json, sha256_file
from fastdiff._checks import cli_int, cli_number
from fastdiff.errors import ModelConfigError
from fastdiff.models import digits
from fastdiff.models.registry import WEIGHTS_DIR
from fastdiff.models.running_mean import running_mean

ENCODER_DIR = WEIGHTS_DIR / "digits-repa-encoder"
FORMAT = "fastdiff.repa_encoder"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
WIDTH, DIM = 32, 64
#: corruption of the autoencoder's input: each 4x4 patch is replaced by noise with this probability ...
MASK_PROB = 0.3
#: ... and Gaussian noise of this standard deviation is added everywhere (images are in [-1, 1])
NOISE_STD = 0.2
PATCH = 4


class RepaEncoder(nn.Module):
    """``(B, 1, 16, 16)`` images in [-1, 1] -> tokens ``(B, dim, 4, 4)``."""

    def __init__(self, width: int = WIDTH, dim: int = DIM):
        super().__init__()
        self.width, self.dim = width, dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(2 * width, dim, 3, stride=2, padding=1), nn.GELU(),    # 4x4
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Decoder(nn.Module):
    """Training-only: tokens -> 4-channel bottleneck -> image ``(B, 1, 16, 16)``."""

    def __init__(self, width: int = WIDTH, dim: int = DIM, bottleneck: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.GELU(), nn.Conv2d(dim, bottleneck, 1),
            nn.Conv2d(bottleneck, 2 * width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU(),      # 16x16
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


def corrupt(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x`` with random ``PATCH``-pixel squares replaced by noise and Gaussian noise added (see the constants)."""
    b, _, h, w = x.shape
    mask = (torch.rand(b, 1, h // PATCH, w // PATCH, generator=g) < MASK_PROB).float()
    mask = F.interpolate(mask, scale_factor=PATCH, mode="nearest")
    fill = torch.randn(x.shape, generator=g).clamp(-1, 1)
    return (1 - mask) * x + mask * fill + NOISE_STD * torch.randn(x.shape, generator=g)


def train(steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
          out: str | os.PathLike | None = None, progress: bool = True, command: str | None = None) -> RepaEncoder:
    """Train the masked denoising autoencoder on all 1,797 digits (labels unused) and save its encoder."""
    from tqdm.auto import tqdm

    out = check_writable(out if out is not None else ENCODER_DIR, "dir")
    x_all, _ = digits.load_digits_tensors()  # the labels are never used
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc, dec = RepaEncoder(), _Decoder()
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0, avg = time.time(), None
    bar = tqdm(range(steps), desc="train digits-repa-encoder", disable=not progress, mininterval=2.0)
    for _ in bar:
        x = x_all[torch.randint(0, x_all.shape[0], (batch_size,), generator=g)]
        loss = F.mse_loss(dec(enc(corrupt(x, g))), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
    enc.eval().requires_grad_(False)
    with torch.no_grad():  # clean-input reconstruction error, for the record
        clean_mse = F.mse_loss(dec.eval()(enc(x_all)), x_all).item()
    meta = {"command": command or "python -m fastdiff train digits-repa-encoder", "steps": steps,
            "batch_size": batch_size, "lr": lr, "seed": seed, "wall_s": round(time.time() - t0, 1),
            "final_loss_ema": round(avg, 5) if avg is not None else None,
            "clean_reconstruction_mse": round(clean_mse, 5),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "labels_used": False}
    save(enc, out, meta)
    print(f"saved the REPA encoder to {out} after {steps} steps in {meta['wall_s']:.0f}s "
          f"(clean reconstruction MSE {clean_mse:.4f})", flush=True)
    return enc


def save(model: RepaEncoder, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` (float16) and ``config.json`` (architecture, the weights' sha256, metadata)."""
    from safetensors.torch import save as st_save

    d = Path(directory)
    state = {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, st_save(state, metadata={"format": FORMAT}))
    cfg = {"format": FORMAT, "width": model.width, "dim": model.dim, "sha256": sha256_file(d / WEIGHTS_NAME),
           "metadata": dict(metadata or {})}
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return d


def load(directory: str | os.PathLike | None = None) -> RepaEncoder:
    """The encoder in ``directory`` (default: the shipped one), its weights checked against the sha256 its config
    records; float32, eval mode, frozen. Missing or damaged files raise :class:`ModelNotFound`."""
    from safetensors.torch import load_file

    d = Path(directory) if directory is not None else ENCODER_DIR
    hint = "retrain it with `python -m fastdiff train digits-repa-encoder`"
    cfg = read_format_json(d / CONFIG_NAME, FORMAT, "REPA encoder config", hint)
    check_recorded_sha256(d / WEIGHTS_NAME, cfg.get("sha256"), "REPA encoder weights", hint)
    try:
        model = RepaEncoder(int(cfg["width"]), int(cfg["dim"]))
        model.load_state_dict({k: v.float() for k, v in load_file(str(d / WEIGHTS_NAME)).items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelConfigError(f"the REPA encoder in {d} does not build: {str(e)[:300]}; {hint}") from e
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def shipped() -> RepaEncoder:
    """The shipped encoder, loaded once."""
    return load(ENCODER_DIR)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This trainer's options (``python -m fastdiff train digits-repa-encoder``)."""
    p.add_argument("--steps", type=cli_int(1), default=2000)
    p.add_argument("--batch-size", type=cli_int(1), default=128)
    p.add_argument("--lr", type=cli_number(minimum=0.0), default=2e-3)
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output directory (default: the package's weights/digits-repa-encoder)")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, out=a.out, progress=not a.no_progress,
          command=command)
    return 0
