"""The shapes VAE trainer: Stable Diffusion's latent layout, a folder diffusers loads, seeded and resumable
bit-for-bit (a few steps of batch 2; the quality of a real run is measured by the trainer, not here)."""

from __future__ import annotations

import numpy as np
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


#: held-out renders per kind the shipped-VAE test reconstructs (~3 s); the trainer measured 300 per kind
N_SHIPPED = 50
#: judge's fully-correct rate the shipped VAE's reconstructions must reach (measured: 100 % / 99.7 % on 300)
VAE_MIN_JUDGE = 0.95


def test_shipped_vae_reconstructions_pass_the_judge():
    from fastdiff.models.shapes import render
    from fastdiff.models.shapes.captions import caption
    from fastdiff.quality import shapes_judge as J

    vae = diffusers.AutoencoderKL.from_pretrained(str(train_vae.VAE_DIR))
    assert vae.config.latent_channels == 4
    for n_obj in (1, 2):
        scenes = [render.random_scene(render.rng_for(55_555, i), p_two=float(n_obj == 2)) for i in range(N_SHIPPED)]
        x = torch.stack([torch.from_numpy(render.render(s)).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
        y = train_vae.reconstruct(vae, x)
        s = J.score(J.shipped(), (y + 1) / 2, [caption(sc.spec) for sc in scenes])
        assert (s.one_object if n_obj == 1 else s.two_object) >= VAE_MIN_JUDGE


def test_cosine_schedule_changes_training_resumes_and_is_checked(tmp_path):
    kw = dict(batch_size=2, save_every=2, progress=False, report_size=0, scale_size=4)
    train_vae.train(steps=4, out=tmp_path / "constant", **kw)
    train_vae.train(steps=4, out=tmp_path / "cosine", lr_schedule="cosine", **kw)
    assert (tmp_path / "constant" / WEIGHTS).read_bytes() != (tmp_path / "cosine" / WEIGHTS).read_bytes()
    train_vae.train(steps=2, out=tmp_path / "resumed", lr_schedule="cosine", **kw)
    with pytest.raises(InvalidInput, match="lr-schedule cosine"):
        train_vae.train(steps=4, out=tmp_path / "resumed", resume=True, **kw)
    train_vae.train(steps=4, out=tmp_path / "resumed", resume=True, lr_schedule="cosine", **kw)
    assert (tmp_path / "cosine" / WEIGHTS).read_bytes() == (tmp_path / "resumed" / WEIGHTS).read_bytes()
    with pytest.raises(InvalidInput, match="lr_schedule"):
        train_vae.train(steps=2, out=tmp_path / "bad", lr_schedule="linear", **kw)


def test_shape_contrast_is_the_scaled_latent_distance_of_circle_and_square():
    vae = diffusers.AutoencoderKL.from_pretrained(str(train_vae.VAE_DIR)).float()
    base = train_vae.shape_contrast(vae, n=8)
    assert base > 1.0  # the shipped VAE tells circle from square (measured 10.6 over 64 placements)
    vae.register_to_config(scaling_factor=2 * vae.config.scaling_factor)
    assert train_vae.shape_contrast(vae, n=8) == pytest.approx(2 * base, rel=1e-5)  # in the UNet's units
    # one placement by hand: the same colour, size and centre, two shapes
    from fastdiff.models.shapes import render

    rng = render.rng_for(train_vae.HELD_OUT_SEED, 2**40)
    r, (cx, cy) = rng.uniform(*render.RADIUS["small"]), rng.uniform(16.0, 48.0, 2)
    imgs = [render.render_objects([render.PlacedObject(s, "red", "small", cx, cy, r)]) for s in ("circle", "square")]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    assert train_vae.shape_contrast(vae, n=1) == pytest.approx((z[0] - z[1]).norm().item(), rel=1e-5)
