"""Keeping the shapes text encoder's words apart while it learns from scratch (``train shapes --word-loss-weight``).

Why: the text encoder is trained jointly with the UNet, from random weights, by the diffusion loss alone. Early in
training the UNet cannot yet draw a circle and a square differently (they differ near the corners only, a detail
of a few latent pixels), so the loss is lowest when "circle" and "square" prompts give the *same* conditioning,
and the encoder learns to merge them. Once merged, the conditioning carries no circle / square information, and
the UNet has nothing to learn the pair from: a trap. Measured (:func:`text_contrast`, the distance between the
encodings of "a red circle" and "a red square"): the shipped teacher, whose run escaped, 8.8; the two from-scratch
runs that missed the issue's goals on circle <-> square errors 4.3 and 1.8 (1.5 already at 3,000 steps), while
circle <-> triangle stayed 13-27 in all three.

The remedy is a small auxiliary loss, :class:`WordIdentityHead`: a linear read-out that must name, from the
encoder's output at each position, the token that was there (cross-entropy over the vocabulary, padding left out).
It costs one 64 x vocab matrix product per step and uses no label beyond the caption itself; it keeps every word
recoverable from the conditioning, so the UNet can learn the pair whenever it becomes able to see it. The head is
trained with the networks and kept in checkpoints, never shipped: the pipeline stays a plain diffusers one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff._checks import check_number

#: ``train shapes --word-loss-weight``'s default: the weight that kept "circle" and "square" apart in both measured
#: from-scratch seeds (0 turns the loss off: the loop the shipped teacher was trained with)
DEFAULT_WEIGHT = 0.1

#: the prompts :func:`text_contrast` compares: one colour, each shape
CONTRAST_PROMPTS = {"circle": "a red circle", "square": "a red square", "triangle": "a red triangle"}


def check_weight(weight) -> float:
    """``weight`` as a float >= 0 (0: the loss is off), else :class:`~fastdiff.errors.InvalidInput`."""
    return check_number("word_loss_weight", weight, minimum=0.0)


class WordIdentityHead(torch.nn.Module):
    """A linear read-out from the text encoder's hidden states (width ``hidden``) to its ``vocab_size`` tokens."""

    def __init__(self, hidden: int, vocab_size: int, pad_token_id: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.proj = torch.nn.Linear(hidden, vocab_size)
        self.pad_token_id = int(pad_token_id)

    def loss(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of naming ``input_ids`` (B, L) from ``hidden_states`` (B, L, hidden) over the positions
        that are not padding (CLIP pads with its end-of-text token, so the end token counts as padding too)."""
        keep = input_ids != self.pad_token_id
        if not bool(keep.any()):  # a batch of empty prompts only: nothing to name
            return hidden_states.sum() * 0.0
        return F.cross_entropy(self.proj(hidden_states[keep]), input_ids[keep])


@torch.no_grad()
def text_contrast(text_encoder, ids: torch.Tensor) -> dict[str, float]:
    """Distances between the encoder's outputs (``last_hidden_state``, the UNet's conditioning, every position) for
    "a red circle" / "a red square" / "a red triangle": ``{"circle-square", "circle-triangle", "square-triangle"}``.
    ``ids``: :data:`CONTRAST_PROMPTS` tokenized as training tokenizes captions, in that order. A circle-square
    distance far below the others means the encoder merged the pair (see the module docstring)."""
    names = list(CONTRAST_PROMPTS)
    was_training = text_encoder.training
    text_encoder.eval()
    h = text_encoder(ids)[0].float()
    text_encoder.train(was_training)
    out = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out[f"{names[i]}-{names[j]}"] = round(float((h[i] - h[j]).norm()), 3)
    return out
