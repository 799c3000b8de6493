"""Captions of ``shapes`` scenes: written from a :class:`SceneSpec` with varied wording, and parsed back.

The grammar (every word of it is in the shipped tokenizer's vocabulary)::

    caption  := [prefix] object [position]            one object
              | [prefix] object relation object       two objects: objects[0] <relation> objects[1]
    object   := article [size] colour shape            "a red circle", "a big blue square"
    prefix   := "a picture of" | "an image of" | "a photo of" | "a drawing of"

with the synonyms of :data:`SIZE_WORDS`, :data:`POSITION_PHRASES` and :data:`RELATION_PHRASES`. The first
phrase of each table is the canonical wording (:func:`caption`), which gives the issue's examples exactly:
"a red circle", "a blue square on the left", "a yellow triangle at the top", "a red circle left of a blue square",
"a green square above a magenta circle". :func:`parse_caption` reads every caption :func:`describe` writes
(tested on thousands of random scenes) and raises :class:`InvalidInput` on anything else.
"""

from __future__ import annotations

import re

import numpy as np

from fastdiff.errors import InvalidInput
from fastdiff.models.shapes.scene import COLORS, SHAPES, ObjectSpec, SceneSpec

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left"),
    "right": ("on the right", "at the right", "to the right"),
    "top": ("at the top", "on the top", "near the top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "at the center", "in the centre"),
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
PREFIXES = ("a picture of", "an image of", "a photo of", "a drawing of")
ARTICLES = ("a", "one", "the")
ARTICLE_P = (0.8, 0.1, 0.1)
#: how often :func:`describe` states what a caption may leave out: a model trained on these captions also learns
#: "a red circle" (any size, anywhere), which is what an unconditioned attribute should mean
P_SIZE, P_POSITION, P_PREFIX = 0.5, 0.8, 0.2


def caption_words() -> list[str]:
    """Every word the grammar uses, sorted (the tokenizer's vocabulary is built from these)."""
    phrases = [*SHAPES, *COLORS, *PREFIXES, *ARTICLES, "an"]
    for table in (SIZE_WORDS, POSITION_PHRASES, RELATION_PHRASES):
        phrases += [p for ps in table.values() for p in ps]
    return sorted({w for p in phrases for w in p.split()})


def _object_text(obj: ObjectSpec, rng: np.random.Generator | None) -> str:
    words = ["a" if rng is None else str(rng.choice(ARTICLES, p=ARTICLE_P))]
    if obj.size is not None:
        words.append(SIZE_WORDS[obj.size][0] if rng is None else str(rng.choice(SIZE_WORDS[obj.size])))
    words += [obj.color, obj.shape]
    if obj.position is not None:
        table = POSITION_PHRASES[obj.position]
        words.append(table[0] if rng is None else str(rng.choice(table)))
    return " ".join(words)


def caption(spec: SceneSpec) -> str:
    """The canonical caption of ``spec`` (first wording of every table, no prefix)."""
    return _render_text(spec, None)


def _render_text(spec: SceneSpec, rng: np.random.Generator | None) -> str:
    if spec.num_objects == 1:
        return _object_text(spec.objects[0], rng)
    a, b = spec.objects
    rel = RELATION_PHRASES[spec.relation]
    return f"{_object_text(a, rng)} {rel[0] if rng is None else str(rng.choice(rel))} {_object_text(b, rng)}"


def mentioned(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """``spec`` with the attributes a random caption leaves out set to ``None`` (sizes with probability
    1 - :data:`P_SIZE`, a one-object position with 1 - :data:`P_POSITION`); shapes, colours and relations always
    stay."""
    objs = []
    for o in spec.objects:
        size = o.size if rng.random() < P_SIZE else None
        pos = o.position if (o.position is not None and rng.random() < P_POSITION) else None
        objs.append(ObjectSpec(o.shape, o.color, size, pos))
    return SceneSpec(tuple(objs), spec.relation)


def describe(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, SceneSpec]:
    """A random caption of the fully stated ``spec``: ``(text, the spec the text states)``; the second is what
    :func:`parse_caption` returns for the text."""
    said = mentioned(spec, rng)
    text = _render_text(said, rng)
    if rng.random() < P_PREFIX:
        text = f"{rng.choice(PREFIXES)} {text}"
    return text, said


def _alternation(table: dict[str, tuple[str, ...]]) -> str:
    # longest phrase first, so "to the left of" is not read as "to the left" followed by junk
    phrases = sorted((p for ps in table.values() for p in ps), key=len, reverse=True)
    return "|".join(re.escape(p) for p in phrases)


def _lookup(table: dict[str, tuple[str, ...]], phrase: str) -> str:
    return next(k for k, ps in table.items() if phrase in ps)


_ART = "(?:" + "|".join(ARTICLES + ("an",)) + ")"
_SIZE = _alternation(SIZE_WORDS)
_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)


def _object_re(i: int) -> str:
    return rf"(?:{_ART} )?(?:(?P<size{i}>{_SIZE}) )?(?P<color{i}>{_COLOR}) (?P<shape{i}>{_SHAPE})"


_PREFIX = "(?:(?:" + "|".join(re.escape(p) for p in PREFIXES) + ") )?"
_ONE = re.compile(rf"^{_PREFIX}{_object_re(0)}(?: (?P<position>{_alternation(POSITION_PHRASES)}))?$")
_TWO = re.compile(rf"^{_PREFIX}{_object_re(0)} (?P<relation>{_alternation(RELATION_PHRASES)}) {_object_re(1)}$")


def normalize(text: str) -> str:
    """Lower case, anything but letters as spaces, single spaces: the form :func:`parse_caption` matches."""
    return " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())


def parse_caption(text: str) -> SceneSpec:
    """The :class:`SceneSpec` a caption states; :class:`InvalidInput` if it is not a caption of the grammar."""
    if not isinstance(text, str):
        raise InvalidInput(f"a caption must be a string, got {type(text).__name__}")
    t = normalize(text)
    m = _TWO.match(t)
    if m:
        objs = tuple(_object_from(m, i) for i in (0, 1))
        return SceneSpec(objs, _lookup(RELATION_PHRASES, m["relation"]))
    m = _ONE.match(t)
    if m:
        pos = _lookup(POSITION_PHRASES, m["position"]) if m["position"] else None
        o = _object_from(m, 0)
        return SceneSpec((ObjectSpec(o.shape, o.color, o.size, pos),))
    raise InvalidInput(
        f"cannot read the caption {text!r}: expected one object ('a red circle', 'a blue square on the left') or "
        f"two in a relation ('a red circle left of a blue square'), with colours {list(COLORS)}, shapes "
        f"{list(SHAPES)}, sizes {[w for ws in SIZE_WORDS.values() for w in ws]}")


def _object_from(m: re.Match, i: int) -> ObjectSpec:
    size = _lookup(SIZE_WORDS, m[f"size{i}"]) if m[f"size{i}"] else None
    return ObjectSpec(m[f"shape{i}"], m[f"color{i}"], size)
