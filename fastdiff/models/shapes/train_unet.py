"""Train the ``shapes`` text-to-image model: ``python -m fastdiff train shapes [--steps N] [--out DIR] [--resume]``.

The UNet and the text encoder of :mod:`fastdiff.models.shapes.pipeline` learn together by the diffusion loss on
a VAE's latents (the shipped one, or ``--vae DIR``; the VAE and tokenizer stay frozen): v-prediction over the
cosine schedule (the digits recipe), the caption replaced by the empty prompt ``caption_dropout`` (10 %) of the
time so the same networks learn the unconditional model for classifier-free guidance. Data: fresh renders every
step, example ``i`` from ``render.example(seed, i)`` (a random scene, a random wording that may leave size or
position out), tokenized as ``StableDiffusionPipeline`` tokenizes prompts (padding to 24 tokens, truncation, no
attention mask), so the pipeline sees at sampling time exactly what training saw. AdamW, warm-up + cosine
learning rate, gradient clipping, an exponential moving average of both networks' weights: the EMA is what gets
saved.

Resumable: every ``--save-every`` steps a checkpoint (both networks, their EMAs, the optimizer, the step and the
generator state) is written atomically to ``OUT/checkpoint.pt``; ``--resume`` continues from it bit-for-bit with
the same thread count (the data stream is indexed by step). ``--resume --steps M`` with a larger ``M`` goes on
training, but the cosine learning rate is then stretched over the new total from that step on (recorded).
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

from fastdiff._atomic import atomic_write_bytes, check_writable, sha256_file
from fastdiff._checks import cli_int, cli_number
from fastdiff.errors import InvalidInput
from fastdiff.models.shapes import pipeline as P
from fastdiff.models.shapes import render
from fastdiff.models.train_digits import alphas_cumprod, lr_at, optimizer_step_with_ema

CHECKPOINT = "checkpoint.pt"


class LatentData:
    """The training stream: ``(latents (B, 4, 16, 16) scaled by the VAE's scaling_factor, captions)`` of examples
    ``start .. start + B - 1`` of dataset ``seed``. The VAE encodes deterministically (the posterior's mode)."""

    def __init__(self, seed: int = 0, vae: str | os.PathLike | None = None):
        from diffusers import AutoencoderKL

        from fastdiff.models.shapes.train_vae import VAE_DIR

        self.seed = seed
        self.vae = AutoencoderKL.from_pretrained(vae or VAE_DIR, torch_dtype=torch.float32).eval().requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def batch(self, start: int, count: int) -> tuple[torch.Tensor, list[str]]:
        imgs, exs = render.batch(self.seed, start, count)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.vae.encode(x).latent_dist.mode() * self.scale, [e.caption for e in exs]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def _check_vae(vae: str | os.PathLike | None, out: Path) -> str:
    """The sha256 of the VAE the UNet will learn (``vae`` or the shipped one), before any training: a folder
    that is not a VAE's is an ``InvalidInput`` now, not after an hour."""
    from fastdiff.models.shapes.train_vae import VAE_DIR

    folder = Path(vae) if vae is not None else VAE_DIR
    missing = [n for n in VAE_FILES if not (folder / n).is_file()]
    if missing:
        raise InvalidInput(f"--vae {folder}: not a VAE folder (lacks {', '.join(missing)}); make one with "
                           "`python -m fastdiff train shapes-vae --out DIR`")
    if vae is None and (out / "vae" / "config.json").is_file():
        raise InvalidInput(f"{out} holds its own VAE ({out / 'vae'}) that this run would not learn: pass "
                           f"--vae {out / 'vae'}, or another --out")
    return sha256_file(folder / "diffusion_pytorch_model.safetensors")


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def train(steps: int = 3000, batch_size: int = 64, lr: float = 8e-4, seed: int = 0, caption_dropout: float = 0.1,
          ema_decay: float = 0.999, out: str | os.PathLike | None = None, resume: bool = False,
          save_every: int = 250, progress: bool = True, log_every: int = 100, command: str | None = None,
          unet_config: dict | None = None, text_config: dict | None = None, vae: str | os.PathLike | None = None):
    """Train (or resume) the UNet and text encoder; write the EMA weights to ``out`` (default: the package's
    ``weights/shapes``) with :func:`pipeline.save_components`. ``vae``: a VAE folder (``train shapes-vae --out
    DIR``) to learn the latent space of instead of the shipped one; it is copied to ``out/vae`` so that ``out`` is
    a whole pipeline (:func:`pipeline.load_pipeline` decodes with it). ``unet_config`` / ``text_config``: other
    architectures than the pipeline's (tests use tiny ones). Returns ``(unet_ema, text_encoder_ema, metadata)``."""
    from tqdm.auto import tqdm

    out = Path(out) if out is not None else P.PIPELINE_DIR
    check_writable(out, "dir")
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise InvalidInput(f"--resume: there is no checkpoint {ckpt} to resume from")
    vae_sha = _check_vae(vae, out)
    tokenizer, _ = P._tokenizer_ids()
    data = LatentData(seed, vae)
    unet, text_encoder = P.build_unet(seed, unet_config), P.build_text_encoder(seed, text_config)
    unet_ema = copy.deepcopy(unet).eval().requires_grad_(False)
    te_ema = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)  # noise, timesteps and caption dropout
    start, spent = 0, 0.0
    meta = {"command": command or "python -m fastdiff.models.shapes.train_unet " + " ".join(sys.argv[1:]),
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "caption_dropout": caption_dropout,
            "ema_decay": ema_decay, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "vae_sha256": vae_sha}
    if resume:
        state = torch.load(ckpt, weights_only=False)
        if state.get("format") != "fastdiff.shapes_unet_checkpoint":
            raise InvalidInput(f"{ckpt} is not a checkpoint of `train shapes` (another trainer's?)")
        if state["meta"].get("vae_sha256", vae_sha) != vae_sha:
            raise InvalidInput(f"--resume: {ckpt} was trained on another VAE (sha256 differs); resume with the "
                               "same --vae, or start a new --out")
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (unet_ema, "unet_ema"),
                            (te_ema, "text_encoder_ema")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        start, spent = int(state["step"]), float(state["meta"].get("wall_s", 0.0))
        if start >= steps:
            raise InvalidInput(f"--resume: the checkpoint is at step {start}; ask for more --steps than that")
        meta["resumed_from"] = state["meta"].get("resumed_from", []) + [start]
    abar = alphas_cumprod(P.TRAIN_SCHEDULE["num_train_timesteps"], P.TRAIN_SCHEDULE["beta_schedule"])
    T = abar.shape[0]
    unet.train()
    text_encoder.train()
    t0 = time.time()
    avg = None
    bar = tqdm(range(start, steps), desc="train shapes", initial=start, total=steps, disable=not progress,
               mininterval=2.0)
    for step in bar:
        x0, captions = data.batch(step * batch_size, batch_size)
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        t = torch.randint(0, T, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1))
        cond = text_encoder(tokenize(tokenizer, captions))[0]
        loss = F.mse_loss(unet(xt, t, cond).sample, target)
        optimizer_step_with_ema(opt, loss, params, ((unet_ema, unet), (te_ema, text_encoder)), ema_decay, step)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {avg:.4f} elapsed {spent + time.time() - t0:.0f}s", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, {
                "format": "fastdiff.shapes_unet_checkpoint", "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(), "unet_ema": unet_ema.state_dict(),
                "text_encoder_ema": te_ema.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                "generator": g.get_state(), "meta": {**meta, "wall_s": spent + time.time() - t0}})
    meta["wall_s"] = round(spent + time.time() - t0, 1)
    meta["final_loss_ema"] = None if avg is None else round(avg, 5)
    if vae is not None and Path(vae).resolve() != (out / "vae").resolve():
        for name in VAE_FILES:  # the VAE first: save_components' manifest records the sha256 of out/vae
            atomic_write_bytes(out / "vae" / name, (Path(vae) / name).read_bytes())
    P.save_components(unet_ema, te_ema, out, meta)
    _save_checkpoint(ckpt, {
        "format": "fastdiff.shapes_unet_checkpoint", "unet": unet.state_dict(),
        "text_encoder": text_encoder.state_dict(), "unet_ema": unet_ema.state_dict(),
        "text_encoder_ema": te_ema.state_dict(), "opt": opt.state_dict(), "step": steps,
        "generator": g.get_state(), "meta": meta})
    print(f"saved the shapes UNet and text encoder to {out} after {steps} steps ({meta['wall_s']:.0f}s)", flush=True)
    return unet_ema, te_ema, meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=cli_int(1), default=3000)
    p.add_argument("--batch-size", type=cli_int(1), default=64)
    p.add_argument("--lr", type=cli_number(minimum=0.0), default=8e-4)
    p.add_argument("--caption-dropout", type=cli_number(0.0, 1.0), default=0.1,
                   help="fraction of captions replaced by the empty prompt (the unconditional model for CFG)")
    p.add_argument("--ema-decay", type=cli_number(0.0, 1.0), default=0.999)
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--save-every", type=cli_int(0), default=250, help="checkpoint period in steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default: the package's weights/shapes)")
    p.add_argument("--vae", default=None, help="a VAE folder from `train shapes-vae --out DIR` to learn the latents "
                   "of (default: the shipped one); copied to OUT/vae")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, caption_dropout=a.caption_dropout,
          ema_decay=a.ema_decay, out=a.out, resume=a.resume, save_every=a.save_every, progress=not a.no_progress,
          command=command, vae=a.vae)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.models.shapes.train_unet", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
