"""The embedded digits models: offline loading, the sample API and CLI, determinism, and error messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.cli import main as cli
from fastdiff.cli.sample import draw, parse_labels
from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.models import EMBEDDED, LabelConditionedUNet, available_models, digits, load, save
from tests.tolerances import TRAINED_LOOP_RTOL, rel_err

ROOT = Path(__file__).resolve().parents[2]
# The student is distilled from the teacher after it trains; until its weights ship, its tests skip with this reason.
STUDENT_SHIPPED = (ROOT / "fastdiff" / "models" / "weights" / "digits-onestep" / "model.safetensors").exists()
needs_student = pytest.mark.skipif(not STUDENT_SHIPPED, reason="digits-onestep weights are not shipped in this tree")
STEPS = 4  # enough to exercise the multistep path; quality is measured by `python -m fastdiff eval`

_NO_NET = (
    "import socket\n"
    "def _blocked(*a, **k):\n"
    "    raise OSError('network access blocked by the test')\n"
    "socket.socket.connect = _blocked\n"
    "socket.create_connection = _blocked\n"
)


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def blocked(*a, **k):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", ["digits", pytest.param("digits-onestep", marks=needs_student)])
def test_embedded_models_load_offline(name, no_network):
    m = load(name)
    assert isinstance(m, LabelConditionedUNet)
    assert m.name == name and m.num_classes == 10 and m.null_label == 10
    assert m.unet.config.sample_size == 16 and m.unet.config.in_channels == 1
    assert not m.training and all(p.dtype == torch.float32 and not p.requires_grad for p in m.parameters())
    assert m.encode_labels(torch.tensor([0, 9, 10])).shape == (3, 1, m.unet.config.cross_attention_dim)
    expect = "v_prediction" if name == "digits" else "sample"
    assert m.scheduler_config["prediction_type"] == expect
    assert name in available_models()
    weights = Path(digits.__file__).parent / "weights" / name / "model.safetensors"
    assert weights.stat().st_size < 4_000_000  # ships in the package: keep it small


def test_sample_defaults_to_digits_all_labels(no_network):
    x = fastdiff.sample(num_inference_steps=2, guidance_scale=1.0, output_type="pt", progress=False,
                        generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 1, 16, 16)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_sample_output_types_and_labels():
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, class_labels=[3, 1, 4], progress=False)
    arr = fastdiff.sample(output_type="np", generator=torch.Generator().manual_seed(0), **kw)
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 16, 16, 1) and arr.dtype == np.float32
    pil = fastdiff.sample(output_type="pil", generator=torch.Generator().manual_seed(0), **kw)
    assert len(pil) == 3 and pil[0].mode == "L" and pil[0].size == (16, 16)
    np.testing.assert_allclose(np.asarray(pil[1], dtype=np.float32) / 255, arr[1, ..., 0], atol=1 / 255 + 1e-6)
    two = fastdiff.sample(output_type="pt", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **kw)
    assert two.shape == (6, 1, 16, 16)


def test_same_seed_same_images_other_seed_other_images():
    sampler = fastdiff.Sampler("digits")
    run = lambda s: sampler.sample(num_inference_steps=STEPS, guidance_scale=3.0, class_labels=[0, 7],  # noqa: E731
                                   generator=torch.Generator().manual_seed(s), progress=False)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_scheduler_name_takes_the_models_schedule_like_diffusers_from_config(name, cls):
    # The oracle: diffusers' XScheduler.from_config(model config) in a plain CFG loop over the same network.
    import diffusers

    m = load("digits")
    ref_sched = getattr(diffusers, cls).from_config(m.scheduler_config)
    ref_sched.set_timesteps(STEPS)
    labels = torch.tensor([2, 7, 9])
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    x = noise * ref_sched.init_noise_sigma
    y = torch.cat([labels, torch.full_like(labels, m.null_label)])
    with torch.no_grad():
        for t in ref_sched.timesteps:
            inp = ref_sched.scale_model_input(torch.cat([x, x]), t)
            cond, uncond = m(inp, t.expand(6), y).chunk(2)
            x = ref_sched.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    sampler = fastdiff.Sampler(m, scheduler=name)
    assert sampler.scheduler.config["prediction_type"] == "v_prediction"
    assert sampler.scheduler.config["beta_schedule"] == "squaredcos_cap_v2"
    got = sampler.sample(num_inference_steps=STEPS, guidance_scale=2.0, class_labels=labels, latents=noise,
                         output_type="latent", progress=False)
    assert rel_err(got, x) < TRAINED_LOOP_RTOL, rel_err(got, x)


@needs_student
def test_onestep_student_samples_in_one_call():
    x = fastdiff.sample("digits-onestep", num_inference_steps=1, guidance_scale=1.0, class_labels=[5, 6],
                        output_type="pt", progress=False, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16)


@needs_student
def test_cli_sample_writes_deterministic_grid(tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    base = ["sample", "--model", "digits", "--steps", str(STEPS), "--no-progress", "--cell", "24"]
    assert cli([*base, "-o", str(a)]) == 0
    assert cli([*base, "-o", str(b)]) == 0
    assert cli([*base, "-o", str(c), "--seed", "1"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    from PIL import Image

    im = Image.open(a)
    assert im.width >= 10 * 24 and im.height >= 24
    assert "wrote" in capsys.readouterr().out
    d = tmp_path / "d.png"
    assert cli(["sample", "--model", "digits-onestep", "--labels", "2,3", "--num-per-label", "2", "--no-progress",
                "-o", str(d)]) == 0


@needs_student
def test_a_digits_picture_does_not_depend_on_the_other_labels():
    m = load("digits-onestep")
    few, *_ = draw(m, [7, 2], num_per_label=2, progress=False)
    many, *_ = draw(m, list(range(10)), num_per_label=2, progress=False)
    # same noise, same label; only the batch around it differs (allow one grey level of batched-conv rounding)
    for i, j in ((0, 14), (3, 5)):  # (label 7, image 0), (label 2, image 1)
        diff = np.abs(np.asarray(few[i], dtype=int) - np.asarray(many[j], dtype=int))
        assert diff.max() <= 1


def test_cli_sample_fresh_process_offline(tmp_path):
    """`python -m fastdiff sample` in a new interpreter with sockets blocked and the Hub offline."""
    out = tmp_path / "grid.png"
    code = _NO_NET + ("import runpy, sys\n"
                      f"sys.argv = ['fastdiff', 'sample', '--steps', '{STEPS}', '--no-progress', '-o', {str(out)!r}]\n"
                      "runpy.run_module('fastdiff', run_name='__main__')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0


@pytest.mark.parametrize("bad", ["digitz", "stable-diffusion", "./no/such/dir"])
def test_unknown_model_names_and_paths(bad):
    with pytest.raises(ModelNotFound) as e:
        load(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    for name in EMBEDDED:
        assert repr(name) in msg
    with pytest.raises(ModelNotFound):
        fastdiff.Sampler(bad)


def test_bad_model_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="lacks config.json and model.safetensors"):
        load(tmp_path / "empty")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="is a file"):
        load(f)
    d = save(digits.build_model(0, digits.TINY_UNET_CONFIG), tmp_path / "broken")
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelNotFound, match="cannot read weights"):
        load(d)
    (d / "config.json").write_text("{")
    with pytest.raises(ModelNotFound, match="cannot read"):
        load(d)


def test_save_load_roundtrip(tmp_path):
    m = digits.build_model(3, digits.TINY_UNET_CONFIG, name="tiny")
    d = save(m, tmp_path / "tiny", metadata={"note": "test"})
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o644
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["name"] == "tiny" and cfg["metadata"] == {"note": "test"}
    assert cfg["defaults"]["num_inference_steps"] == 20
    back = load(d)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(v2, v.half().float())  # stored as float16


@pytest.mark.parametrize("labels", [[10], [-1], [0, 11]])
def test_bad_labels(labels):
    with pytest.raises(InvalidInput, match=r"\[0, 9\]"):
        fastdiff.sample(class_labels=labels, num_inference_steps=1, progress=False)


def test_parse_labels():
    assert parse_labels(None, 10) == list(range(10))
    assert parse_labels("3,1,4", 10) == [3, 1, 4]
    assert parse_labels("0-2,7", 10) == [0, 1, 2, 7]
    for bad in ("10", "a", "-1", "5-12"):
        with pytest.raises(InvalidInput, match="--labels"):
            parse_labels(bad, 10)


@pytest.mark.parametrize("argv, needle", [
    (["--labels", "12"], "--labels must be digits in [0, 9]"),
    (["--model", "digitz"], "'digits-onestep'"),
    (["-o", "/no/such/folder/x.png"], "does not exist"),
    (["-o", "grid.jpg"], "must be a .png"),
])
def test_cli_sample_errors(argv, needle, capsys):
    assert cli(["sample", "--no-progress", "--steps", "1", *argv]) == 2
    assert needle in capsys.readouterr().err
