"""The ``shapes`` world: a seeded renderer of one or two coloured shapes on black, their captions, and the
tokenizer of the caption grammar (the data of the small text-to-image pipeline ``shapes``). Images:
``render.render(scene)`` (the submodule, not re-exported under that name)."""

from fastdiff.models.shapes.captions import caption, describe, parse_caption
from fastdiff.models.shapes.render import IMAGE_SIZE, Example, PlacedObject, Scene, batch, example, random_scene
from fastdiff.models.shapes.scene import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectSpec, SceneSpec

__all__ = ["caption", "describe", "parse_caption", "IMAGE_SIZE", "Example", "PlacedObject", "Scene", "batch",
           "example", "random_scene", "COLORS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "ObjectSpec",
           "SceneSpec"]
