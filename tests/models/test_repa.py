"""Representation alignment (fastdiff.models.repa) and its frozen encoder (fastdiff.models.repa_encoder)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import InvalidInput, ModelConfigError, ModelNotFound
from fastdiff.models import digits, lr_schedule, repa, repa_encoder, train_digits
from tests.cli_helpers import one_line_error

pytest.importorskip("sklearn")

# a few steps of a small batch: enough for every update rule to act, seconds on a CPU
STEPS, BATCH = 3, 8
# the projector alone, on one fixed batch of the tiny UNet: its alignment loss must at least halve in 40 steps
# (measured: 1.09 -> 0.007 at seed 0, a random encoder), far from what noise could do
FIT_STEPS, FIT_DROP = 40, 0.5


def _reference_train(steps: int, batch_size: int, seed: int = 0, lr: float = 1e-3, label_dropout: float = 0.1,
                     ema_decay: float = 0.999):
    """The teacher's training loop as it was before alignment existed (plain PyTorch), for the lambda = 0 check."""
    torch.manual_seed(seed)
    x_all, y_all = digits.load_digits_tensors()
    n = x_all.shape[0]
    model = digits.build_model(seed)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    abar = train_digits.alphas_cumprod(**digits.TRAIN_SCHEDULE)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=g) < label_dropout] = model.null_label
        t = torch.randint(0, abar.shape[0], (len(y),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for grp in opt.param_groups:
            grp["lr"] = lr_schedule.lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        loss = F.mse_loss(model(xt, t, y), a.sqrt() * eps - (1 - a).sqrt() * x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_digits.ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
    return ema


def _train(tmp_path, name, **kw):
    return train_digits.train(steps=STEPS, batch_size=BATCH, out=tmp_path / name, progress=False, log_every=0, **kw)


def test_lambda_zero_is_the_plain_training_bit_for_bit(tmp_path):
    ref = _reference_train(STEPS, BATCH).state_dict()
    got = _train(tmp_path, "plain", repa_weight=0.0).state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "lambda = 0 must not change a single weight"


def test_alignment_changes_the_weights_and_the_teacher_still_loads(tmp_path):
    from fastdiff.models import load

    plain = _train(tmp_path, "plain").state_dict()
    aligned_model = _train(tmp_path, "repa", repa_weight=0.5)
    aligned = aligned_model.state_dict()
    assert plain.keys() == aligned.keys()  # no projector inside the teacher
    assert not all(torch.equal(plain[k], aligned[k]) for k in plain)
    assert not aligned_model.unet.mid_block._forward_hooks  # the hook is gone after training
    loaded = load(tmp_path / "repa")  # the registry reads it unchanged
    assert loaded.state_dict().keys() == plain.keys()


def _tiny_alignment(layer=repa.DEFAULT_LAYER):
    model = digits.build_model(0, unet_config=digits.TINY_UNET_CONFIG)
    torch.manual_seed(0)
    return model, repa.Alignment(model, repa_encoder.RepaEncoder(), layer=layer, seed=0)


@pytest.mark.parametrize("layer", repa.LAYERS)
def test_alignment_loss_matches_a_plain_computation(layer):
    model, align = _tiny_alignment(layer)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    t, y = torch.tensor([0, 250, 500, 999]), torch.tensor([0, 3, 7, 10])
    seen = []
    handle = model.unet.get_submodule(layer).register_forward_hook(
        lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    model(x0, t, y)
    handle.remove()
    got = align.loss(x0)
    h = F.avg_pool2d(seen[0], 2)  # 8x8 -> the encoder's 4x4 grid
    target = align.encoder(x0)
    want = 0.0
    for i in range(4):
        for j in range(4):
            p = align.projector(h[:, :, i, j])
            want = want + (1 - F.cosine_similarity(p, target[:, :, i, j], dim=1)).mean() / 16
    torch.testing.assert_close(got, want)


def test_the_projector_learns_to_align():
    model, align = _tiny_alignment()
    x0 = digits.load_digits_tensors()[0][:16]
    t, y = torch.full((16,), 300), torch.arange(16) % 10
    opt = torch.optim.Adam(align.projector.parameters(), lr=3e-3)
    losses = []
    for _ in range(FIT_STEPS):
        model(x0, t, y)
        loss = align.loss(x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < FIT_DROP * losses[0], losses[::10]
    assert model.unet.mid_block.resnets[0].conv1.weight.grad is not None  # the UNet gets the alignment gradient


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "0.5", True])
def test_bad_lambda_is_refused_before_training(bad, tmp_path):
    with pytest.raises(InvalidInput, match="repa_weight"):
        _train(tmp_path, "x", repa_weight=bad)
    assert not (tmp_path / "x").exists()


def test_missing_encoder_and_bad_layer_are_typed_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="REPA encoder"):
        _train(tmp_path, "x", repa_weight=0.5, repa_encoder_dir=tmp_path / "nowhere")
    with pytest.raises(InvalidInput, match="repa layer"):
        _train(tmp_path, "x", repa_weight=0.5, repa_layer="up_blocks.0")
    assert not (tmp_path / "x").exists()


def test_the_shipped_encoder_loads_and_a_tampered_one_is_refused(tmp_path):
    enc = repa_encoder.load()
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc(torch.zeros(2, 1, 16, 16)).shape == (2, repa_encoder.DIM, 4, 4)
    d = tmp_path / "enc"
    shutil.copytree(repa_encoder.ENCODER_DIR, d)
    data = bytearray((d / repa_encoder.WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0x01
    (d / repa_encoder.WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ModelNotFound, match="sha256"):
        repa_encoder.load(d)
    (d / repa_encoder.CONFIG_NAME).write_text('{"format": "something else"}')
    with pytest.raises(ModelConfigError, match="not a REPA encoder"):
        repa_encoder.load(d)


def test_encoder_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = repa_encoder.RepaEncoder()
    repa_encoder.save(enc, tmp_path)
    back = repa_encoder.load(tmp_path)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    # stored in float16: the weights round once (relative 2^-11), the tokens stay within a few 1e-3
    torch.testing.assert_close(back(x), enc.eval()(x), rtol=0, atol=5e-3)


@pytest.mark.parametrize("argv", [["--repa-weight", "-1"], ["--repa-weight", "nan"], ["--repa-layer", "up"],
                                  ["--eval-every", "-2"]], ids=" ".join)
def test_cli_refuses_bad_repa_options_in_one_line(argv, capsys):
    err = one_line_error(["train", "digits", *argv], capsys)
    assert argv[0] in err


def test_cli_missing_encoder_is_one_line(tmp_path, capsys):
    err = one_line_error(["train", "digits", "--steps", "1", "--repa-weight", "0.5", "--repa-encoder",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "t"), "--no-progress"], capsys)
    assert "REPA encoder" in err
