"""The shapes VAE trainer: Stable Diffusion's latent layout, a folder diffusers loads, seeded and resumable
bit-for-bit (a few steps of batch 2; the quality of a real run is measured by the trainer, not here)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.errors import InvalidInput
from fastdiff.models.shapes import train_vae
from tests.cli_helpers import one_line_error

diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_latents_are_4_channels_at_a_quarter_of_the_size():
    vae = train_vae.build_vae(0)
    z = vae.encode(train_vae.images(0, 0, 2)).latent_dist.mode()
    assert tuple(z.shape) == (2, 4, 16, 16)
    assert sum(p.numel() for p in vae.parameters()) * 2 < 2 * 2**20  # under 2 MiB in float16


def test_training_is_seeded_and_resumes_bit_for_bit(tmp_path):
    kw = dict(batch_size=2, save_every=2, progress=False, report_size=0, scale_size=4)
    train_vae.train(steps=4, out=tmp_path / "straight", **kw)
    train_vae.train(steps=2, out=tmp_path / "resumed", **kw)
    train_vae.train(steps=4, out=tmp_path / "resumed", resume=True, **kw)
    assert (tmp_path / "straight" / WEIGHTS).read_bytes() == (tmp_path / "resumed" / WEIGHTS).read_bytes()
    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "resumed"))
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor > 0
    x = train_vae.images(1, 0, 2)
    assert torch.isfinite(train_vae.reconstruct(vae, x)).all()


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="checkpoint"):
        train_vae.train(steps=2, out=tmp_path / "none", resume=True, progress=False, report_size=0)


@pytest.mark.parametrize("argv", [["train", "shapes-vae", "--steps", "0"],
                                  ["train", "shapes-vae", "--foreground-weight", "0.5"],
                                  ["train", "shapes-vae", "--out", __file__, "--steps", "1"]])
def test_cli_refuses_bad_options(argv, capsys):
    one_line_error(argv, capsys)
