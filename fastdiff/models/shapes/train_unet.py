"""Train the ``shapes`` text-to-image model: ``python -m fastdiff train shapes [--steps N] [--out DIR] [--resume]``.

The UNet and the text encoder of :mod:`fastdiff.models.shapes.pipeline` learn together by the diffusion loss on
a VAE's latents (the shipped one, or ``--vae DIR``; the VAE and tokenizer stay frozen): v-prediction over the
cosine schedule (the digits recipe), the caption replaced by the empty prompt ``caption_dropout`` (10 %) of the
time so the same networks learn the unconditional model for classifier-free guidance. Data: fresh renders every
step, example ``i`` from ``render.example(seed, i)`` (a random scene, a random wording that may leave size or
position out), tokenized as ``StableDiffusionPipeline`` tokenizes prompts (padding to 24 tokens, truncation, no
attention mask), so the pipeline sees at sampling time exactly what training saw. AdamW, warm-up + cosine
learning rate, gradient clipping, an exponential moving average of both networks' weights: the EMA is what gets
saved. By default (``--word-loss-weight 0.1``) a small auxiliary loss keeps every caption word recoverable from the
text encoder's output (:mod:`fastdiff.models.shapes.word_identity`), which keeps runs from scratch from merging
"circle" and "square"; the shipped teacher was trained before it existed (``--word-loss-weight 0``).

Resumable: every ``--save-every`` steps a checkpoint (both networks, their EMAs, the optimizer, the step and the
generator state) is written atomically to ``OUT/checkpoint.pt``; ``--resume`` continues from it bit-for-bit with
the same thread count (the data stream is indexed by step). ``--resume --steps M`` with a larger ``M`` goes on
training, but the cosine learning rate is then stretched over the new total from that step on (recorded).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff._atomic import atomic_write_bytes, atomic_write_text, check_writable, sha256_file
from fastdiff._checks import check_int, cli_int, cli_number
from fastdiff.errors import InvalidInput
from fastdiff.models.lr_schedule import default_warmup, set_lr
from fastdiff.models.running_mean import running_mean
from fastdiff.models.shapes import pipeline as P
from fastdiff.models.shapes import render, word_identity
from fastdiff.models.train_digits import alphas_cumprod, optimizer_step_with_ema

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
    def batch(self, start: int, count: int, with_features: bool = False):
        """``(latents, captions)``; with ``with_features`` also, last, the VAE encoder's mid-block features of the
        images (REPA's target, what :class:`~fastdiff.models.repa.VaeFeatures` computes), caught by a hook during
        this same encode instead of a second pass through the encoder's trunk."""
        imgs, exs = render.batch(self.seed, start, count)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        caught: list[torch.Tensor] = []
        hook = (self.vae.encoder.mid_block.register_forward_hook(lambda _m, _i, out: caught.append(out))
                if with_features else None)
        try:
            latents = self.vae.encode(x).latent_dist.mode() * self.scale
        finally:
            if hook is not None:
                hook.remove()
        captions = [e.caption for e in exs]
        return (latents, captions, caught[0]) if with_features else (latents, captions)


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
          unet_config: dict | None = None, text_config: dict | None = None, vae: str | os.PathLike | None = None,
          repa_weight: float = 0.0, repa_layer: str = "mid_block", eval_every: int = 0,
          curve: str | os.PathLike | None = None, eval_steps: int = 10, eval_seeds: tuple[int, ...] = (0, 1),
          word_loss_weight: float = word_identity.DEFAULT_WEIGHT):
    """Train (or resume) the UNet and text encoder; write the EMA weights to ``out`` (default: the package's
    ``weights/shapes``) with :func:`pipeline.save_components`. ``vae``: a VAE folder (``train shapes-vae --out
    DIR``) to learn the latent space of instead of the shipped one; it is copied to ``out/vae`` so that ``out`` is
    a whole pipeline (:func:`pipeline.load_pipeline` decodes with it). ``unet_config`` / ``text_config``: other
    architectures than the pipeline's (tests use tiny ones). Returns ``(unet_ema, text_encoder_ema, metadata)``.

    ``repa_weight`` (lambda >= 0): representation alignment (:mod:`fastdiff.models.repa`) of the UNet block
    ``repa_layer`` to the frozen VAE encoder's features of the clean image (:class:`~fastdiff.models.repa.VaeFeatures`);
    0 runs the plain loop bit for bit. ``eval_every`` K > 0: every K steps (and at the end) judge the EMA weights
    (:func:`fastdiff.quality.shapes_eval.evaluate`: the judge's prompts x ``eval_seeds``, ``eval_steps`` sampler
    steps, the default guidance) and write the points to ``curve`` (JSON); evaluation time is not training time.

    ``word_loss_weight`` (default 0.1) > 0: the text encoder must also keep every word of the caption recoverable
    from its output (:mod:`fastdiff.models.shapes.word_identity`: without it, from-scratch runs can merge "circle"
    and "square"); 0 runs the plain diffusion loop, the one the shipped teacher was trained with. Every log line
    and the metadata carry the EMA text encoder's :func:`~fastdiff.models.shapes.word_identity.text_contrast`."""
    from tqdm.auto import tqdm

    from fastdiff.models import repa

    out = Path(out) if out is not None else P.PIPELINE_DIR
    check_writable(out, "dir")
    repa_weight = repa.check_weight(repa_weight)
    word_loss_weight = word_identity.check_weight(word_loss_weight)
    eval_every = check_int("eval_every", eval_every, minimum=0)
    curve = check_writable(curve, "file", what="--curve") if curve is not None else None
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise InvalidInput(f"--resume: there is no checkpoint {ckpt} to resume from")
    vae_sha = _check_vae(vae, out)
    tokenizer, token_ids = P._tokenizer_ids()
    data = LatentData(seed, vae)
    unet, text_encoder = P.build_unet(seed, unet_config), P.build_text_encoder(seed, text_config)
    unet_ema = copy.deepcopy(unet).eval().requires_grad_(False)
    te_ema = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    align = None
    if repa_weight > 0:  # hook + projector (its own param group; not saved with the teacher); checks repa_layer
        align = repa.Alignment(types.SimpleNamespace(unet=unet), repa.VaeFeatures(data.vae), layer=repa_layer,
                               seed=seed)
        opt.add_param_group({"params": list(align.projector.parameters())})
    word_head = None
    if word_loss_weight > 0:  # its own param group, like the projector; kept in checkpoints, never shipped
        word_head = word_identity.WordIdentityHead(text_encoder.config.hidden_size, text_encoder.config.vocab_size,
                                                   token_ids["pad_token_id"], seed=seed)
        opt.add_param_group({"params": list(word_head.parameters())})
    g = torch.Generator().manual_seed(seed)  # noise, timesteps and caption dropout
    start, spent = 0, 0.0
    meta = {"command": command or "python -m fastdiff.models.shapes.train_unet " + " ".join(sys.argv[1:]),
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "caption_dropout": caption_dropout,
            "ema_decay": ema_decay, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "vae_sha256": vae_sha,
            **({"repa_weight": repa_weight, "repa_layer": repa_layer} if align is not None else {}),
            "word_loss_weight": word_loss_weight}
    points: list[dict] = []
    if resume:
        state = torch.load(ckpt, weights_only=False)
        if state.get("format") != "fastdiff.shapes_unet_checkpoint":
            raise InvalidInput(f"{ckpt} is not a checkpoint of `train shapes` (another trainer's?)")
        if state["meta"].get("vae_sha256", vae_sha) != vae_sha:
            raise InvalidInput(f"--resume: {ckpt} was trained on another VAE (sha256 differs); resume with the "
                               "same --vae, or start a new --out")
        was_weight, was_layer = state["meta"].get("repa_weight", 0.0), state["meta"].get("repa_layer")
        if was_weight != repa_weight or (repa_weight > 0 and was_layer != repa_layer):
            raise InvalidInput(f"--resume: {ckpt} was trained with --repa-weight {was_weight}"
                               f"{f' --repa-layer {was_layer}' if was_weight else ''}; resume with the same, or start "
                               "a new --out")
        was_words = state["meta"].get("word_loss_weight", 0.0)
        if was_words != word_loss_weight:
            raise InvalidInput(f"--resume: {ckpt} was trained with --word-loss-weight {was_words}; resume with the "
                               "same, or start a new --out")
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (unet_ema, "unet_ema"),
                            (te_ema, "text_encoder_ema")):
            module.load_state_dict(state[key])
        if align is not None:
            align.projector.load_state_dict(state["projector"])
        if word_head is not None:
            word_head.load_state_dict(state["word_head"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        start, spent = int(state["step"]), float(state["meta"].get("wall_s", 0.0))
        points = list(state.get("curve_points", []))
        if start >= steps:
            raise InvalidInput(f"--resume: the checkpoint is at step {start}; ask for more --steps than that")
        meta["resumed_from"] = state["meta"].get("resumed_from", []) + [start]
    abar = alphas_cumprod(P.TRAIN_SCHEDULE["num_train_timesteps"], P.TRAIN_SCHEDULE["beta_schedule"])
    T = abar.shape[0]
    unet.train()
    text_encoder.train()
    t0 = time.time()
    eval_s = 0.0  # time spent judging the curve's points, excluded from the training time
    avg = align_avg = word_avg = None
    contrast_ids = tokenize(tokenizer, list(word_identity.CONTRAST_PROMPTS.values()))  # the same every log line

    def checkpoint_state(step_done: int, wall_s: float) -> dict:
        return {"format": "fastdiff.shapes_unet_checkpoint", "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(), "unet_ema": unet_ema.state_dict(),
                "text_encoder_ema": te_ema.state_dict(), "opt": opt.state_dict(), "step": step_done,
                "generator": g.get_state(), "curve_points": points, "meta": {**meta, "wall_s": wall_s},
                **({"projector": align.projector.state_dict()} if align is not None else {}),
                **({"word_head": word_head.state_dict()} if word_head is not None else {})}

    bar = tqdm(range(start, steps), desc="train shapes", initial=start, total=steps, disable=not progress,
               mininterval=2.0)
    for step in bar:
        if align is None:
            x0, captions = data.batch(step * batch_size, batch_size)
        else:
            x0, captions, vae_features = data.batch(step * batch_size, batch_size, with_features=True)
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        t = torch.randint(0, T, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
        set_lr(opt, step, steps, lr, default_warmup(steps, cap=200))
        ids = tokenize(tokenizer, captions)
        cond = text_encoder(ids)[0]
        diffusion_loss = F.mse_loss(unet(xt, t, cond).sample, target)
        loss = diffusion_loss
        if word_head is not None:
            word_loss = word_head.loss(cond, ids)
            loss = loss + word_loss_weight * word_loss
            word_avg = running_mean(word_avg, word_loss.item())
        if align is not None:
            align_loss = align.loss(target=vae_features)
            loss = loss + repa_weight * align_loss
            align_avg = running_mean(align_avg, align_loss.item())
        optimizer_step_with_ema(opt, loss, params, ((unet_ema, unet), (te_ema, text_encoder)), ema_decay, step)
        # ``avg`` is the diffusion loss alone, comparable with a run without alignment
        avg = running_mean(avg, diffusion_loss.item())
        bar.set_postfix(loss=f"{avg:.4f}", **({"align": f"{align_avg:.4f}"} if align is not None else {}),
                        refresh=False)
        if log_every and (step + 1) % log_every == 0:
            extra = f" align {align_avg:.4f}" if align is not None else ""
            extra += f" words {word_avg:.4f}" if word_head is not None else ""
            contrast = word_identity.text_contrast(te_ema, contrast_ids)
            extra += " text " + " ".join(f"{k} {v:.2f}" for k, v in contrast.items())
            print(f"step {step + 1}/{steps} loss {avg:.4f}{extra} elapsed {spent + time.time() - t0 - eval_s:.0f}s",
                  flush=True)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            te = time.time()
            point = {"step": step + 1, "train_s": round(spent + te - t0 - eval_s, 1), "loss_ema": round(avg, 5),
                     **({"align_loss_ema": round(align_avg, 5)} if align is not None else {}),
                     **evaluate_ema(unet_ema, te_ema, vae, eval_steps, eval_seeds)}
            eval_s += time.time() - te
            points.append(point)
            print(f"eval step {point['step']}: one-object {100 * point['one_object']:.1f}% two-object "
                  f"{100 * point['two_object']:.1f}% FD {point['fd']:.1f} (train {point['train_s']:.0f}s, "
                  f"eval {time.time() - te:.0f}s)", flush=True)
            if curve is not None:
                atomic_write_text(curve, json.dumps({**meta, "eval_steps": eval_steps, "eval_seeds": list(eval_seeds),
                                                     "accuracy_is": "two_object", "points": points}, indent=1) + "\n")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, checkpoint_state(step + 1, spent + time.time() - t0 - eval_s))
    if align is not None:
        align.remove()
        meta["final_align_loss_ema"] = round(align_avg, 5)
    if word_head is not None and word_avg is not None:
        meta["final_word_loss_ema"] = round(word_avg, 5)
    meta["text_contrast"] = word_identity.text_contrast(te_ema, contrast_ids)
    meta["wall_s"] = round(spent + time.time() - t0 - eval_s, 1)
    meta["final_loss_ema"] = None if avg is None else round(avg, 5)
    if vae is not None and Path(vae).resolve() != (out / "vae").resolve():
        for name in VAE_FILES:  # the VAE first: save_components' manifest records the sha256 of out/vae
            atomic_write_bytes(out / "vae" / name, (Path(vae) / name).read_bytes())
    P.save_components(unet_ema, te_ema, out, meta)
    state = checkpoint_state(steps, meta["wall_s"])
    state["meta"] = meta
    _save_checkpoint(ckpt, state)
    print(f"saved the shapes UNet and text encoder to {out} after {steps} steps ({meta['wall_s']:.0f}s)", flush=True)
    return unet_ema, te_ema, meta


def evaluate_ema(unet_ema, te_ema, vae: str | os.PathLike | None, num_inference_steps: int = 10,
                 seeds: tuple[int, ...] = (0, 1)) -> dict:
    """The judge's scores of the EMA networks as a pipeline (saved to a temporary folder in float16, as shipped,
    decoding with ``vae`` or the shipped VAE): ``{"one_object", "two_object", "accuracy" (= two_object), "fd"}``
    over the judge's prompts x ``seeds`` at the teacher's default guidance. Sampling uses its own seeded
    generators, never the training stream."""
    import tempfile

    from fastdiff.quality.shapes_eval import evaluate

    with tempfile.TemporaryDirectory(prefix="fastdiff-shapes-eval-") as tmp:
        if vae is not None:
            for name in VAE_FILES:
                atomic_write_bytes(Path(tmp) / "vae" / name, (Path(vae) / name).read_bytes())
        P.save_components(unet_ema, te_ema, tmp, {"note": "a training-curve point"})
        r = evaluate(tmp, num_inference_steps=num_inference_steps, seeds=seeds, progress=False)
    return {"one_object": round(r.one_object, 4), "two_object": round(r.two_object, 4),
            "accuracy": round(r.two_object, 4), "fd": round(r.frechet, 3)}


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
    p.add_argument("--repa-weight", type=cli_number(minimum=0.0), default=0.0,
                   help="representation alignment weight lambda (0: off; REPA's default is 0.5)")
    p.add_argument("--repa-layer", default="mid_block",
                   help="UNet block aligned to the VAE encoder's features: down_blocks.0/1/2 or mid_block")
    p.add_argument("--word-loss-weight", type=cli_number(minimum=0.0), default=word_identity.DEFAULT_WEIGHT,
                   help="weight of the loss that keeps the caption's words recoverable from the text encoder's output "
                   "(default %(default)s; 0: off, the shipped teacher's loop; see "
                   "fastdiff.models.shapes.word_identity)")
    p.add_argument("--eval-every", type=cli_int(0), default=0,
                   help="judge the EMA weights every K steps (one- / two-object, FD) and write --curve (0: never)")
    p.add_argument("--eval-steps", type=cli_int(1), default=10, help="sampler steps of each curve point")
    p.add_argument("--curve", default=None, help="JSON file for the quality curve (with --eval-every)")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, caption_dropout=a.caption_dropout,
          ema_decay=a.ema_decay, out=a.out, resume=a.resume, save_every=a.save_every, progress=not a.no_progress,
          command=command, vae=a.vae, repa_weight=a.repa_weight, repa_layer=a.repa_layer, eval_every=a.eval_every,
          curve=a.curve, eval_steps=a.eval_steps, word_loss_weight=a.word_loss_weight)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.models.shapes.train_unet", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
