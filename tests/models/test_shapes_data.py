"""The shapes renderer and caption grammar: deterministic examples, captions that parse back to what they state,
geometry that matches what the scene says (measured on the pixels), bad captions refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fastdiff.errors import InvalidInput
from fastdiff.models.shapes import captions, render
from fastdiff.models.shapes.captions import caption, parse_caption
from fastdiff.models.shapes.scene import COLORS, ObjectSpec, SceneSpec

#: random examples the round-trip tests read (~2 ms each)
N_ROUNDTRIP = 1500
#: a rendered object's pixel centroid may sit this far (px) from its placed centre: anti-aliasing rounds edge
#: pixels, and a triangle's area centroid lies 0.3 r below its bounding box centre, which is excluded below
CENTROID_TOL_PX = 0.1


def test_examples_are_deterministic_per_seed_and_index():
    a, b = render.example(7, 123), render.example(7, 123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.scene == b.scene
    imgs, exs = render.batch(7, 120, 5)
    assert np.array_equal(imgs[3], a.image) and exs[3].caption == a.caption  # an index is the same in any batch
    others = [render.example(8, 123), render.example(7, 124)]
    assert all(not np.array_equal(o.image, a.image) or o.caption != a.caption for o in others)
    assert imgs.shape == (5, 64, 64, 3) and imgs.dtype == np.uint8


@pytest.mark.parametrize("text, spec", [
    ("a red circle", SceneSpec((ObjectSpec("circle", "red"),))),
    ("a blue square on the left", SceneSpec((ObjectSpec("square", "blue", position="left"),))),
    ("a yellow triangle at the top", SceneSpec((ObjectSpec("triangle", "yellow", position="top"),))),
    ("a red circle left of a blue square",
     SceneSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")),
    ("a green square above a magenta circle",
     SceneSpec((ObjectSpec("square", "green"), ObjectSpec("circle", "magenta")), "above")),
])
def test_the_issue_examples_parse_and_are_the_canonical_captions(text, spec):
    assert parse_caption(text) == spec
    assert caption(spec) == text
    assert parse_caption("  " + text.upper() + ". ") == spec  # case, punctuation and spaces do not matter


def test_random_captions_parse_back_to_what_they_state():
    seen_words = set()
    for i in range(N_ROUNDTRIP):
        ex = render.example(3, i)
        assert parse_caption(ex.caption) == ex.stated, ex.caption
        assert parse_caption(caption(ex.scene.spec)) == ex.scene.spec
        for said, full in zip(ex.stated.objects, ex.scene.spec.objects, strict=True):
            assert said.matches(full)
        assert ex.stated.relation == ex.scene.spec.relation
        seen_words.update(ex.caption.split())
    assert seen_words == set(captions.caption_words())  # every word of the grammar was exercised


def test_every_wording_parses():
    for size, words in captions.SIZE_WORDS.items():
        for w, (pos, phrases) in itertools.product(words, captions.POSITION_PHRASES.items()):
            for p in phrases:
                assert parse_caption(f"the {w} cyan triangle {p}") == SceneSpec(
                    (ObjectSpec("triangle", "cyan", size, pos),))
    for rel, phrases in captions.RELATION_PHRASES.items():
        for p, prefix in itertools.product(phrases, captions.PREFIXES):
            spec = parse_caption(f"{prefix} a big red circle {p} a small blue square")
            assert spec == SceneSpec((ObjectSpec("circle", "red", "large"), ObjectSpec("square", "blue", "small")),
                                     rel)


@pytest.mark.parametrize("text", ["", "a purple circle", "a red circle left of a red circle", "two red circles",
                                  "a red circle on the left of", "a red circle on the left of a blue square above",
                                  "a red circle in the corner", "circle red"])
def test_bad_captions_are_refused(text):
    with pytest.raises(InvalidInput):
        parse_caption(text)


def test_bad_specs_are_refused():
    with pytest.raises(InvalidInput):
        parse_caption(3)
    with pytest.raises(InvalidInput):
        ObjectSpec("hexagon", "red")
    with pytest.raises(InvalidInput):
        SceneSpec((ObjectSpec("circle", "red"),), "above")
    with pytest.raises(InvalidInput):
        SceneSpec((ObjectSpec("circle", "red", position="left"), ObjectSpec("square", "red")), "above")
    with pytest.raises(InvalidInput):
        SceneSpec(())


def _centroid(img: np.ndarray, color: str) -> tuple[float, float, float]:
    """(cx, cy, covered pixels) of the pixels of one colour, weighted by coverage (exact only for objects of
    colours that share no channel with another object's colour, e.g. red and blue)."""
    rgb = np.asarray(COLORS[color], np.float32)
    w = (img.astype(np.float32) @ rgb) / (rgb @ rgb)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum()), float(w.sum())


@pytest.mark.parametrize("shape, area", [("circle", np.pi), ("square", 1.7 ** 2)])
def test_pixels_show_the_placed_object(shape, area):
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = render.random_scene(rng, SceneSpec((ObjectSpec(shape, "red"),)))
        obj = scene.objects[0]
        cx, cy, covered = _centroid(render.render(scene), "red")
        assert abs(cx - obj.cx) < CENTROID_TOL_PX and abs(cy - obj.cy) < CENTROID_TOL_PX
        # coverage sums to the shape's area within the rounding of edge pixels to 1/255 (and 4x4 supersampling)
        assert covered == pytest.approx(area * obj.r ** 2, rel=0.03)


def test_layout_rules_hold_on_many_scenes():
    anchors = render.ANCHORS
    for i in range(N_ROUNDTRIP):
        scene = render.example(5, i).scene
        objs = scene.objects
        for o in objs:
            lo, hi = render.RADIUS[o.size]
            assert lo <= o.r <= hi and o.r <= o.cx <= 64 - o.r + 0.5 and o.r <= o.cy <= 64 - o.r + 0.5
        if len(objs) == 1:
            o = objs[0]
            nearest = min(anchors, key=lambda k: np.hypot(o.cx - anchors[k][0], o.cy - anchors[k][1]))
            assert nearest == scene.spec.objects[0].position
        else:
            a, b = objs
            axis, sign = render.RELATION_AXIS[scene.spec.relation]
            d = np.array([b.cx - a.cx, b.cy - a.cy])
            assert sign * d[axis] > 0 and abs(d[axis]) >= 2 * abs(d[1 - axis])  # the relation's axis dominates
            assert np.hypot(*d) >= a.r + b.r + 1  # never touching


def test_two_objects_render_where_placed():
    spec = SceneSpec((ObjectSpec("circle", "red", "small"), ObjectSpec("square", "blue", "large")), "below")
    rng = np.random.default_rng(1)
    for _ in range(10):
        scene = render.random_scene(rng, spec)
        img = render.render(scene)
        red, blue = _centroid(img, "red"), _centroid(img, "blue")
        assert red[1] > blue[1] + 20  # "below": larger y, by the pair gap
        assert abs(red[0] - scene.objects[0].cx) < CENTROID_TOL_PX


def test_free_layouts_do_not_touch():
    rng = np.random.default_rng(2)
    counts = set()
    for _ in range(300):
        objs = render.random_layout(rng)
        counts.add(len(objs))
        for a, b in itertools.combinations(objs, 2):
            assert np.hypot(a.cx - b.cx, a.cy - b.cy) >= max(12.0, a.r + b.r + 1)
    assert counts == {0, 1, 2, 3}
