"""The ``shapes`` tokenizer: a real ``transformers.CLIPTokenizer`` over a vocabulary made here from the caption
grammar's words (:func:`fastdiff.models.shapes.captions.caption_words`), shipped in ``weights/shapes-tokenizer``.

:func:`build_files` learns byte-pair merges on the grammar's words (classic BPE: merge the most frequent adjacent
pair, ties by the pair's text, until every word is one symbol) and writes CLIP's file format: ``vocab.json``
(the letters, the merge products, then CLIP's special tokens last as in CLIP, plus ``<|unk|>``), ``merges.txt``
and ``tokenizer_config.json``. Every grammar word is one token; the whole vocabulary is ~150 tokens.

Behaviour on bad prompts (tested in tests/models/test_shapes_tokenizer.py):

* **empty prompt** -> ``<|startoftext|> <|endoftext|>`` then padding (``<|endoftext|>``, as Stable Diffusion 1.x
  pads): the unconditional prompt the pipeline's classifier-free guidance uses.
* **unknown words** -> one ``<|unk|>`` token per unknown word (a word of letters or digits outside the grammar),
  through a normalizer :func:`load_tokenizer` adds; punctuation is dropped. ``<|unk|>`` is a token of its own, not
  CLIP's default ``<|endoftext|>``: ``CLIPTextModel`` pools the hidden state at the first ``<|endoftext|>``, so an
  unknown word mapped there would end the prompt early. A plain ``CLIPTokenizer.from_pretrained`` of the folder
  (which rebuilds CLIP's own normalizer and so loses ours) reads unknown words as pieces of known words and
  ``<|unk|>`` for letters outside the vocabulary: different ids, never an error.
* **over-long prompt** -> truncated to :data:`MAX_LENGTH` tokens (``<|endoftext|>`` kept last) when called with
  ``truncation=True`` as diffusers' pipelines do (diffusers logs the removed part); without it, the ids run long
  and transformers warns.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from fastdiff._atomic import atomic_write_text
from fastdiff.errors import ModelNotFound
from fastdiff.models.registry import WEIGHTS_DIR
from fastdiff.models.shapes.captions import caption_words

TOKENIZER_DIR = WEIGHTS_DIR / "shapes-tokenizer"
#: tokens per prompt, <|startoftext|> and <|endoftext|> included: the longest caption of the grammar ("a drawing
#: of a little magenta triangle to the left of a large yellow triangle") is 15 words = 17 tokens
MAX_LENGTH = 24
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
END = "</w>"  # CLIP's end-of-word suffix
#: what an unknown word becomes before the BPE model sees it: a character outside the vocabulary, so one <|unk|>
UNKNOWN_MARK = "?"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that turn every word of ``words`` into one symbol ``word</w>``."""
    seqs = [tuple(w[:-1]) + (w[-1] + END,) for w in sorted(set(words))]
    merges = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:], strict=False))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties by text: deterministic
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab token -> id, merges)`` of the grammar's words: the words' letters (as word-inner and word-final
    symbols), then each merge's product in rank order, then ``<|unk|>``, ``<|startoftext|>``, ``<|endoftext|>``
    (CLIP keeps its special tokens last, so the end token has the largest id, which older ``CLIPTextModel``
    configs rely on to find it)."""
    words = sorted(set(words if words is not None else caption_words()))
    merges = learn_merges(words)
    symbols = sorted({c for w in words for c in w[:-1]} | {w[-1] + END for w in words})
    tokens = symbols + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    for special in (UNK, BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def file_texts() -> dict[str, str]:
    """The tokenizer folder's files, name -> text."""
    vocab, merges = build_vocab()
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "unk_token": UNK, "clean_up_tokenization_spaces": False,
        "add_prefix_space": False, "do_lower_case": True,
    }
    return {
        "vocab.json": json.dumps(vocab, indent=1, ensure_ascii=True) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
                                               "unk_token": UNK}, indent=2) + "\n",
    }


def build_files(out: str | os.PathLike = TOKENIZER_DIR) -> Path:
    """Write the tokenizer folder (each file atomically); returns it."""
    out = Path(out)
    for name, text in file_texts().items():
        atomic_write_text(out / name, text)
    return out


def _unknown_word_normalizer(words: list[str]):
    """A normalizer step after CLIP's (NFC, whitespace, lower case): punctuation -> space, then every run of
    letters / digits that is not a grammar word -> :data:`UNKNOWN_MARK` (one ``<|unk|>``)."""
    import re

    from tokenizers import Regex, normalizers

    known = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return [normalizers.Replace(Regex(r"[^\p{L}\p{N}\s]+"), " "),
            normalizers.Replace(Regex(rf"(?<![\p{{L}}\p{{N}}])(?!(?:{known})(?![\p{{L}}\p{{N}}]))[\p{{L}}\p{{N}}]+"),
                                UNKNOWN_MARK)]


def load_tokenizer(path: str | os.PathLike = TOKENIZER_DIR):
    """The shipped tokenizer as a ``transformers.CLIPTokenizer`` (local files only), its files checked against
    :func:`file_texts` (a stale or damaged folder raises :class:`ModelNotFound` rather than giving other ids),
    with the unknown-word normalizer of the module docstring."""
    from tokenizers import normalizers
    from transformers import CLIPTokenizer

    path = Path(path)
    want = file_texts()
    for name, text in want.items():
        try:
            have = (path / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelNotFound(f"cannot read the shapes tokenizer file {path / name}: {e}; rebuild the folder with "
                                "`python -m fastdiff.models.shapes.tokenizer`") from e
        if have != text:
            raise ModelNotFound(f"the shapes tokenizer file {path / name} differs from the caption grammar's "
                                "vocabulary (stale or damaged); rebuild it with "
                                "`python -m fastdiff.models.shapes.tokenizer`")
    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([backend.normalizer, *_unknown_word_normalizer(caption_words())])
    return tok


def main() -> int:
    """``python -m fastdiff.models.shapes.tokenizer``: rewrite the shipped tokenizer folder."""
    out = build_files()
    print(f"wrote {', '.join(file_texts())} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
