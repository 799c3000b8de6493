"""Representation alignment for the shapes teacher (train shapes --repa-weight) and its training curve."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.errors import InvalidInput
from fastdiff.models import repa
from fastdiff.models.shapes import pipeline as P
from fastdiff.models.shapes import train_unet
from tests.export.tiny_models import TINY_SHAPES_TEXT, tiny_shapes_unet3_config

TINY_UNET = tiny_shapes_unet3_config()
COMMON = dict(batch_size=3, seed=4, progress=False, log_every=0, unet_config=TINY_UNET, text_config=TINY_SHAPES_TEXT)


def test_vae_features_are_the_encoders_mid_block():
    data = train_unet.LatentData(0)
    enc = repa.VaeFeatures(data.vae)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc(x)
    assert feats.shape == (2, enc.dim, 16, 16)
    assert not any(p.requires_grad for p in enc.parameters())
    # the same as running the VAE's own encoder up to its mid block (diffusers' Encoder.forward, then stopped)
    e = data.vae.encoder
    h = e.conv_in(x)
    for block in e.down_blocks:
        h = block(h)
    assert torch.equal(feats, e.mid_block(h))


def test_latent_batch_catches_the_repa_target_during_its_own_encode():
    from fastdiff.models.shapes import render

    data = train_unet.LatentData(0)
    latents, captions = data.batch(5, 3)
    latents2, captions2, feats = data.batch(5, 3, with_features=True)
    assert torch.equal(latents, latents2) and captions == captions2  # the hook changes nothing it watches
    imgs, _ = render.batch(0, 5, 3)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert torch.equal(feats, repa.VaeFeatures(data.vae)(x))  # what a second encoder pass would have computed
    assert not data.vae.encoder.mid_block._forward_hooks  # the hook is gone after the batch


def test_alignment_loss_takes_a_precomputed_target():
    unet = P.build_unet(0, TINY_UNET)
    enc = repa.VaeFeatures(train_unet.LatentData(0).vae)
    align = repa.Alignment(type("M", (), {"unet": unet})(), enc, layer="mid_block", seed=0)
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    args = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 24, TINY_SHAPES_TEXT["hidden_size"]))
    unet(*args)
    from_images = align.loss(x0)
    unet(*args)
    assert torch.equal(align.loss(target=enc(x0)), from_images)
    unet(*args)
    with pytest.raises(TypeError, match="exactly one"):
        align.loss(x0, target=enc(x0))
    with pytest.raises(TypeError, match="exactly one"):
        align.loss()


def test_alignment_pools_the_finer_map_to_the_coarser_grid():
    unet = P.build_unet(0, TINY_UNET)
    enc = repa.VaeFeatures(train_unet.LatentData(0).vae)
    model = type("M", (), {"unet": unet})()
    align = repa.Alignment(model, enc, layer="mid_block", seed=0)  # mid block 4x4, encoder 16x16
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 24, TINY_SHAPES_TEXT["hidden_size"]))
    loss = align.loss(x0)
    assert 0.0 <= loss.item() <= 2.0
    loss.backward()
    assert all(p.grad is not None for p in align.projector.parameters())
    assert unet.mid_block.resnets[0].conv1.weight.grad is not None  # the alignment reaches the UNet


def test_repa_weight_zero_is_the_plain_loop_and_repa_changes_it(tmp_path):
    plain, _, _ = train_unet.train(steps=3, out=tmp_path / "plain", save_every=0, **COMMON)
    zero, _, _ = train_unet.train(steps=3, out=tmp_path / "zero", save_every=0, repa_weight=0.0, **COMMON)
    aligned, _, meta = train_unet.train(steps=3, out=tmp_path / "repa", save_every=0, repa_weight=0.5, **COMMON)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, zero.state_dict()[k]), k
    assert any(not torch.equal(v, aligned.state_dict()[k]) for k, v in plain.state_dict().items())
    assert meta["repa_weight"] == 0.5 and meta["repa_layer"] == "mid_block"
    assert "projector" not in json.dumps(sorted(aligned.state_dict()))  # the teacher is the plain UNet


def test_repa_run_resumes_bit_for_bit_and_refuses_another_weight(tmp_path):
    full, _, _ = train_unet.train(steps=4, out=tmp_path / "full", save_every=0, repa_weight=0.5, **COMMON)
    train_unet.train(steps=2, out=tmp_path / "part", save_every=1, repa_weight=0.5, **COMMON)
    with pytest.raises(InvalidInput, match="repa-weight 0.5"):
        train_unet.train(steps=4, out=tmp_path / "part", resume=True, **COMMON)
    with pytest.raises(InvalidInput, match="repa-layer mid_block"):
        train_unet.train(steps=4, out=tmp_path / "part", resume=True, repa_weight=0.5, repa_layer="down_blocks.1",
                         **COMMON)
    resumed, _, _ = train_unet.train(steps=4, out=tmp_path / "part", resume=True, repa_weight=0.5, **COMMON)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize("kwargs, match", [
    (dict(repa_weight=-1.0), "repa_weight"), (dict(repa_weight=float("nan")), "repa_weight"),
    (dict(repa_weight=0.5, repa_layer="up_blocks.0"), "repa layer"), (dict(eval_every=-1), "eval_every"),
])
def test_bad_settings_are_refused_before_training(tmp_path, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        train_unet.train(steps=2, out=tmp_path / "x", **kwargs, **COMMON)
    assert not (tmp_path / "x" / "unet").exists()


def test_curve_points_are_judged_and_written(tmp_path, monkeypatch):
    from fastdiff.quality import shapes_eval

    seen = []

    def fake_evaluate(model, num_inference_steps=None, seeds=None, progress=True, **kw):
        pipe = P.load_pipeline(model)  # the EMA networks as a loadable pipeline folder
        seen.append((num_inference_steps, tuple(seeds), pipe.unet.dtype))
        return shapes_eval.ShapesEvalResult("x", num_inference_steps, 5.0, 0.5, 0.25, 1.0, 42.0, 1.0, 4, "auto", "cpu")

    monkeypatch.setattr(shapes_eval, "evaluate", fake_evaluate)
    curve = tmp_path / "curve.json"
    train_unet.train(steps=3, out=tmp_path / "run", save_every=0, eval_every=2, curve=curve, eval_steps=3, **COMMON)
    data = json.loads(curve.read_text())
    assert [p["step"] for p in data["points"]] == [2, 3]  # every 2 steps and at the end
    assert data["points"][0] == {**data["points"][0], "one_object": 0.5, "two_object": 0.25, "accuracy": 0.25,
                                 "fd": 42.0}
    assert data["accuracy_is"] == "two_object"
    assert seen == [(3, (0, 1), torch.float32)] * 2
