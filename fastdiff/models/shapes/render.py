"""The seeded renderer of ``shapes`` scenes: 64x64 RGB, saturated objects on black, anti-aliased edges.

Geometry, in pixels (the image spans [0, 64) on both axes, y down):

* an object's *radius* ``r`` is half its extent: small 5-6.5, large 9.5-11.5 (so a small object is 10-13 px wide,
  a large one 19-23 px: the two never overlap in size, and a small one is still ~3 cells of a 4x-downsampled
  latent); a circle of radius ``r``, a square of side ``1.7 r`` (about the circle's area), an upright triangle
  ``2 r`` wide and ``1.8 r`` high;
* one object sits at its position's anchor (left (16, 32), right (48, 32), top (32, 16), bottom (32, 48), center
  (32, 32)) moved by up to :data:`JITTER` px on each axis, so the nearest anchor is always its own position;
* two objects are :data:`PAIR_GAP` apart along the relation's axis (enough for two large ones not to touch) and
  at most :data:`PAIR_SPREAD` px off the centre line across it, so the relation's axis always dominates the offset
  between them (by 2x at least): which of "left of" and "above" holds is never ambiguous.

Edges are anti-aliased by 4x4 supersampling (pixel value = covered fraction). Everything is drawn from a numpy
``Generator``; :func:`example` seeds one from ``(seed, index)``, so any example is reproducible on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastdiff.models.shapes.captions import describe
from fastdiff.models.shapes.scene import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectSpec, SceneSpec

IMAGE_SIZE = 64
SUPERSAMPLE = 4
RADIUS = {"small": (5.0, 6.5), "large": (9.5, 11.5)}
ANCHORS = {"left": (16.0, 32.0), "right": (48.0, 32.0), "top": (32.0, 16.0), "bottom": (32.0, 48.0),
           "center": (32.0, 32.0)}
JITTER = 3.0
#: distance of two objects' centres along the relation's axis, px (two large objects need 2 * 11.5 + 1)
PAIR_GAP = (24.0, 32.0)
#: largest offset of each of two objects from the image's centre line across the relation's axis, px
PAIR_SPREAD = 6.0
#: a relation -> (axis: 0 = x, 1 = y, sign of objects[1] - objects[0] along it)
RELATION_AXIS = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}


@dataclass(frozen=True)
class PlacedObject:
    """An object drawn at centre ``(cx, cy)`` px with radius ``r`` px."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    """A fully stated :class:`SceneSpec` (every size set, the position of a single object set) and its placed
    objects, in the spec's order."""

    spec: SceneSpec
    objects: tuple[PlacedObject, ...]


@dataclass(frozen=True)
class Example:
    """One training example: the image ``(64, 64, 3) uint8``, its scene, a caption and the spec the caption
    states (attributes it leaves out are ``None``)."""

    image: np.ndarray
    scene: Scene
    caption: str
    stated: SceneSpec


def _choice(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def complete(spec: SceneSpec | None, rng: np.random.Generator, p_two: float = 0.5) -> SceneSpec:
    """``spec`` with every unstated attribute drawn at random (a whole random spec when ``spec`` is None: two
    objects with probability ``p_two``)."""
    if spec is None:
        n = 2 if rng.random() < p_two else 1
        objs = [ObjectSpec(_choice(rng, SHAPES), _choice(rng, tuple(COLORS))) for _ in range(n)]
        while n == 2 and (objs[0].shape, objs[0].color) == (objs[1].shape, objs[1].color):
            objs[1] = ObjectSpec(_choice(rng, SHAPES), _choice(rng, tuple(COLORS)))
        spec = SceneSpec(tuple(objs), _choice(rng, RELATIONS) if n == 2 else None)
    objs = []
    for o in spec.objects:
        size = o.size or _choice(rng, SIZES)
        pos = o.position or (_choice(rng, POSITIONS) if spec.num_objects == 1 else None)
        objs.append(ObjectSpec(o.shape, o.color, size, pos))
    return SceneSpec(tuple(objs), spec.relation)


def place(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Place the objects of a fully stated spec (see the module docstring for the geometry)."""
    radii = [float(rng.uniform(*RADIUS[o.size])) for o in spec.objects]
    if spec.num_objects == 1:
        o = spec.objects[0]
        ax, ay = ANCHORS[o.position]
        cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
        return Scene(spec, (PlacedObject(o.shape, o.color, o.size, float(cx), float(cy), radii[0]),))
    axis, sign = RELATION_AXIS[spec.relation]
    gap = rng.uniform(max(PAIR_GAP[0], radii[0] + radii[1] + 1.0), PAIR_GAP[1])
    mid = IMAGE_SIZE / 2 + rng.uniform(-JITTER, JITTER)
    along = (mid - sign * gap / 2, mid + sign * gap / 2)
    placed = []
    for o, r, a in zip(spec.objects, radii, along, strict=True):
        across = IMAGE_SIZE / 2 + rng.uniform(-PAIR_SPREAD, PAIR_SPREAD)
        cx, cy = (a, across) if axis == 0 else (across, a)
        placed.append(PlacedObject(o.shape, o.color, o.size, float(cx), float(cy), r))
    return Scene(spec, tuple(placed))


def random_layout(rng: np.random.Generator, counts=(0, 1, 2, 3), weights=(0.1, 0.35, 0.4, 0.15),
                  min_distance: float = 12.0) -> tuple[PlacedObject, ...]:
    """0-3 objects of random attributes anywhere in the image, not touching, centres at least ``min_distance`` px
    apart: layouts outside the caption grammar, so a detector trained on them also finds objects where a
    generator put them rather than where the grammar would."""
    n = int(rng.choice(counts, p=np.asarray(weights) / np.sum(weights)))
    placed: list[PlacedObject] = []
    while len(placed) < n:
        size = _choice(rng, SIZES)
        r = float(rng.uniform(*RADIUS[size]))
        cx, cy = (float(v) for v in rng.uniform(r, IMAGE_SIZE - r, size=2))
        if all(np.hypot(cx - p.cx, cy - p.cy) >= max(min_distance, r + p.r + 1.0) for p in placed):
            placed.append(PlacedObject(_choice(rng, SHAPES), _choice(rng, tuple(COLORS)), size, cx, cy, r))
    return tuple(placed)


_S = IMAGE_SIZE * SUPERSAMPLE
_GRID = (np.arange(_S, dtype=np.float32) + 0.5) / SUPERSAMPLE  # sample positions in pixel units


def coverage(obj: PlacedObject) -> np.ndarray:
    """The fraction of each pixel the object covers, ``(64, 64) float32`` in [0, 1]."""
    x, y = _GRID[None, :] - obj.cx, _GRID[:, None] - obj.cy
    r = obj.r
    if obj.shape == "circle":
        inside = x * x + y * y <= r * r
    elif obj.shape == "square":
        inside = (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    else:  # triangle: apex (0, -0.9 r), base y = 0.9 r from -r to r
        inside = (y <= 0.9 * r) & (np.abs(x) <= (y + 0.9 * r) / 1.8)
    cov = inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)
    return cov


def render_objects(objects) -> np.ndarray:
    """Draw placed objects in order (a later one covers an earlier one) on black: ``(64, 64, 3) uint8``."""
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for o in objects:
        cov = coverage(o)[..., None]
        img = img * (1.0 - cov) + cov * np.asarray(COLORS[o.color], np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(scene: Scene) -> np.ndarray:
    """The image of a scene, ``(64, 64, 3) uint8``."""
    return render_objects(scene.objects)


def rng_for(seed: int, index: int) -> np.random.Generator:
    """The generator of example ``index`` of dataset ``seed`` (independent of every other index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])


def random_scene(rng: np.random.Generator, spec: SceneSpec | None = None, p_two: float = 0.5) -> Scene:
    """A scene satisfying ``spec`` (a random one when None), placed."""
    return place(complete(spec, rng, p_two), rng)


def describe_example(seed: int, index: int, p_two: float = 0.5):
    """Example ``index`` of the dataset ``seed`` before rendering: ``(scene, caption, stated)``."""
    rng = rng_for(seed, index)
    scene = random_scene(rng, p_two=p_two)
    text, stated = describe(scene.spec, rng)
    return scene, text, stated


def example(seed: int, index: int, p_two: float = 0.5) -> Example:
    """Example ``index`` of the dataset ``seed``: a random scene, its image and a random caption of it."""
    scene, text, stated = describe_example(seed, index, p_two)
    return Example(render(scene), scene, text, stated)


def batch(seed: int, start: int, count: int, p_two: float = 0.5) -> tuple[np.ndarray, list[Example]]:
    """Examples ``start .. start + count - 1`` of dataset ``seed``: ``(images (count, 64, 64, 3) uint8,
    examples)``."""
    exs = [example(seed, i, p_two) for i in range(start, start + count)]
    return np.stack([e.image for e in exs]), exs
