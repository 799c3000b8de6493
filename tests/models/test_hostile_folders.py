"""Hostile model folders: a ``config.json`` that is not an object, lacks keys, holds the wrong types or describes
a network too large for memory is refused with a typed error naming the key -- the last before anything is built."""

from __future__ import annotations

import json
import time

import pytest

from fastdiff.errors import ModelConfigError, ModelNotFound
from fastdiff.models import load, save
from fastdiff.models.registry import estimate_parameters
from tests.export.tiny_models import tiny_label_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save(tiny_label_model(), tmp_path_factory.mktemp("tiny") / "model")


def _with_config(folder, tmp_path, edit):
    """A copy of ``folder`` whose config.json is ``edit(config)`` (a dict to write, or raw text)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    new = edit(json.loads((folder / "config.json").read_text()))
    (d / "config.json").write_text(new if isinstance(new, str) else json.dumps(new))
    return d


def _unet(**kv):
    def edit(c):
        c["unet"].update(kv)
        return c
    return edit


def _top(**kv):
    def edit(c):
        c.update(kv)
        return c
    return edit


def _drop(key, section=None):
    def edit(c):
        (c[section] if section else c).pop(key)
        return c
    return edit


# (id, edit of the config, error type, message fragment)
CASES = [
    ("list", lambda c: [c], ModelConfigError, "must hold a JSON object, it holds a list"),
    ("not json", lambda c: "{oops", ModelNotFound, "cannot read"),
    ("format", _top(format="other"), ModelConfigError, "is not a fastdiff model config"),
    ("no unet", _drop("unet"), ModelConfigError, "lacks the key(s) ['unet']"),
    ("no num_classes", _drop("num_classes"), ModelConfigError, "lacks the key(s) ['num_classes']"),
    ("unet list", _top(unet=[1]), ModelConfigError, "'unet' must be an object"),
    ("no widths", _drop("block_out_channels", "unet"), ModelConfigError, "lacks the key(s) ['block_out_channels']"),
    ("num_classes string", _top(num_classes="10"), ModelConfigError, "num_classes must be an integer"),
    ("num_classes bool", _top(num_classes=True), ModelConfigError, "num_classes must be an integer"),
    ("num_classes 0", _top(num_classes=0), ModelConfigError, "num_classes must be an integer in [1,"),
    ("tokens float", _top(tokens=1.5), ModelConfigError, "tokens must be an integer"),
    ("widths string", _unet(block_out_channels="abc"), ModelConfigError, "block_out_channels must be a non-empty"),
    ("widths float", _unet(block_out_channels=[8, 16.5]), ModelConfigError, "block_out_channels[1] must be"),
    ("in_channels 0", _unet(in_channels=0), ModelConfigError, "unet.in_channels must be an integer >= 1"),
    ("layers list", _unet(layers_per_block=[1, 1, 1]), ModelConfigError, "layers_per_block must be an integer or"),
    ("block types", _unet(down_block_types=["DownBlock2D"]), ModelConfigError, "down_block_types must be a list"),
    ("scheduler list", _top(scheduler=[1]), ModelConfigError, "'scheduler' must be a JSON object"),
    ("defaults string", _top(defaults="fast"), ModelConfigError, "'defaults' must be a JSON object"),
    ("groups", _unet(norm_num_groups=3), ModelConfigError, "does not build a UNet2DConditionModel"),
    ("block name", _unet(down_block_types=["Nope", "CrossAttnDownBlock2D"]), ModelConfigError, "does not build"),
    ("weights mismatch", _unet(block_out_channels=[16, 32]), ModelNotFound, "do not match the config"),
    ("huge", _unet(block_out_channels=[8192, 16384]), ModelConfigError, "parameters"),
]


@pytest.mark.parametrize("edit,error,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(folder, tmp_path, edit, error, needle):
    d = _with_config(folder, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(error) as e:
        load(d)
    assert needle in str(e.value)
    assert time.perf_counter() - start < 10  # refused before building anything large


def test_the_size_estimate_is_close(folder):
    model = load(folder)
    actual = sum(p.numel() for p in model.unet.parameters())
    estimate = estimate_parameters(json.loads((folder / "config.json").read_text())["unet"])
    assert 0.7 < estimate / actual < 1.3
