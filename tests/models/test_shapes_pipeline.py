"""The ``shapes`` text-to-image pipeline: saving / loading its components, sampling it through fastdiff (equal to
the untouched diffusers pipeline), its defaults, bad input, the trainer's resume, and the CLI paths.

Mechanics run on a tiny randomly initialised UNet and text encoder (the shipped VAE and tokenizer), written by
the same ``save_components`` the trainer uses; the shipped weights are checked where they are what matters."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.models import load_pipeline
from fastdiff.models.shapes import pipeline as P
from tests.export.tiny_models import TINY_SHAPES_TEXT, tiny_shapes_pipeline, tiny_shapes_unet3_config
from tests.tolerances import IMG_ATOL

TINY_UNET = tiny_shapes_unet3_config()
PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_shapes_pipeline(tmp_path_factory.mktemp("shapes_tiny"), TINY_UNET)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    return load_pipeline(tiny_dir)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_components_round_trip(tiny_dir, tiny_pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert tiny_pipe.vae_scale_factor == 4 and tiny_pipe.unet.config.sample_size == 16
    assert tiny_pipe.fastdiff_defaults == P.DEFAULTS
    assert P.metadata(tiny_dir)["command"] == "test"
    # saved in float16, loaded as float32: the loaded weights are the fp16 rounding of the originals
    unet = P.build_unet(1, TINY_UNET)
    w = dict(unet.named_parameters())["conv_in.weight"]
    assert torch.equal(dict(tiny_pipe.unet.named_parameters())["conv_in.weight"], w.half().float())
    assert tiny_pipe.unet.dtype == torch.float32 and tiny_pipe.text_encoder.dtype == torch.float32


def test_fastdiff_sample_equals_the_pipeline(tiny_dir, tiny_pipe):
    ref = tiny_pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=_gen(3), output_type="np").images
    out = fastdiff.sample(model=str(tiny_dir), prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0,
                          generator=_gen(3), output_type="np", progress=False)
    assert out.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(out, ref, atol=IMG_ATOL, rtol=0)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the prompts (and noises) differ, so must the images


def test_accelerate_gives_the_untouched_pipeline_images(tiny_pipe):
    ref = tiny_pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=_gen(5), output_type="np").images
    fastdiff.accelerate(tiny_pipe)
    try:
        acc = tiny_pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=_gen(5),
                        output_type="np").images
    finally:
        fastdiff.restore(tiny_pipe)
    np.testing.assert_allclose(acc, ref, atol=IMG_ATOL, rtol=0)


def test_sampler_takes_the_models_defaults(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "fastdiff_defaults", {"num_inference_steps": 3, "guidance_scale": 2.0})
    ref = tiny_pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=2.0, generator=_gen(), output_type="np")
    out = fastdiff.Sampler(tiny_pipe).sample(prompt=PROMPTS[:1], generator=_gen(), output_type="np", progress=False)
    np.testing.assert_allclose(out, ref.images, atol=IMG_ATOL, rtol=0)
    # an explicit argument wins over the model's default
    out4 = fastdiff.Sampler(tiny_pipe).sample(prompt=PROMPTS[:1], num_inference_steps=4, generator=_gen(),
                                              output_type="np", progress=False)
    assert np.abs(out4 - out).max() > 1e-4


@pytest.mark.parametrize("prompt", ["", "a purple elephant 42 !!", "a red circle " * 30])
def test_odd_prompts_follow_diffusers(tiny_pipe, prompt):
    """Empty -> the empty prompt; unknown words -> <|unk|>; over-long -> truncated to 24 tokens (as diffusers)."""
    ref = tiny_pipe([prompt], num_inference_steps=2, guidance_scale=4.0, generator=_gen(), output_type="np").images
    out = fastdiff.sample(tiny_pipe, prompt=[prompt], num_inference_steps=2, guidance_scale=4.0, generator=_gen(),
                          output_type="np", progress=False)
    np.testing.assert_allclose(out, ref, atol=IMG_ATOL, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": PROMPTS, "negative_prompt": ["a green square"]}, "negative_prompt"),
    ({"prompt": []}, "empty list"),
    ({"prompt": None}, "prompt"),
])
def test_bad_prompts_are_invalid_input(tiny_pipe, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        fastdiff.sample(tiny_pipe, num_inference_steps=2, progress=False, **kwargs)


def test_loading_errors(tmp_path, tiny_dir):
    with pytest.raises(ModelNotFound, match="unknown pipeline"):
        load_pipeline("no-such-pipeline")
    with pytest.raises(ModelNotFound, match="unknown pipeline"):  # longer than a file name may be: no OSError
        load_pipeline("x" * 5000)
    with pytest.raises(ModelNotFound, match="unknown model"):
        fastdiff.models.load("x" * 5000)
    with pytest.raises(ModelNotFound, match="unknown model"):
        fastdiff.Sampler("x" * 5000)
    with pytest.raises(ModelNotFound, match=r"fastdiff.models.load\('digits'\)"):
        load_pipeline("digits")
    with pytest.raises(ModelNotFound, match="load_pipeline"):
        fastdiff.models.load("shapes")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((tiny_dir / "unet" / "config.json").read_text())
    with pytest.raises(ModelNotFound, match="lacks unet/diffusion_pytorch_model.safetensors"):
        load_pipeline(tmp_path)


def test_missing_transformers_is_a_clear_error(tiny_dir, monkeypatch):
    from fastdiff.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingDependency, match="pip install 'transformers"):
        load_pipeline(tiny_dir)


def test_damaged_or_replaced_weights_are_refused(tmp_path, tiny_dir):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_dir, d)
    load_pipeline(d)  # intact: loads
    w = d / "text_encoder" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ModelNotFound, match="text_encoder/model.safetensors does not match"):
        load_pipeline(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ModelNotFound, match="manifest"):
        load_pipeline(d)


def test_a_pipeline_trained_on_another_vae_is_refused(tmp_path, tiny_dir, monkeypatch):
    other = tmp_path / "other_vae.safetensors"
    other.write_bytes(b"another VAE")
    monkeypatch.setattr(P, "_vae_weights", lambda path: other)
    with pytest.raises(ModelNotFound, match="not the one this pipeline was trained on"):
        load_pipeline(tiny_dir)


def test_a_pipeline_with_its_own_vae_decodes_with_it(tmp_path, tiny_dir):
    import shutil

    from fastdiff.models.shapes.train_vae import VAE_DIR

    d = tmp_path / "own"
    shutil.copytree(tiny_dir, d)
    shutil.copytree(VAE_DIR, d / "vae")
    with pytest.raises(ModelNotFound, match="not the one"):  # the same bytes would pass: recorded is what counts
        (d / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
        load_pipeline(d)
    shutil.rmtree(d / "vae")
    shutil.copytree(VAE_DIR, d / "vae")
    assert P.vae_dir(d) == d / "vae" and P.vae_dir(tiny_dir) == VAE_DIR
    load_pipeline(d)  # the copy's bytes are the shipped VAE's, which the manifest records
    (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="missing"):
        load_pipeline(d)


def test_shipped_pipeline_loads_within_the_size_budget():
    from fastdiff.models.registry import WEIGHTS_DIR

    pipe = load_pipeline("shapes")
    assert list(pipe.unet.config.block_out_channels) == P.UNET_CONFIG["block_out_channels"]
    files = [f for d in ("shapes", "shapes-vae", "shapes-tokenizer") for f in (WEIGHTS_DIR / d).rglob("*")
             if f.is_file() and f.name != "checkpoint.pt"]
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20  # the 15 MB for the whole model
    meta = P.metadata()
    assert meta["defaults"] == pipe.fastdiff_defaults and meta["steps"] > 0 and meta["wall_s"] > 0


def test_training_resumes_bit_for_bit(tmp_path):
    from fastdiff.models.shapes import train_unet

    common = dict(batch_size=3, seed=4, progress=False, log_every=0, unet_config=TINY_UNET,
                  text_config=TINY_SHAPES_TEXT)
    u_full, t_full, meta = train_unet.train(steps=4, out=tmp_path / "full", save_every=0, **common)
    train_unet.train(steps=2, out=tmp_path / "part", save_every=1, **common)
    u_res, t_res, meta_res = train_unet.train(steps=4, out=tmp_path / "part", resume=True, **common)
    for a, b in ((u_full, u_res), (t_full, t_res)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    assert meta_res["resumed_from"] == [2]
    fresh = P.build_unet(4, TINY_UNET)
    assert not torch.equal(fresh.conv_in.weight, u_full.conv_in.weight)  # it did train
    with pytest.raises(InvalidInput, match="no checkpoint"):
        train_unet.train(steps=2, out=tmp_path / "empty", resume=True, **common)
    with pytest.raises(InvalidInput, match="more --steps"):
        train_unet.train(steps=4, out=tmp_path / "part", resume=True, **common)


def test_training_on_another_vae_ships_it_with_the_pipeline(tmp_path):
    import shutil

    from fastdiff.models.shapes import train_unet, train_vae

    vae = tmp_path / "vae_run"
    shutil.copytree(train_vae.VAE_DIR, vae)
    common = dict(batch_size=2, seed=4, progress=False, log_every=0, unet_config=TINY_UNET,
                  text_config=TINY_SHAPES_TEXT)
    with pytest.raises(InvalidInput, match="not a VAE folder"):
        train_unet.train(steps=1, out=tmp_path / "bad", vae=tmp_path, **common)
    train_unet.train(steps=1, out=tmp_path / "run", save_every=0, vae=vae, **common)
    out = tmp_path / "run"
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (vae / "diffusion_pytorch_model.safetensors").read_bytes()
    assert P.vae_dir(out) == out / "vae" and load_pipeline(out).vae.config.scaling_factor > 0
    with pytest.raises(InvalidInput, match="holds its own VAE"):  # no --vae: it would learn the shipped one
        train_unet.train(steps=2, out=out, resume=True, **common)
    train_vae.save_vae(train_vae.build_vae(seed=1), tmp_path / "other", {})  # a different (random) VAE
    with pytest.raises(InvalidInput, match="another VAE"):
        train_unet.train(steps=2, out=out, resume=True, vae=tmp_path / "other", **common)
    train_unet.train(steps=2, out=out, resume=True, vae=out / "vae", **common)  # its own copy resumes


def test_training_data_is_what_the_pipeline_sees():
    from fastdiff.models.shapes.tokenizer import load_tokenizer
    from fastdiff.models.shapes.train_unet import tokenize

    tok = load_tokenizer()
    pipe_ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    assert torch.equal(tokenize(tok, ["a red circle"]), pipe_ids) and pipe_ids.shape == (1, 24)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_sample_cli_writes_a_prompt_grid(tmp_path, tiny_dir):
    from PIL import Image

    r = _cli("sample", "--model", str(tiny_dir), "--prompt", "a red circle", "--prompt", "a blue square on the left",
             "--num-per-prompt", "2", "--steps", "2", "--out", "grid.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "grid.png")
    assert im.mode == "RGB" and im.width > 2 * 128 and im.height > 2 * 128
    r = _cli("sample", "--model", "digits", "--prompt", "a red circle", cwd=tmp_path)  # digits takes no prompt
    assert r.returncode == 2 and "text-to-image" in r.stderr
    r = _cli("sample", "--model", str(tiny_dir), "--labels", "3", cwd=tmp_path)
    assert r.returncode == 2 and "--prompt" in r.stderr


def test_sample_defaults_to_the_shapes_model(tmp_path, capsys, monkeypatch):
    """`python -m fastdiff sample` (the README's main job) draws the shipped shapes pipeline into shapes.png; a
    digits-only option (--labels / --num-per-label) picks the digits model instead."""
    from PIL import Image

    from fastdiff.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--steps", "2", "--no-progress"]) == 0
    assert "shapes: " in capsys.readouterr().out
    im = Image.open(tmp_path / "shapes.png")
    assert im.mode == "RGB" and im.width >= 5 * 128  # five example prompts, one column each
    assert main(["sample", "--labels", "3", "--steps", "1", "--no-progress"]) == 0
    assert "digits: " in capsys.readouterr().out and (tmp_path / "digits.png").exists()
    assert main(["sample", "--compile", "--no-progress"]) == 2
    assert "--model digits" in capsys.readouterr().err


def test_eval_scores_images_against_their_prompts(tiny_pipe):
    from fastdiff.quality import shapes_eval as E

    r = E.evaluate(tiny_pipe, num_inference_steps=1, guidance_scale=1.0, seeds=(0,), prompts=PROMPTS,
                   progress=False)
    assert r.images == 2 and r.steps == 1 and 0 <= r.one_object <= 1 and np.isfinite(r.frechet)
    assert "| pipeline | 1 | 1 |" in E.format_table([r])
    for key, frac in (("one_object", r.one_object), ("two_object", r.two_object)):  # PROMPTS has one of each
        assert sum(r.errors[key].values()) == pytest.approx(1 - frac)
    table = E.format_errors([r])
    assert table.count("\n") == 3 and "| pipeline | 1 | one object |" in table and "binding" in table
    assert E.format_errors([E.ShapesEvalResult("x", 1, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1, "auto", "cpu")]) == ""


def test_eval_cli_prints_and_records_why_images_failed(tiny_dir, tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--steps", "1", "--guidance", "1", "--num-seeds", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "why images failed" in printed and "| two object |" in printed
    (r,) = json.loads(out.read_text())
    assert set(r["errors"]) == {"one_object", "two_object"}
    assert sum(r["errors"]["two_object"].values()) == pytest.approx(1 - r["two_object"])


def test_eval_cli_refuses_digits_flags(tmp_path):
    r = _cli("eval", "--model", "shapes", "--scheduler", "ddim", cwd=tmp_path)  # --compare is shapes' too now
    assert r.returncode == 2 and "--scheduler is for the digits models" in r.stderr


def test_scheduler_config_is_the_training_schedule(tiny_dir):
    cfg = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    sched = P.make_scheduler(cfg)
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_schedule == "squaredcos_cap_v2"
    assert fastdiff.from_diffusers(sched).name == "dpmpp_2m"
