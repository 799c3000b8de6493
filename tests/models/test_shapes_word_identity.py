"""The word-identity loss of the shapes teacher (train shapes --word-loss-weight) and the text-contrast diagnostic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import InvalidInput
from fastdiff.models.shapes import pipeline as P
from fastdiff.models.shapes import train_unet, word_identity
from tests.export.tiny_models import TINY_SHAPES_TEXT, tiny_shapes_unet3_config

COMMON = dict(batch_size=3, seed=4, progress=False, log_every=0, unet_config=tiny_shapes_unet3_config(),
              text_config=TINY_SHAPES_TEXT)


def test_the_loss_names_the_words_and_ignores_padding():
    tok, ids_cfg = P._tokenizer_ids()
    pad = ids_cfg["pad_token_id"]
    head = word_identity.WordIdentityHead(16, len(tok), pad, seed=1)
    ids = train_unet.tokenize(tok, ["a red circle left of a blue square", "a green triangle", ""])
    h = torch.randn(3, ids.shape[1], 16, requires_grad=True)
    keep = ids != pad
    expected = F.cross_entropy(head.proj(h[keep]), ids[keep])
    loss = head.loss(h, ids)
    assert torch.allclose(loss, expected)
    assert int(keep.sum()) == (1 + 8) + (1 + 3) + 1  # <|startoftext|> and the words; the empty prompt: its start
    h2 = h.detach().clone()
    h2[~keep] = 1e3 * torch.randn(int((~keep).sum()), 16)  # padding positions changed wildly: same loss
    assert torch.allclose(head.loss(h2, ids), expected)
    loss.backward()
    assert h.grad[~keep].abs().max() == 0 and h.grad[keep].abs().max() > 0
    only_pad = torch.full_like(ids, pad)
    zero = head.loss(h, only_pad)
    assert zero.item() == 0.0 and zero.requires_grad  # a batch with nothing to name adds nothing, still backprops


def test_text_contrast_sees_two_shape_words_merged():
    tok, _ = P._tokenizer_ids()
    te = P.build_text_encoder(0, TINY_SHAPES_TEXT)
    ids = train_unet.tokenize(tok, list(word_identity.CONTRAST_PROMPTS.values()))
    before = word_identity.text_contrast(te, ids)
    assert set(before) == {"circle-square", "circle-triangle", "square-triangle"}
    assert all(v > 0 for v in before.values())
    emb = te.get_input_embeddings().weight
    circle, square = (tok.convert_tokens_to_ids(w + "</w>") for w in ("circle", "square"))
    with torch.no_grad():
        emb[square] = emb[circle]  # the encoder can no longer tell the two words apart
    after = word_identity.text_contrast(te, ids)
    assert after["circle-square"] == 0.0
    assert after["circle-triangle"] == pytest.approx(before["circle-triangle"])
    assert te.training  # left in the mode it was found in


def test_the_default_is_on_weight_zero_is_off_and_the_loss_changes_the_text_encoder(tmp_path):
    default_u, default_t, meta = train_unet.train(steps=3, out=tmp_path / "default", save_every=0, **COMMON)
    tenth_u, tenth_t, _ = train_unet.train(steps=3, out=tmp_path / "tenth", save_every=0, word_loss_weight=0.1,
                                           **COMMON)
    _, zero_t, meta0 = train_unet.train(steps=3, out=tmp_path / "zero", save_every=1, word_loss_weight=0.0, **COMMON)
    for a, b in ((default_u, tenth_u), (default_t, tenth_t)):  # the default is 0.1
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, zero_t.state_dict()[k]) for k, v in default_t.state_dict().items())
    assert meta["word_loss_weight"] == 0.1 and meta0["word_loss_weight"] == 0.0
    assert meta["final_word_loss_ema"] > 0 and "final_word_loss_ema" not in meta0
    state = torch.load(tmp_path / "zero" / train_unet.CHECKPOINT, weights_only=False)
    assert "word_head" not in state and len(state["opt"]["param_groups"]) == 1  # 0: no head at all
    assert set(meta0["text_contrast"]) == {"circle-square", "circle-triangle", "square-triangle"}
    # the head is not part of what ships: the text encoder is the plain CLIPTextModel
    assert set(default_t.state_dict()) == set(P.build_text_encoder(0, TINY_SHAPES_TEXT).state_dict())


def test_a_word_loss_run_resumes_bit_for_bit_and_refuses_another_weight(tmp_path):
    full_u, full_t, _ = train_unet.train(steps=4, out=tmp_path / "full", save_every=0, word_loss_weight=0.5, **COMMON)
    train_unet.train(steps=2, out=tmp_path / "part", save_every=1, word_loss_weight=0.5, **COMMON)
    with pytest.raises(InvalidInput, match="word-loss-weight 0.5"):
        train_unet.train(steps=4, out=tmp_path / "part", resume=True, **COMMON)
    part_u, part_t, _ = train_unet.train(steps=4, out=tmp_path / "part", resume=True, word_loss_weight=0.5, **COMMON)
    for a, b in ((full_u, part_u), (full_t, part_t)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_weights_are_refused_before_training(tmp_path, weight):
    with pytest.raises(InvalidInput, match="word_loss_weight"):
        train_unet.train(steps=2, out=tmp_path / "x", word_loss_weight=weight, **COMMON)
    assert not (tmp_path / "x" / "unet").exists()


def test_the_cli_flag_reaches_the_trainer(monkeypatch):
    import argparse

    seen = {}
    monkeypatch.setattr(train_unet, "train", lambda **kw: seen.update(kw))
    p = argparse.ArgumentParser()
    train_unet.add_arguments(p)
    train_unet.run(p.parse_args(["--word-loss-weight", "0.25", "--steps", "5"]))
    assert seen["word_loss_weight"] == 0.25 and seen["steps"] == 5
    assert p.parse_args([]).word_loss_weight == 0.1  # on unless turned off
    with pytest.raises(SystemExit):
        p.parse_args(["--word-loss-weight", "-1"])
