"""The ``shapes`` world: its attribute vocabulary and the structured scene spec captions describe.

A scene is one or two objects on black. An object has a shape, a colour, a size and (one-object scenes only) a
position; two objects stand in a relation, ``objects[0] <relation> objects[1]``. :class:`SceneSpec` is what a
caption states: attributes a caption leaves out (``a red circle`` names no size or position) are ``None`` and mean
"any". :class:`Scene` (in :mod:`fastdiff.models.shapes.render`) is a spec with every attribute chosen and the
geometry placed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastdiff.errors import InvalidInput

SHAPES = ("circle", "square", "triangle")
#: saturated RGB, 0..255: the six primaries and secondaries
COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
#: a relation read the other way round: ``A left of B`` says the same as ``B right of A``
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption names it; ``size`` / ``position`` ``None``: not stated (any)."""

    shape: str
    color: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                     ("size", self.size, SIZES + (None,)),
                                     ("position", self.position, POSITIONS + (None,))):
            if value not in allowed:
                raise InvalidInput(f"object {name} must be one of {[a for a in allowed if a]}, got {value!r}")

    def matches(self, other: ObjectSpec) -> bool:
        """Whether ``other`` (a fully stated object) satisfies this spec: equal shape and colour, and equal size /
        position wherever this spec states one."""
        return (self.shape == other.shape and self.color == other.color
                and self.size in (None, other.size) and self.position in (None, other.position))


@dataclass(frozen=True)
class SceneSpec:
    """One object (``relation`` None), or two with ``objects[0] <relation> objects[1]``. Two objects never share
    both colour and shape (a caption could not say which is which) and carry no position of their own."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        n = len(self.objects)
        if n not in (1, 2):
            raise InvalidInput(f"a scene holds one or two objects, got {n}")
        if n == 1 and self.relation is not None:
            raise InvalidInput(f"a one-object scene has no relation, got {self.relation!r}")
        if n == 2:
            if self.relation not in RELATIONS:
                raise InvalidInput(f"a two-object scene needs a relation, one of {list(RELATIONS)}; "
                                   f"got {self.relation!r}")
            a, b = self.objects
            if (a.shape, a.color) == (b.shape, b.color):
                raise InvalidInput(f"the two objects must differ in colour or shape, both are a {a.color} {a.shape}")
            if a.position is not None or b.position is not None:
                raise InvalidInput("objects of a two-object scene carry no position; the relation places them")

    @property
    def num_objects(self) -> int:
        return len(self.objects)
