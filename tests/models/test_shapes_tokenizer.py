"""The shapes tokenizer: a real CLIPTokenizer built from the grammar's words, shipped as built, and its documented
behaviour on empty, unknown-word and over-long prompts."""

from __future__ import annotations

import shutil

import pytest

from fastdiff.errors import ModelNotFound
from fastdiff.models.shapes import render, tokenizer
from fastdiff.models.shapes.captions import caption_words

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer()


def test_shipped_files_are_what_the_build_writes(tmp_path):
    built = tokenizer.build_files(tmp_path / "tok")
    for name in tokenizer.file_texts():
        assert (built / name).read_bytes() == (tokenizer.TOKENIZER_DIR / name).read_bytes(), name


def test_every_grammar_word_is_one_token(tok):
    assert isinstance(tok, transformers.CLIPTokenizer)
    assert tok.model_max_length == tokenizer.MAX_LENGTH
    ids = set()
    for w in caption_words():
        (i,) = tok(w, add_special_tokens=False).input_ids
        assert i != tok.unk_token_id
        ids.add(i)
    assert len(ids) == len(caption_words())
    # CLIP's layout: the special tokens last, the end token largest; the unknown token is not the end token
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    assert tok.unk_token_id not in (tok.eos_token_id, tok.bos_token_id)


def test_learn_merges_joins_each_word():
    words = ["red", "green", "reed", "a"]
    merges = tokenizer.learn_merges(words)
    vocab, _ = tokenizer.build_vocab(words)
    for a, b in merges:
        assert a in vocab and b in vocab and a + b in vocab
    assert {"red</w>", "green</w>", "reed</w>", "a</w>"} <= set(vocab)


def test_grammar_captions_tokenize_as_the_plain_clip_tokenizer_does(tok):
    plain = transformers.CLIPTokenizer.from_pretrained(str(tokenizer.TOKENIZER_DIR), local_files_only=True)
    for i in range(300):
        text = render.example(11, i).caption
        ids = tok(text).input_ids
        assert ids == plain(text).input_ids
        assert tok.unk_token_id not in ids and len(ids) == len(text.split()) + 2


def test_empty_prompt_is_start_end_then_padding(tok):
    ids = tok("", padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    assert ids == [tok.bos_token_id] + [tok.eos_token_id] * (tokenizer.MAX_LENGTH - 1)


@pytest.mark.parametrize("text, unknown", [("a purple circle", 1), ("a red bed circle", 1), ("reds", 1),
                                           ("a red circle, 2 cafés!", 2), ("zzz qqq a circle", 2)])
def test_unknown_words_become_one_unknown_token_each(tok, text, unknown):
    ids = tok(text).input_ids
    assert ids.count(tok.unk_token_id) == unknown
    known = [w for w in text.replace(",", " ").replace("!", " ").split() if w in caption_words()]
    assert [i for i in ids[1:-1] if i != tok.unk_token_id] == tok(" ".join(known), add_special_tokens=False).input_ids


def test_over_long_prompt_is_truncated_to_max_length(tok):
    text = " ".join(["a red circle left of a blue square"] * 5)
    ids = tok(text, padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    assert len(ids) == tokenizer.MAX_LENGTH and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[1:-1] == tok(text, add_special_tokens=False).input_ids[:tokenizer.MAX_LENGTH - 2]


def test_stale_or_missing_files_are_refused(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tokenizer.TOKENIZER_DIR, d)
    (d / "merges.txt").write_text("#version: 0.2\nr e\n")
    with pytest.raises(ModelNotFound, match="merges.txt"):
        tokenizer.load_tokenizer(d)
    (d / "vocab.json").unlink()
    with pytest.raises(ModelNotFound, match="vocab.json"):
        tokenizer.load_tokenizer(d)
