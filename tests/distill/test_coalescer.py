"""Coalescer networks: the faiss index against a brute-force search, the loss and generation against plain-torch
references, sampler plug-in, resumable training, sharded index building and the errors for bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff.distill.coalescer import (
    CoalescerTrainSpec,
    build_model,
    coalescer_loss,
    generate,
    load_checkpoint,
    train_coalescer,
)
from fastdiff.distill.coalescer_index import (
    CoalescerIndex,
    IndexSpec,
    build_faiss,
    build_index,
    build_shards,
    load_index,
    make_keys,
    merge_and_index,
    nearest_reference,
)
from fastdiff.errors import InvalidInput
from fastdiff.models import load
from fastdiff.models.coalescer_net import save_coalescer

faiss = pytest.importorskip("faiss")

# fp32 network outputs compared with the same math written out in plain torch (different op order only)
GEN_TOL = dict(rtol=1e-5, atol=1e-5)
K, SHAPE = 4, (1, 4, 4)


def random_index(n: int = 300, seed: int = 0, index_type: str = "flat", desc_scale: float = 2.0) -> CoalescerIndex:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, *SHAPE), generator=g)
    labels = torch.randint(0, K, (n,), generator=g)
    spec = IndexSpec(desc_scale=desc_scale, index_type=index_type)
    return CoalescerIndex(spec, latents, labels, K, build_faiss(make_keys(latents, labels, K, desc_scale), index_type))


def tiny_model(seed: int = 0, num_steps: int = 2, prior_scale: float = 1.0):
    torch.manual_seed(seed)
    spec = CoalescerTrainSpec(index_sha256="t", hidden=32, depth=1, embed_dim=8, num_steps=num_steps,
                              prior_scale=prior_scale)
    return build_model(spec, SHAPE, K, "tiny-coalescer").eval().requires_grad_(False)


@pytest.mark.parametrize("desc_scale", [0.5, 2.0, 8.0])
def test_flat_index_is_the_brute_force_nearest_neighbour(desc_scale):
    ix = random_index(desc_scale=desc_scale, seed=int(desc_scale * 10))
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, K + 1, (200,), generator=g)  # K = the null label: zero condition part
    points = torch.randn((200, *SHAPE), generator=g)
    keys = make_keys(ix.latents, ix.labels, K, desc_scale)
    want = nearest_reference(keys, ix.query_keys(labels, points))
    assert torch.equal(ix.nearest(labels, points), want)
    # the key really is concat(desc_scale * onehot, latent): a hand-built query finds the same pairs
    q = torch.cat([desc_scale * torch.nn.functional.one_hot(labels, K + 1)[:, :K].float(), points.flatten(1)], 1)
    assert torch.equal(nearest_reference(keys, q), want)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_indexes_find_stored_pairs(index_type):
    ix = random_index(n=400, index_type=index_type)
    g = torch.Generator().manual_seed(3)
    pick = torch.randint(0, 400, (100,), generator=g)
    points = ix.latents[pick] + 0.01 * torch.randn((100, *SHAPE), generator=g)
    want = nearest_reference(make_keys(ix.latents, ix.labels, K, 2.0), ix.query_keys(ix.labels[pick], points))
    assert torch.equal(want, pick)  # a stored pair's own key, barely moved: the exact answer is that pair
    assert (ix.nearest(ix.labels[pick], points) == pick).float().mean() >= 0.95


def _loss_reference(distance, direction, image, start, w):
    """The issue's loss in float64, eps-free: w (d - |I - R|)^2 + sqrt(|dir - (I - R) / |I - R||)."""
    diff = (image.double() - start.double()).flatten(1)
    dist = diff.norm(dim=1)
    v = direction.double().flatten(1) - diff / dist[:, None]
    return (w * (distance.double() - dist) ** 2 + v.norm(dim=1).sqrt()).mean()


def test_loss_matches_the_reference_and_is_smooth_at_zero():
    g = torch.Generator().manual_seed(0)
    image, start, direction = (torch.randn((8, *SHAPE), generator=g) for _ in range(3))
    distance = 5 * torch.rand(8, generator=g)
    w = 0.3
    ref = _loss_reference(distance, direction, image, start, w)
    exact, _ = coalescer_loss(distance.double(), direction.double(), image.double(), start.double(), w, eps=0.0)
    torch.testing.assert_close(exact, ref, rtol=1e-12, atol=1e-12)
    smoothed, _ = coalescer_loss(distance, direction, image, start, w)
    assert abs(float(smoothed) - float(ref)) <= 1e-2  # sqrt(eps) = 0.01: the documented bound of the smoothing
    # a perfect direction (v = 0): eps keeps the gradient finite (the eps-free loss has none there)
    unit = (image - start) / (image - start).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    d = unit.clone().requires_grad_(True)
    coalescer_loss(distance, d, image, start, w)[0].backward()
    assert torch.isfinite(d.grad).all()
    d0 = unit.clone().requires_grad_(True)
    coalescer_loss(distance, d0, image, start, w, eps=0.0)[0].backward()
    assert not torch.isfinite(d0.grad).all()


def _generate_reference(model, labels, noise, steps, g):
    """Plain torch, float64: x <- x + dir / |dir| * dist, CFG extrapolating the two targets."""
    net = model.unet.double()
    emb = model.label_embedding.weight.double()

    def target(x, lab):
        d, v = net.heads(x, emb[lab].unsqueeze(1))
        return x + v * (d / v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)

    x = noise.double() * model.unet.config.prior_scale
    null = torch.full_like(labels, K)
    for _ in range(steps):
        t_c = target(x, labels)
        x = t_c if g == 1.0 else target(x, null) + g * (t_c - target(x, null))
    model.float()
    return x.float()


@pytest.mark.parametrize("steps,g,prior", [(1, 1.0, 1.0), (2, 1.0, 3.0), (1, 2.0, 1.0), (2, 1.5, 4.0)])
def test_sampler_and_generate_match_the_reference(steps, g, prior):
    model = tiny_model(prior_scale=prior)
    labels = torch.arange(6) % K
    noise = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(1))
    want = _generate_reference(model, labels, noise, steps, g)
    got, used = generate(model, labels, noise, steps, g)
    torch.testing.assert_close(got, want, **GEN_TOL)
    assert used.tolist() == [steps] * 6
    out = fastdiff.sample(model=model, num_inference_steps=steps, guidance_scale=g, class_labels=labels,
                          latents=noise, output_type="latent", progress=False, backend="torch")
    torch.testing.assert_close(out, want, **GEN_TOL)


def test_adaptive_steps_follow_the_direction_length():
    model = tiny_model(seed=2)
    labels = torch.arange(16) % K
    noise = torch.randn((16, *SHAPE), generator=torch.Generator().manual_seed(4))
    conf = model.heads(noise, labels)[1].flatten(1).norm(dim=1)
    thr = float(conf.median())
    images, used = generate(model, labels, noise, 2, 1.0, adaptive_threshold=thr)
    assert used.tolist() == [1 if c >= thr else 2 for c in conf.tolist()]
    one, two = generate(model, labels, noise, 1)[0], generate(model, labels, noise, 2)[0]
    torch.testing.assert_close(images, torch.where((used == 1).view(-1, 1, 1, 1), one, two), **GEN_TOL)
    assert generate(model, labels, noise, 2, adaptive_threshold=0.0)[1].tolist() == [1] * 16
    assert generate(model, labels, noise, 2, adaptive_threshold=math.inf)[1].tolist() == [2] * 16


def test_saved_model_loads_by_path_and_refuses_more_steps(tmp_path):
    model = tiny_model()
    save_coalescer(model, tmp_path / "m")
    back = load(tmp_path / "m")
    labels, noise = torch.arange(4) % K, torch.randn((4, *SHAPE))
    a = fastdiff.sample(model=str(tmp_path / "m"), num_inference_steps=2, class_labels=labels, latents=noise,
                        guidance_scale=1.0, output_type="latent", progress=False)
    b = generate(back, labels, noise, 2)[0]
    torch.testing.assert_close(a, b, **GEN_TOL)
    with pytest.raises(InvalidInput, match="1 to 2 steps"):
        fastdiff.sample(model=back, num_inference_steps=3, class_labels=labels, latents=noise, progress=False)
    with pytest.raises(InvalidInput, match="1 to 2 coalescer steps"):
        generate(back, labels, noise, 3)


def test_training_resumes_to_the_same_weights(tmp_path):
    ix = random_index()
    spec = CoalescerTrainSpec(index_sha256="r", steps=6, batch_size=16, hidden=32, depth=1, embed_dim=8)
    straight = train_coalescer(ix, None, spec, checkpoint=tmp_path / "a.ckpt", save_every=3, progress=False)
    train_coalescer(ix, None, spec, checkpoint=tmp_path / "b.ckpt", save_every=3, progress=False, stop_after=3)
    assert load_checkpoint(tmp_path / "b.ckpt")["step"] == 3
    resumed = train_coalescer(ix, None, spec, checkpoint=tmp_path / "b.ckpt", save_every=3, progress=False)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    other = CoalescerTrainSpec(**{**spec.__dict__, "lr": 5e-4})
    with pytest.raises(InvalidInput, match="other settings"):
        train_coalescer(ix, None, other, checkpoint=tmp_path / "b.ckpt", progress=False)


def test_checkpoint_of_another_objective_is_refused(tmp_path):
    torch.save({"objective": "consistency", "step": 3}, tmp_path / "c.ckpt")
    with pytest.raises(InvalidInput, match="objective 'consistency'"):
        load_checkpoint(tmp_path / "c.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")


def test_sharded_build_equals_single_process_and_checks_its_model(tmp_path):
    pytest.importorskip("sklearn")
    spec = IndexSpec(desc_scale=8.0, shard_size=500)
    build_index(spec, tmp_path / "one", progress=False)
    two = tmp_path / "two"
    two.mkdir()
    for rank in (1, 0):  # two ranks of a torchrun job, in either order
        build_shards(spec, two, rank, 2, progress=False)
    merge_and_index(spec, two)
    for name in ("pairs.safetensors", "index.faiss"):
        assert (tmp_path / "one" / name).read_bytes() == (two / name).read_bytes(), name
    ix = load_index(tmp_path / "one", model="digits")
    assert ix.latents.shape == (1797, 1, 16, 16)
    with pytest.raises(InvalidInput, match="built for model 'digits', not 'shapes'"):
        load_index(tmp_path / "one", model="shapes")
    with pytest.raises(InvalidInput, match="other settings"):
        build_index(IndexSpec(desc_scale=4.0, shard_size=500), tmp_path / "one", progress=False)
    raw = bytearray((tmp_path / "one" / "index.faiss").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "one" / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(InvalidInput, match="not the file its manifest records"):
        load_index(tmp_path / "one")
    with pytest.raises(InvalidInput, match="no complete coalescer index"):
        load_index(tmp_path / "nothing")


@pytest.mark.parametrize("kwargs,match", [
    ({"desc_scale": 0.0}, "desc_scale"), ({"desc_scale": float("nan")}, "desc_scale"),
    ({"index_type": "lsh"}, "index_type"), ({"model": "nope"}, "no training pairs"), ({"shard_size": 0}, "shard_size"),
])
def test_bad_index_specs(kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        IndexSpec(**kwargs).check()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tests.cli_helpers import one_line_error

    err = one_line_error(["distill", "coalescer-train", "--index", str(tmp_path / "none"), "--out",
                          str(tmp_path / "m")], capsys)
    assert "no complete coalescer index" in err
    err = one_line_error(["distill", "coalescer-index", "--model", "digits-onestep", "--out", str(tmp_path / "i")],
                         capsys)
    assert "no training pairs" in err


def test_cli_builds_trains_resumes_and_the_model_samples(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from fastdiff.cli import main

    idx, out = tmp_path / "idx", tmp_path / "model"
    assert main(["distill", "coalescer-index", "--out", str(idx), "--no-progress"]) == 0
    train = ["distill", "coalescer-train", "--index", str(idx), "--out", str(out), "--steps", "4", "--hidden", "16",
             "--depth", "1", "--batch-size", "8", "--save-every", "2", "--no-progress"]
    assert main([*train, "--stop-after", "2"]) == 0  # a job killed after its first checkpoint
    assert not out.exists() and load_checkpoint(tmp_path / "model.ckpt")["step"] == 2
    assert main(train) == 0
    assert "resuming from" in capsys.readouterr().out
    img = fastdiff.sample(model=str(out), num_inference_steps=2, class_labels=[3, 4], guidance_scale=1.0,
                          output_type="latent", progress=False)
    assert img.shape == (2, 1, 16, 16) and torch.isfinite(img).all()
    with pytest.raises(InvalidInput, match="1 to 2 steps"):
        fastdiff.sample(model=str(out), num_inference_steps=3, class_labels=[3], progress=False)


def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastdiff.export.coalescer import export_coalescer

    model = tiny_model(prior_scale=2.0)
    rep = export_coalescer(model, tmp_path / "onnx", steps=2, guidance=1.5)
    assert rep.parity_rel_err is not None and rep.parity_rel_err <= 1e-4
    import onnxruntime as ort

    noise, labels = torch.randn((5, *SHAPE)), torch.arange(5) % K  # another batch size than the example's
    got = ort.InferenceSession(str(rep.path)).run(["image"], {"noise": noise.numpy(), "labels": labels.numpy()})[0]
    want = generate(model, labels, noise, 2, 1.5)[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_embedded_digits_coalescer_loads_by_name_and_samples():
    from fastdiff.models import available_models
    from fastdiff.models.coalescer_net import CoalescerModel

    assert "digits-coalescer" in available_models()
    m = load("digits-coalescer")
    assert isinstance(m, CoalescerModel) and m.name == "digits-coalescer" and not m.training
    assert m.defaults == {"scheduler": "coalescer", "num_inference_steps": 2, "guidance_scale": 1.5}
    for steps in (1, 2):
        img = fastdiff.sample(model="digits-coalescer", num_inference_steps=steps, class_labels=list(range(10)),
                              generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
        assert img.shape == (10, 1, 16, 16) and torch.isfinite(img).all()
    with pytest.raises(InvalidInput, match="1 to 2 steps"):
        fastdiff.sample(model="digits-coalescer", num_inference_steps=4, class_labels=[1], progress=False)


def test_bad_coalescer_folders_get_clear_errors(tmp_path):
    import json

    from fastdiff.errors import ModelConfigError, ModelNotFound
    from fastdiff.models import save

    good = save(tiny_model(), tmp_path / "good", name="renamed")  # fastdiff.models.save knows coalescers too
    assert load(good).name == "renamed"
    cfg = json.loads((good / "config.json").read_text())
    for i, (key, value, error, match) in enumerate([
        ("net", None, ModelConfigError, "needs 'net'"),
        ("net", {**cfg["net"], "hidden": 0}, ModelConfigError, "hidden must be an integer >= 1"),
        ("net", {**cfg["net"], "prior_scale": -1.0}, ModelConfigError, "prior_scale"),
        ("net", {**cfg["net"], "colour": 3}, ModelConfigError, "bad 'net'"),
        ("net", {**cfg["net"], "hidden": 64}, ModelNotFound, "do not match the config"),
    ]):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(error, match=match):
            load(d)
    (tmp_path / "bad0" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bad0" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelNotFound, match="cannot read weights"):
        load(tmp_path / "bad0")


@pytest.mark.parametrize("fmt", ["tensorrt", "triton"])
def test_unet_only_exports_refuse_a_coalescer_clearly(fmt, tmp_path, capsys):
    """TensorRT engines and Triton repositories are built for UNets: a coalescer model gets a one-line error that
    names the route that works (it used to be an AttributeError from deep inside the UNet exporter)."""
    from fastdiff.export.__main__ import main

    assert main(["digits-coalescer", "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "coalescer network, not a UNet" in err and "--format onnx" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_model_backends_refuse_a_coalescer_clearly():
    with pytest.raises(InvalidInput, match="CoalescerNet, not a UNet"):
        fastdiff.Sampler("digits-coalescer", backend="onnxruntime")


def test_the_models_own_step_count_is_the_default():
    """fastdiff.sample(model=...) without num_inference_steps takes the model's own default (2 for this one);
    diffusers' usual 20 would only raise 'out of range' for a 2-step model."""
    sampler = fastdiff.Sampler("digits-coalescer")
    got = sampler.sample(class_labels=torch.tensor([3]), output_type="latent", progress=False,
                         generator=torch.Generator().manual_seed(0))
    want = sampler.sample(num_inference_steps=sampler.label_model.defaults["num_inference_steps"],
                          guidance_scale=sampler.label_model.defaults["guidance_scale"],
                          class_labels=torch.tensor([3]), output_type="latent", progress=False,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
