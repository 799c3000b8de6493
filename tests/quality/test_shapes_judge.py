"""The shapes judge: the shipped detector passes its bar on fresh held-out renders, the fully-correct rule, input
handling, the Fréchet distance, the sha256 check on load, and the seeded trainer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.errors import InvalidInput, ModelConfigError, ModelNotFound
from fastdiff.models.shapes import parse_caption, render
from fastdiff.quality import shapes_judge as J
from fastdiff.quality import train_shapes_judge as T
from tests.cli_helpers import one_line_error

#: renders per kind (one / two objects) the validation test judges: 300 images, ~3 s on one core; the trainer
#: records the same measurement on 1,000 per kind
N_VALIDATE = 150
#: a held-out stream neither the trainer (its seed) nor its recorded validation (T.VAL_SEED) drew from
FRESH_SEED = 424_242


@pytest.fixture(scope="module")
def judge():
    return J.shipped()


def test_shipped_judge_meets_its_bar_on_fresh_renders(judge):
    m = T.validate(judge, N_VALIDATE, seed=FRESH_SEED)
    for k in ("truth_one", "truth_two", "mismatch_one", "mismatch_two"):
        assert m[k] >= T.REQUIRED, m


def test_shipped_judge_records_its_validation():
    cfg = json.loads((J.JUDGE_DIR / J.CONFIG_NAME).read_text())
    v = cfg["metadata"]["validation"]
    assert v["n_per_kind"] >= 1000
    assert min(v["truth_one"], v["truth_two"], v["mismatch_one"], v["mismatch_two"]) >= T.REQUIRED


def test_eval_prompts_and_their_ground_truth(judge):
    prompts = J.eval_prompts()
    specs = [parse_caption(p) for p in prompts]
    assert prompts[:5] == ["a red circle", "a blue square on the left", "a yellow triangle at the top",
                           "a red circle left of a blue square", "a green square above a magenta circle"]
    assert len(set(prompts)) == len(prompts) == 111
    assert sum(s.num_objects == 2 for s in specs) == 74
    s = J.score(judge, J.reference_images(prompts), prompts)
    assert s.one_object >= T.REQUIRED and s.two_object >= T.REQUIRED


def _d(cx, cy, shape="circle", color="red", size="small"):
    return J.Detection(shape, color, size, cx, cy, 0.9)


def test_fully_correct_rule():
    one = parse_caption("a red circle on the left")
    assert J.check(one, [_d(17, 30)])
    assert not J.check(one, [_d(32, 32)])  # wrong position
    assert not J.check(one, [_d(17, 30, color="blue")])
    assert not J.check(one, [_d(17, 30), _d(48, 32, "square")])  # an extra object
    assert not J.check(one, [])
    assert J.check(parse_caption("a red circle"), [_d(50, 10)])  # no position stated: anywhere
    assert J.check(parse_caption("a large red circle"), [_d(50, 10)])  # size is not judged ...
    assert not J.check(parse_caption("a large red circle"), [_d(50, 10)], sizes=True)  # ... unless asked
    two = parse_caption("a red circle left of a blue square")
    a, b = _d(15, 30), _d(45, 36, "square", "blue")
    assert J.check(two, [a, b]) and J.check(two, [b, a])  # detection order does not matter
    assert not J.check(two, [_d(45, 30), _d(15, 36, "square", "blue")])  # right of
    assert not J.check(two, [_d(15, 10), _d(25, 50, "square", "blue")])  # mostly vertical: below, not left of
    assert not J.check(two, [a, _d(45, 36, "circle", "blue")])


def test_error_kind_names_the_first_failing_attribute():
    one = parse_caption("a red circle on the left")
    cases = [([_d(17, 30)], None), ([], "count"), ([_d(17, 30), _d(48, 32, "square")], "count"),
             ([_d(17, 30, color="blue")], "colour"), ([_d(17, 30, "square")], "shape"),
             ([_d(17, 30, "square", "blue")], "colour and shape"), ([_d(32, 32)], "position")]
    for dets, kind in cases:
        assert J.error_kind(one, dets) == kind, (dets, kind)
        assert (kind is None) == J.check(one, dets)
    two = parse_caption("a red circle left of a blue square")
    cases = [([_d(15, 30), _d(45, 36, "square", "blue")], None),
             ([_d(45, 30), _d(15, 36, "square", "blue")], "relation"),  # both right, right of instead
             ([_d(15, 30, "square"), _d(45, 36, "circle", "blue")], "binding"),  # red square + blue circle
             ([_d(15, 30, color="blue"), _d(45, 36, "square", "red")], "binding"),
             ([_d(15, 30), _d(45, 36, "circle", "blue")], "shape"),
             ([_d(15, 30), _d(45, 36, "square", "green")], "colour"),
             ([_d(15, 30, "triangle"), _d(45, 36, "square", "green")], "colour and shape"),
             ([_d(15, 30)], "count")]
    for dets, kind in cases:
        assert J.error_kind(two, dets) == kind, (dets, kind)
        assert (kind is None) == J.check(two, dets)
    assert set(J.ERROR_KINDS) == {k for _, k in cases if k} | {"position"}


def test_score_reports_why_images_failed(judge):
    prompts = ["a red circle", "a blue square", "a red circle left of a blue square"]
    images = J.reference_images(prompts)
    wrong = J.reference_images(["a red square", "a green square", "a blue circle left of a red square"])
    s = J.score(judge, np.concatenate([images, wrong]), prompts * 2)
    assert s.errors == [None, None, None, "shape", "colour", "binding"]
    rates = s.error_rates()
    assert rates["one_object"]["shape"] == rates["one_object"]["colour"] == 0.25
    assert rates["two_object"]["binding"] == 0.5
    for key, frac in (("one_object", s.one_object), ("two_object", s.two_object)):
        assert sum(rates[key].values()) == pytest.approx(1 - frac)


def test_image_forms_agree_and_bad_inputs_are_refused(judge):
    imgs, exs = render.batch(1, 0, 6)
    want = J.detect(judge, imgs)
    assert want == J.detect(judge, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    assert want == J.detect(judge, [Image.fromarray(i) for i in imgs])
    assert want == J.detect(judge, imgs.astype(np.float32) / 255)
    assert [len(d) for d in want] == [len(e.scene.objects) for e in exs]
    big = torch.nn.functional.interpolate(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, scale_factor=2)
    assert [len(d) for d in J.detect(judge, big)] == [len(d) for d in want]  # other sizes are resized
    for bad in (imgs[..., :2], np.full((1, 64, 64, 3), np.nan, np.float32), [], ["x"], "img", imgs[:0]):
        with pytest.raises(InvalidInput):
            J.detect(judge, bad)
    with pytest.raises(InvalidInput, match="prompts"):
        J.score(judge, imgs, ["a red circle"])
    with pytest.raises(InvalidInput):
        J.score(judge, imgs[:1], ["a purple circle"])


def test_frechet_distance_separates_renders_from_other_images(judge):
    prompts = J.eval_prompts()
    a, b = J.reference_images(prompts), J.reference_images(prompts, seed=7)
    same = J.frechet(judge, a, b)
    dull = J.frechet(judge, a, (a * 0.4).astype(np.uint8))  # dimmed objects
    noise = J.frechet(judge, a, np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8))
    assert J.frechet(judge, a, a) < 1e-6 * max(1.0, same)
    assert same < dull / 3 and same < noise / 3, (same, dull, noise)


def test_damaged_judge_files_are_refused(tmp_path):
    d = tmp_path / "judge"
    shutil.copytree(J.JUDGE_DIR, d)
    J.load(d)
    w = bytearray((d / J.WEIGHTS_NAME).read_bytes())
    w[-1] ^= 1
    (d / J.WEIGHTS_NAME).write_bytes(bytes(w))
    with pytest.raises(ModelNotFound, match="sha256"):
        J.load(d)
    (d / J.CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ModelConfigError):
        J.load(d)
    (d / J.CONFIG_NAME).unlink()
    with pytest.raises(ModelNotFound):
        J.load(d)


def test_trainer_is_seeded_and_writes_a_loadable_judge(tmp_path):
    runs = []
    for name in ("a", "b"):
        T.train(steps=2, batch_size=4, val_size=2, out=tmp_path / name, progress=False)
        runs.append((tmp_path / name / J.WEIGHTS_NAME).read_bytes())
    assert runs[0] == runs[1]
    model = J.load(tmp_path / "a")
    assert isinstance(model, J.ShapesDetector) and not model.training
    cfg = json.loads((tmp_path / "a" / J.CONFIG_NAME).read_text())
    assert cfg["metadata"]["steps"] == 2 and "truth_one" in cfg["metadata"]["validation"]


def test_training_targets_mark_object_centres():
    objs = (render.PlacedObject("square", "cyan", "large", 20.5, 43.0, 10.0),)
    t = T.targets([objs, ()])
    assert t["objectness"].sum() == 1 and t["objectness"][0, 0, 5, 2] == 1
    assert t["color"][0, 5, 2] == J.COLOR_NAMES.index("cyan") and t["shape"][0, 5, 2] == J.SHAPE_NAMES.index("square")
    assert torch.allclose(t["offset"][0, :, 5, 2], torch.tensor([20.5 / 8 - 2, 43.0 / 8 - 5]))
    assert (t["color"][1] == -1).all()


@pytest.mark.parametrize("argv", [["train", "shapes-judge", "--steps", "0"],
                                  ["train", "shapes-judge", "--out", __file__]])
def test_cli_refuses_bad_options(argv, capsys):
    one_line_error(argv, capsys)
