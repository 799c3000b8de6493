"""Train the ``shapes`` judge's detector: ``python -m fastdiff train shapes-judge [--steps N] [--out DIR]``.

Data: renders only (:mod:`fastdiff.models.shapes.render`), drawn fresh every step, item ``i`` of the stream from
``rng_for(seed, i)``: half scenes of the caption grammar, half free layouts of 0-3 objects anywhere. Augmented
(seeded) so the detector reads imperfect images too: Gaussian blur (half the images, sigma up to 1.2 px),
dimming (x0.6-1), per-channel gains (x0.85-1), desaturation (up to 30 % towards grey), a dark background offset
(up to 0.04) and Gaussian noise (std up to 0.08). Loss: objectness BCE on the 8x8 cell grid, cross-entropy on
colour / shape / size and L1 on the centre offset at the cells holding an object centre.

Validation (:func:`validate`, recorded in the saved config): held-out renders (another seed) with random-wording
captions must be judged fully correct, and captions with one attribute changed (a colour, a shape, a position or
the relation) judged incorrect; :data:`REQUIRED` is the bar, the trainer exits 1 below it (weights are still
written, so they can be inspected).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff._atomic import check_writable
from fastdiff._checks import cli_int, cli_number
from fastdiff.models.lr_schedule import default_warmup, set_lr
from fastdiff.models.running_mean import running_mean
from fastdiff.models.shapes import render
from fastdiff.models.shapes.captions import caption, describe
from fastdiff.models.shapes.scene import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectSpec, SceneSpec
from fastdiff.quality import shapes_judge as J

#: the validation's held-out stream: renders from rng_for(VAL_SEED, i), never drawn in training
VAL_SEED = 999_983
#: the bar: fraction fully correct on ground truth, and fraction of mismatched captions rejected
REQUIRED = 0.99


def targets(scenes: list[tuple[render.PlacedObject, ...]]) -> dict[str, torch.Tensor]:
    """Per-cell training targets of placed objects: objectness ``(B, 1, 8, 8)``, colour / shape / size indices
    ``(B, 8, 8)`` (-1: no object centre in the cell) and the centre offset in the cell ``(B, 2, 8, 8)``."""
    B, G = len(scenes), J.GRID
    t = {"objectness": torch.zeros(B, 1, G, G), "offset": torch.zeros(B, 2, G, G),
         **{k: torch.full((B, G, G), -1, dtype=torch.long) for k in ("color", "shape", "size")}}
    for b, objs in enumerate(scenes):
        for o in objs:
            fx, fy = o.cx / J.CELL, o.cy / J.CELL
            gx, gy = min(int(fx), G - 1), min(int(fy), G - 1)
            t["objectness"][b, 0, gy, gx] = 1.0
            t["color"][b, gy, gx] = J.COLOR_NAMES.index(o.color)
            t["shape"][b, gy, gx] = J.SHAPE_NAMES.index(o.shape)
            t["size"][b, gy, gx] = SIZES.index(o.size)
            t["offset"][b, :, gy, gx] = torch.tensor([fx - gx, fy - gy])
    return t


def training_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, list]:
    """Items ``start ..`` of the training stream: ``(images (count, 3, 64, 64) in [0, 1], placed objects)``."""
    scenes = []
    for i in range(start, start + count):
        rng = render.rng_for(seed, i)
        scenes.append(render.random_scene(rng).objects if rng.random() < 0.5 else render.random_layout(rng))
    imgs = np.stack([render.render_objects(s) for s in scenes])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, scenes


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (5 taps; sigma ~0 leaves the image as it is)."""
    B, C, H, W = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, 5)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The seeded augmentation of the module docstring."""
    B = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    sigma = torch.where(u(B) < 0.5, 0.3 + 0.9 * u(B), torch.zeros(B))
    x = _blur(x, sigma)
    x = x * (0.6 + 0.4 * u(B, 1, 1, 1)) * (0.85 + 0.15 * u(B, 3, 1, 1))
    s = 0.3 * u(B, 1, 1, 1)
    x = x * (1 - s) + s * x.mean(1, keepdim=True)
    x = x + 0.04 * u(B, 1, 1, 1) + 0.08 * u(B, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)


def loss_fn(head: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    obj = head[:, J.HEAD["objectness"]]
    # pos_weight 4: a grid holds ~1.5 object cells among 64; weighting the few positives keeps recall high
    loss = F.binary_cross_entropy_with_logits(obj, t["objectness"], pos_weight=torch.tensor(4.0))
    for k in ("color", "shape", "size"):
        if (t[k] >= 0).any():
            loss = loss + F.cross_entropy(head[:, J.HEAD[k]], t[k], ignore_index=-1)
    pos = t["objectness"] > 0
    if pos.any():
        off = torch.sigmoid(head[:, J.HEAD["offset"]])
        loss = loss + 4.0 * (off - t["offset"]).abs()[pos.expand_as(off)].mean()
    return loss


# -- validation -----------------------------------------------------------------------------------------------------

def _other(rng: np.random.Generator, options, current):
    return str(rng.choice([o for o in options if o != current]))


def mismatch(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """``spec`` (fully stated) with one attribute changed: a colour, a shape, or the position / relation."""
    while True:
        what = str(rng.choice(["color", "shape", "place"]))
        if what == "place":
            if spec.num_objects == 1:
                o = spec.objects[0]
                return SceneSpec((ObjectSpec(o.shape, o.color, o.size, _other(rng, POSITIONS, o.position)),))
            return SceneSpec(spec.objects, _other(rng, RELATIONS, spec.relation))
        objs = list(spec.objects)
        k = int(rng.integers(len(objs)))
        o = objs[k]
        if what == "color":
            objs[k] = ObjectSpec(o.shape, _other(rng, tuple(COLORS), o.color), o.size, o.position)
        else:
            objs[k] = ObjectSpec(_other(rng, SHAPES, o.shape), o.color, o.size, o.position)
        if len(objs) == 1 or (objs[0].shape, objs[0].color) != (objs[1].shape, objs[1].color):
            return SceneSpec(tuple(objs), spec.relation)


def validate(model: J.ShapesDetector, n: int = 1000, seed: int = VAL_SEED) -> dict[str, float]:
    """Judge ``n`` held-out one-object and ``n`` two-object renders: fractions fully correct with a random caption
    of the scene (``truth_one`` / ``truth_two``), fractions judged incorrect with a mismatched canonical caption
    (``mismatch_one`` / ``mismatch_two``), and the size accuracy on captions that name sizes."""
    result = {}
    for n_obj, name in ((1, "one"), (2, "two")):
        imgs, truths, wrongs = [], [], []
        for i in range(n):
            rng = render.rng_for(seed, 2 * i + n_obj - 1)
            scene = render.random_scene(rng, p_two=float(n_obj == 2))
            imgs.append(render.render(scene))
            truths.append(describe(scene.spec, rng)[0])
            wrongs.append(caption(mismatch(scene.spec, rng)))
        imgs = np.stack(imgs)
        good, bad = J.score(model, imgs, truths), J.score(model, imgs, wrongs)
        result[f"truth_{name}"] = float(np.mean(good.correct))
        result[f"mismatch_{name}"] = 1.0 - float(np.mean(bad.correct))
        result[f"size_{name}"] = good.size_accuracy
    return result


# -- training -------------------------------------------------------------------------------------------------------

def train(steps: int = 1500, batch_size: int = 48, lr: float = 3e-3, seed: int = 0, val_size: int = 1000,
          out: str | os.PathLike | None = None, progress: bool = True, command: str | None = None
          ) -> tuple[J.ShapesDetector, dict[str, float]]:
    """Train, validate and save the detector to ``out`` (default: the shipped ``weights/shapes-judge``)."""
    from tqdm.auto import tqdm

    out = Path(out) if out is not None else J.JUDGE_DIR
    check_writable(out, "dir")
    torch.manual_seed(seed)
    model = J.ShapesDetector()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    warmup = default_warmup(steps, cap=50)
    t0 = time.time()
    avg = None
    model.train()
    bar = tqdm(range(steps), desc="train shapes-judge", disable=not progress, mininterval=2.0)
    for step in bar:
        x, scenes = training_batch(seed, step * batch_size, batch_size)
        x = augment(x, g)
        set_lr(opt, step, steps, lr, warmup, floor=0.02)
        loss = loss_fn(model(x), targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = running_mean(avg, loss.item())
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if progress and (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps} loss {avg:.4f} elapsed {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval().requires_grad_(False)
    metrics = validate(model, val_size)
    meta = {"command": command or "python -m fastdiff.quality.train_shapes_judge " + " ".join(sys.argv[1:]),
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_wall_s": round(train_s, 1),
            "final_loss_ema": round(avg, 5) if avg is not None else None, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "validation": {"n_per_kind": val_size, "seed": VAL_SEED, **{k: round(v, 5) for k, v in metrics.items()}}}
    J.save(model, out, meta)
    print(f"saved the shapes judge to {out} after {steps} steps in {train_s:.0f}s; validation on {val_size} "
          f"held-out renders per kind: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return model, metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This trainer's options (also ``python -m fastdiff train shapes-judge``'s)."""
    p.add_argument("--steps", type=cli_int(1), default=1500)
    p.add_argument("--batch-size", type=cli_int(1), default=48)
    p.add_argument("--lr", type=cli_number(minimum=0.0), default=3e-3)
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--val-size", type=cli_int(1), default=1000, help="held-out renders per kind (one/two objects)")
    p.add_argument("--threads", type=cli_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default: the package's weights/shapes-judge)")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, command: str | None = None) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    _, metrics = train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, val_size=a.val_size,
                       out=a.out, progress=not a.no_progress, command=command)
    low = {k: v for k, v in metrics.items() if not k.startswith("size") and v < REQUIRED}
    if low:
        print(f"error: the judge is below the {REQUIRED:.0%} bar: {low}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.quality.train_shapes_judge",
                                description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
