"""The ``shapes`` judge, GenEval-style: an object detector trained on rendered ground truth only, and a scorer of
prompt adherence built on it.

**Detector.** A small CNN maps a 64x64 image to an 8x8 grid of cells (8 px each); per cell it predicts whether an
object's centre lies in it, the object's colour, shape and size, and the centre's offset inside the cell
(CenterNet-style). Detections are the cells whose objectness is highest in their 3x3 neighbourhood and whose
neighbourhood's objectness sums to :data:`THRESHOLD` or more (two objects of a grammar scene are >= 24 px apart,
so never in neighbouring cells). It is trained by
``python -m fastdiff train shapes-judge`` (:mod:`fastdiff.quality.train_shapes_judge`) on renders of the caption
grammar and of free layouts of 0-3 objects, with blur, noise, dimming and desaturation so that a generator's
slightly soft or dull objects are still read; never on generated images.

**Fully correct** (:func:`check`), for a prompt parsed by :func:`fastdiff.models.shapes.parse_caption`:

* one object: exactly one object detected, of the prompt's colour and shape, and, if the prompt names a
  position, the nearest of the five position anchors (:data:`fastdiff.models.shapes.render.ANCHORS`) is it;
* two objects: exactly two detected, one of each named colour + shape, and the relation holds along the axis
  that dominates their offset ("A left of B": B - A is mostly horizontal and positive), the rule the renderer
  guarantees with a 2x margin.

Size is not part of "fully correct" (the issue's criterion is colour, shape, position / relation); ``score``
reports the size accuracy of the prompts that name sizes separately. The Fréchet distance is computed in the
detector's pooled feature space (:meth:`ShapesDetector.features`) against renders of the same prompts.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff._atomic import atomic_write_bytes, check_recorded_sha256, read_format_json, sha256_file
from fastdiff.errors import InvalidInput, ModelConfigError
from fastdiff.models.registry import WEIGHTS_DIR
from fastdiff.models.shapes import render
from fastdiff.models.shapes.captions import caption, parse_caption
from fastdiff.models.shapes.scene import COLORS, RELATIONS, SHAPES, SIZES, ObjectSpec, SceneSpec

JUDGE_DIR = WEIGHTS_DIR / "shapes-judge"
FORMAT = "fastdiff.shapes_judge"
CELL = 8
GRID = render.IMAGE_SIZE // CELL
COLOR_NAMES, SHAPE_NAMES = tuple(COLORS), SHAPES
#: summed objectness of a peak's 3x3 neighbourhood above which it is an object (the sigmoid's midpoint)
THRESHOLD = 0.5
#: head channels: objectness, colour logits, shape logits, size logits, centre offset in the cell (x, y)
HEAD = {"objectness": slice(0, 1), "color": slice(1, 7), "shape": slice(7, 10), "size": slice(10, 12),
        "offset": slice(12, 14)}
WIDTHS = (24, 32, 48, 64, 96, 96, 96)
STRIDES = (1, 2, 2, 1, 2, 1, 1)  # 64 -> 8: receptive field 57 px, more than the largest object (23 px)


class ShapesDetector(nn.Module):
    """``(B, 3, 64, 64)`` images in [0, 1] -> head map ``(B, 14, 8, 8)`` (see :data:`HEAD`)."""

    def __init__(self, widths=WIDTHS, strides=STRIDES):
        super().__init__()
        layers, c = [], 3
        for w, s in zip(widths, strides, strict=True):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, HEAD["offset"].stop, 1)
        self.feature_dim = 2 * c

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean- and max-pooled last feature map ``(B, 2 * 96)``: the space of the Fréchet distance."""
        f = self.feature_map(x)
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    score: float


def as_images(images) -> torch.Tensor:
    """Images as ``(B, 3, 64, 64) float32`` in [0, 1], from a tensor ``(B, 3, H, W)`` (float in [0, 1] or uint8),
    a numpy array ``(B, H, W, 3)`` (uint8 or float in [0, 1], diffusers' ``output_type="np"``) or a list of PIL
    images; other sizes are resized (bilinear, antialiased). Refuses anything else with :class:`InvalidInput`."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidInput("no images to judge")
        try:
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        except AttributeError as e:
            raise InvalidInput(f"a list of images must hold PIL images, got {type(images[0]).__name__}") from e
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInput(f"numpy images must be (B, H, W, 3), got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise InvalidInput(f"images must be a tensor, a numpy array or a list of PIL images, got "
                           f"{type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise InvalidInput(f"image tensors must be (B, 3, H, W) with B >= 1, got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all():
        raise InvalidInput("images hold NaN or infinite values")
    if x.shape[-2:] != (render.IMAGE_SIZE, render.IMAGE_SIZE):
        x = F.interpolate(x, size=(render.IMAGE_SIZE, render.IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def detect(model: ShapesDetector, images, threshold: float = THRESHOLD, batch_size: int = 256
           ) -> list[list[Detection]]:
    """The objects the detector finds in each image, highest score first."""
    x = as_images(images)
    model.eval()
    out = []
    for s in range(0, x.shape[0], batch_size):
        head = model(x[s:s + batch_size])
        obj = torch.sigmoid(head[:, HEAD["objectness"]])
        # an object centred near a cell corner (every position anchor is one) can split its objectness over up to
        # 4 cells, none above the threshold: a peak's score is the objectness summed over its 3x3 neighbourhood.
        # Measured on 1,000 held-out renders per kind: the peak's own value miscounted 0.1 % (one object) and
        # 0.2 % (two), the sum none; on free layouts of 0-3 objects 97.8 % vs 98.0 % counted right.
        mass = F.conv2d(obj, obj.new_ones(1, 1, 3, 3), padding=1)
        peak = (mass >= threshold) & (obj == F.max_pool2d(obj, 3, stride=1, padding=1))
        color, shape, size = (head[:, HEAD[k]].argmax(1) for k in ("color", "shape", "size"))
        offset = torch.sigmoid(head[:, HEAD["offset"]])
        for b in range(head.shape[0]):
            dets = []
            for gy, gx in peak[b, 0].nonzero().tolist():
                dets.append(Detection(SHAPE_NAMES[shape[b, gy, gx]], COLOR_NAMES[color[b, gy, gx]],
                                      SIZES[size[b, gy, gx]], float((gx + offset[b, 0, gy, gx]) * CELL),
                                      float((gy + offset[b, 1, gy, gx]) * CELL), min(1.0, float(mass[b, 0, gy, gx]))))
            out.append(sorted(dets, key=lambda d: -d.score))
    return out


def nearest_position(cx: float, cy: float) -> str:
    """The position whose anchor is nearest to ``(cx, cy)`` px."""
    return min(render.ANCHORS, key=lambda k: (cx - render.ANCHORS[k][0]) ** 2 + (cy - render.ANCHORS[k][1]) ** 2)


def relation_between(a, b) -> str:
    """The relation ``a <relation> b`` along the axis that dominates the offset ``b - a`` (objects with cx, cy)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _same(o: ObjectSpec, d: Detection) -> bool:
    return o.shape == d.shape and o.color == d.color


def _matched_orders(spec: SceneSpec, dets: list[Detection]) -> list[tuple[Detection, Detection]]:
    """For a two-object scene and two detections: the orders ``(da, db)`` in which the first named object matches
    ``da`` and the second ``db`` by colour and shape (none, one, or both when the two objects are alike)."""
    a, b = spec.objects
    return [(da, db) for da, db in ((dets[0], dets[1]), (dets[1], dets[0])) if _same(a, da) and _same(b, db)]


def check(spec: SceneSpec, dets: list[Detection], sizes: bool = False) -> bool:
    """Whether detections ``dets`` show the scene ``spec`` states, fully (see the module docstring); ``sizes``:
    also require every stated size."""
    if len(dets) != spec.num_objects:
        return False
    if spec.num_objects == 1:
        o, d = spec.objects[0], dets[0]
        return (_same(o, d) and (o.position is None or nearest_position(d.cx, d.cy) == o.position)
                and (not sizes or o.size in (None, d.size)))
    a, b = spec.objects
    for da, db in _matched_orders(spec, dets):
        if relation_between(da, db) == spec.relation:
            return not sizes or (a.size in (None, da.size) and b.size in (None, db.size))
    return False


#: why an image fails its prompt (:func:`error_kind`), in the order they are told apart
ERROR_KINDS = ("count", "colour", "shape", "colour and shape", "binding", "position", "relation")


def error_kind(spec: SceneSpec, dets: list[Detection]) -> str | None:
    """Why detections ``dets`` fail the scene ``spec`` (None: fully correct by :func:`check`), the first that
    applies of :data:`ERROR_KINDS`: ``count`` (not the named number of objects); the named colours / shapes not all
    there (``colour``, ``shape``, ``colour and shape``; for two objects compared as multisets); ``binding`` (two
    objects: every named colour and shape there, on the wrong objects); else ``position`` (one object) or
    ``relation`` (two objects, each right)."""
    if check(spec, dets):
        return None
    if len(dets) != spec.num_objects:
        return "count"
    if spec.num_objects == 1:
        o, d = spec.objects[0], dets[0]
        colour_ok, shape_ok, rest = o.color == d.color, o.shape == d.shape, "position"
    else:
        if _matched_orders(spec, dets):
            return "relation"
        colour_ok = sorted(o.color for o in spec.objects) == sorted(d.color for d in dets)
        shape_ok = sorted(o.shape for o in spec.objects) == sorted(d.shape for d in dets)
        rest = "binding"
    if colour_ok and shape_ok:
        return rest
    return "colour" if shape_ok else "shape" if colour_ok else "colour and shape"


@dataclass
class ShapesScore:
    """Per prompt: the parsed spec and why the image fails it (:func:`error_kind`; None: fully correct), whether
    it shows the sizes it names; fractions for one- and two-object prompts."""

    specs: list[SceneSpec]
    errors: list[str | None]
    size_correct: list[bool | None] = field(default_factory=list)  # None: the prompt names no size

    @property
    def correct(self) -> list[bool]:
        """Per prompt: fully correct (no error)."""
        return [e is None for e in self.errors]

    def _errors_of(self, n: int) -> list[str | None]:
        return [e for e, s in zip(self.errors, self.specs, strict=True) if s.num_objects == n]

    def error_rates(self) -> dict[str, dict[str, float]]:
        """``{"one_object" | "two_object": {kind: fraction of those prompts' images failing for it}}`` over every
        kind of :data:`ERROR_KINDS` (zeros included); a kind with no prompts is left out."""
        out = {}
        for n, key in ((1, "one_object"), (2, "two_object")):
            kinds = self._errors_of(n)
            if kinds:
                out[key] = {k: kinds.count(k) / len(kinds) for k in ERROR_KINDS}
        return out

    def _frac(self, n: int) -> float:
        kinds = self._errors_of(n)
        return float(np.mean([e is None for e in kinds])) if kinds else float("nan")

    @property
    def one_object(self) -> float:
        return self._frac(1)

    @property
    def two_object(self) -> float:
        return self._frac(2)

    @property
    def size_accuracy(self) -> float:
        named = [c for c in self.size_correct if c is not None]
        return float(np.mean(named)) if named else float("nan")


def score(model: ShapesDetector, images, prompts: list[str]) -> ShapesScore:
    """Judge ``images`` (anything :func:`as_images` takes) against their ``prompts``, one prompt per image;
    a prompt outside the caption grammar raises :class:`InvalidInput`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    specs = [parse_caption(p) for p in prompts]
    x = as_images(images)
    if x.shape[0] != len(specs):
        raise InvalidInput(f"{x.shape[0]} images for {len(specs)} prompts; give one prompt per image")
    dets = detect(model, x)
    errors = [error_kind(s, d) for s, d in zip(specs, dets, strict=True)]
    sized = [(e is None and check(s, d, sizes=True)) if any(o.size for o in s.objects) else None
             for s, d, e in zip(specs, dets, errors, strict=True)]
    return ShapesScore(specs, errors, sized)


@torch.no_grad()
def features(model: ShapesDetector, images, batch_size: int = 256) -> torch.Tensor:
    """Pooled detector features ``(B, 192)`` of images."""
    x = as_images(images)
    model.eval()
    return torch.cat([model.features(x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)])


# -- the fixed evaluation prompt set --------------------------------------------------------------------------------

#: image seeds per prompt of the evaluation (image k of prompt i is sampled with generator seed k)
EVAL_SEEDS = (0, 1, 2, 3)
#: seed of the ground-truth renders the Fréchet distance compares against (render i of prompt p: rng_for(seed, i))
REFERENCE_SEED = 2026


def eval_prompts() -> list[str]:
    """The fixed evaluation prompts, canonical wording, enumerated without randomness: the issue's five examples,
    then each colour x shape twice with positions cycling through none + the five, then 72 two-object prompts
    (pairs of distinct colour+shape objects at a fixed stride, relations cycling); duplicates dropped: 111 prompts,
    37 one-object and 74 two-object."""
    issue = ["a red circle", "a blue square on the left", "a yellow triangle at the top",
             "a red circle left of a blue square", "a green square above a magenta circle"]
    objs = [(c, s) for c in COLORS for s in SHAPES]
    positions = (None, *render.ANCHORS)
    one = [caption(SceneSpec((ObjectSpec(s, c, position=positions[(i + k) % 6]),)))
           for k in (0, 3) for i, (c, s) in enumerate(objs)]
    pairs = [(a, b) for a in objs for b in objs if a != b]  # 306
    two = []
    for j in range(72):
        (ca, sa), (cb, sb) = pairs[(j * 131) % len(pairs)]  # 131 is prime to 306: 72 distinct pairs spread out
        two.append(caption(SceneSpec((ObjectSpec(sa, ca), ObjectSpec(sb, cb)), RELATIONS[j % 4])))
    return list(dict.fromkeys(issue + one + two))


def reference_images(prompts: list[str], seed: int = REFERENCE_SEED) -> np.ndarray:
    """Ground-truth renders ``(N, 64, 64, 3) uint8``, one per prompt (unstated attributes drawn at random)."""
    return np.stack([render.render(render.random_scene(render.rng_for(seed, i), parse_caption(p)))
                     for i, p in enumerate(prompts)])


def frechet(model: ShapesDetector, images, reference) -> float:
    """Fréchet distance between the detector features of ``images`` and of ``reference`` images."""
    from fastdiff.quality.frechet import frechet_distance

    return frechet_distance(features(model, images), features(model, reference))


# -- shipping: save / load with a recorded sha256 -------------------------------------------------------------------

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save(model: ShapesDetector, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` (float16) and ``config.json`` (architecture, the weights' sha256, metadata)."""
    from safetensors.torch import save as st_save

    d = Path(directory)
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, st_save(state, metadata={"format": FORMAT}))
    cfg = {"format": FORMAT, "widths": list(WIDTHS), "strides": list(STRIDES), "threshold": THRESHOLD,
           "sha256": sha256_file(d / WEIGHTS_NAME), "metadata": dict(metadata or {})}
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
    return d


def load(directory: str | os.PathLike = JUDGE_DIR) -> ShapesDetector:
    """The detector in ``directory`` (default: the shipped one), its weights checked against the sha256 its
    config records; float32, eval mode. Damaged or missing files raise :class:`ModelNotFound`."""
    from safetensors.torch import load_file

    d = Path(directory)
    hint = "retrain it with `python -m fastdiff train shapes-judge`"
    cfg = read_format_json(d / CONFIG_NAME, FORMAT, "shapes judge config", hint)
    check_recorded_sha256(d / WEIGHTS_NAME, cfg.get("sha256"), "shapes judge weights", hint)
    try:
        model = ShapesDetector(tuple(cfg["widths"]), tuple(cfg["strides"]))
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v)
                               for k, v in load_file(str(d / WEIGHTS_NAME)).items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelConfigError(f"the shapes judge in {d} does not build: {str(e)[:300]}; {hint}") from e
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def shipped() -> ShapesDetector:
    """The shipped detector, loaded once."""
    return load(JUDGE_DIR)
