"""The text coalescer (shapes): its index against a brute-force search, the loss against the plain formula,
resumable training, adaptive steps, guidance, the sample_images contract and the errors for bad inputs. A tiny
index (48 rendered pairs) and tiny networks: seconds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastdiff.distill.coalescer import CoalescerTrainSpec, coalescer_loss
from fastdiff.distill.coalescer_index import nearest_reference
from fastdiff.distill.text_coalescer import (
    encoder,
    generate,
    load,
    pipeline_noise,
    sample_images,
    train_text_coalescer,
)
from fastdiff.distill.text_coalescer_index import TextIndexSpec, build_index, load_index, make_keys
from fastdiff.errors import InvalidInput, ModelNotFound
from fastdiff.models.coalescer_net import coalesce_step
from fastdiff.models.text_coalescer_net import load_text_coalescer

pytest.importorskip("faiss")

# fp32 network outputs against the same math written out in plain torch (different op order only)
TOL = dict(rtol=1e-5, atol=1e-5)
PROMPTS = ["a red circle left of a blue square", "a small green triangle at the top"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("text-index")
    build_index(TextIndexSpec(num_pairs=48, shard_size=16, desc_scale=3.0), out, progress=False)
    return out


@pytest.fixture(scope="module")
def index(index_dir):
    return load_index(index_dir, model="shapes", encoder=encoder())


def tiny_spec(index, steps: int = 6, **kw) -> CoalescerTrainSpec:
    return CoalescerTrainSpec(index_sha256=index.sha256, steps=steps, batch_size=8, hidden=32, depth=1,
                              embed_dim=int(index.embeddings.shape[1]), prior_scale=2.0, **kw)


@pytest.fixture(scope="module")
def model_dir(index, tmp_path_factory):
    out = tmp_path_factory.mktemp("text-coalescer") / "m"
    train_text_coalescer(index, out, tiny_spec(index), name="tiny-shapes-coalescer", progress=False,
                         defaults={"scheduler": "coalescer", "num_inference_steps": 2, "guidance_scale": 1.5})
    return out


def test_index_holds_the_encoders_latents_and_embeddings(index):
    enc = encoder()
    assert index.latents.shape == (48, 4, 16, 16) and index.embeddings.shape == (48, 64)
    from fastdiff.distill.text_coalescer_index import encode_pairs
    from fastdiff.models.shapes.train_unet import tokenize

    want = encode_pairs(enc, 0, 16, 4)
    # the embedding sees exactly the token ids the pipeline (and the UNet's training) sees
    ids = tokenize(enc.tokenizer, want["captions"])
    torch.testing.assert_close(want["embedding"], enc.text_encoder(ids).pooler_output)
    torch.testing.assert_close(index.latents[16:20], want["latent"])
    torch.testing.assert_close(index.embeddings[16:20], want["embedding"])
    assert index.captions[16:20] == want["captions"]
    torch.testing.assert_close(index.null_embedding, enc.embed([""])[0])


@pytest.mark.parametrize("desc_scale", [3.0])
def test_faiss_lookup_is_the_brute_force_nearest_pair(index, desc_scale):
    g = torch.Generator().manual_seed(5)
    pick = torch.randint(0, 48, (64,), generator=g)
    de = index.embeddings[pick] + 0.3 * torch.randn((64, 64), generator=g)
    points = 2.0 * torch.randn((64, 4, 16, 16), generator=g)
    want = nearest_reference(make_keys(index.latents, index.embeddings, desc_scale), make_keys(points, de, desc_scale))
    assert torch.equal(index.nearest(de, points), want)
    # the null condition (the empty prompt's embedding): the nearest latent whatever the caption
    de[::3] = index.null_embedding
    want[::3] = nearest_reference(index.latents.flatten(1), points[::3].flatten(1))
    assert torch.equal(index.nearest(de, points), want)
    # the condition part decides at a large desc_scale: a query with a pair's own embedding finds that pair
    # whenever the captions differ (the tiny index's captions are all distinct)
    assert len(set(index.captions)) == 48


def test_training_loss_is_the_plain_formula(index):
    torch.manual_seed(0)
    from fastdiff.distill.text_coalescer import build
    from fastdiff.models.coalescer_net import CoalescerConfig

    m = build(CoalescerConfig(in_channels=4, sample_size=16, cross_attention_dim=64, hidden=32, depth=1),
              index.null_embedding, "t")
    g = torch.Generator().manual_seed(1)
    r = torch.randn((8, 4, 16, 16), generator=g)
    de = index.conditions(torch.arange(8), torch.tensor([False] * 7 + [True]))
    torch.testing.assert_close(de[7], index.null_embedding)
    target = index.latents[index.nearest(de, r)]
    dist, direction = m.heads(r, de)
    loss, _ = coalescer_loss(dist, direction, target, r, 1 / 1024, eps=0.0)
    true = (target - r).flatten(1).norm(dim=1)
    unit = (target - r).flatten(1) / true[:, None]
    plain = (((dist - true) ** 2) / 1024 + (direction.flatten(1) - unit).norm(dim=1).sqrt()).mean()
    torch.testing.assert_close(loss, plain, **TOL)


def test_resume_is_bit_for_bit(index, tmp_path):
    spec = tiny_spec(index)
    straight = train_text_coalescer(index, None, spec, name="t", checkpoint=tmp_path / "a.ckpt", save_every=3,
                                    progress=False)
    train_text_coalescer(index, None, spec, name="t", checkpoint=tmp_path / "b.ckpt", save_every=3, progress=False,
                         stop_after=3)
    resumed = train_text_coalescer(index, None, spec, name="t", checkpoint=tmp_path / "b.ckpt", save_every=3,
                                   progress=False)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(InvalidInput, match="other settings"):
        train_text_coalescer(index, None, tiny_spec(index, steps=9), name="t", checkpoint=tmp_path / "b.ckpt",
                             progress=False)


def test_saved_model_records_wall_time_and_defaults(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    meta = cfg["metadata"]
    assert meta["wall_s"] >= meta["wall_s_train"] > 0 and meta["wall_s"] >= meta["index_build_wall_s"] > 0
    assert cfg["defaults"]["guidance_scale"] == 1.5 and cfg["format"] == "fastdiff.text_coalescer"
    m = load(model_dir)
    assert m.defaults["num_inference_steps"] == 2


def test_guidance_extrapolates_the_two_targets(model_dir):
    m = load(model_dir)
    de = encoder().embed(PROMPTS)
    z = pipeline_noise([0, 1])
    x = z * m.unet.config.prior_scale
    t_c = coalesce_step(x, *m.heads(x, de))
    t_u = coalesce_step(x, *m.heads(x, m.null_embedding.expand(2, -1)))
    for g in (1.0, 2.5):
        got, used = generate(m, de, z.clone(), 1, g)
        torch.testing.assert_close(got, t_c if g == 1.0 else t_u + g * (t_c - t_u), **TOL)
        assert used.tolist() == [1, 1]


def test_adaptive_steps_stop_where_the_direction_is_long(model_dir):
    m = load(model_dir)
    de = encoder().embed(PROMPTS).repeat_interleave(4, 0)
    z = pipeline_noise([0, 1, 2, 3]).repeat(2, 1, 1, 1)
    x1 = z * m.unet.config.prior_scale
    conf = m.heads(x1, de)[1].flatten(1).norm(dim=1)
    thr = float(conf.median())
    _, used = generate(m, de, z.clone(), 2, 1.0, thr)
    assert used.tolist() == [1 if c >= thr else 2 for c in conf.tolist()]
    assert 0 < (used == 1).sum() < 8
    assert generate(m, de, z.clone(), 2, 1.0, 0.0)[1].tolist() == [1] * 8
    fixed, used2 = generate(m, de, z.clone(), 2, 1.0, None)
    assert used2.tolist() == [2] * 8
    adaptive, _ = generate(m, de, z.clone(), 2, 1.0, float("inf"))
    torch.testing.assert_close(adaptive, fixed)


def test_sample_images_contract(model_dir):
    images, used, seconds = sample_images(model_dir, PROMPTS, [0, 3], max_steps=1, guidance=1.5)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and seconds > 0
    assert used.dtype == torch.long and used.tolist() == [1, 1, 1, 1]
    # prompt-major, image k of a prompt from the pipeline's noise of seed k
    one, _, _ = sample_images(model_dir, PROMPTS[1:], [3], max_steps=1, guidance=1.5)
    torch.testing.assert_close(images[3:4], one, **TOL)
    assert torch.equal(pipeline_noise([3]), torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)))
    # a fixed step count ignores no argument: threshold None runs max_steps for every sample
    _, used, _ = sample_images(model_dir, PROMPTS, [0], max_steps=2)
    assert used.tolist() == [2, 2]


def test_bad_inputs_are_clear_errors(model_dir, index_dir, tmp_path):
    from fastdiff.distill.text_coalescer import default_threshold

    with pytest.raises(InvalidInput, match="no adaptive threshold"):
        default_threshold(model_dir)
    with pytest.raises(InvalidInput, match="1 to 2"):
        sample_images(model_dir, PROMPTS, [0], max_steps=3)
    with pytest.raises(InvalidInput, match="prompts"):
        sample_images(model_dir, "a red circle", [0], max_steps=1)
    with pytest.raises(InvalidInput, match="seeds"):
        sample_images(model_dir, PROMPTS, [-1], max_steps=1)
    with pytest.raises(InvalidInput, match="guidance"):
        sample_images(model_dir, PROMPTS, [0], max_steps=1, guidance=float("nan"))
    with pytest.raises(ModelNotFound, match="not a text coalescer"):
        load(tmp_path / "nothing")
    # damaged weights
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelNotFound, match="sha256"):
        load_text_coalescer(bad)
    # a model that learned another VAE / text encoder
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["encoders"]["vae_sha256"] = "0" * 64
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInput, match="another text encoder or VAE"):
        load(other)


def test_index_errors(index_dir, tmp_path):
    with pytest.raises(InvalidInput, match="built for model"):
        load_index(index_dir, model="digits")
    from fastdiff.distill.coalescer_index import IndexSpec
    from fastdiff.distill.coalescer_index import build_index as build_label_index

    digits_dir = build_label_index(IndexSpec(), tmp_path / "digits-index", progress=False)
    with pytest.raises(InvalidInput, match="label .digits. coalescer index"):
        load_index(digits_dir)
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["encoders"]["text_encoder_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InvalidInput, match="another text encoder or VAE"):
        load_index(copy, encoder=encoder())
    (copy / "pairs.safetensors").write_bytes(b"truncated")
    with pytest.raises(InvalidInput, match="modified or truncated"):
        load_index(copy)
    with pytest.raises(InvalidInput, match="other settings"):
        build_index(TextIndexSpec(num_pairs=48, shard_size=16, desc_scale=5.0), index_dir, progress=False)
    with pytest.raises(InvalidInput, match="desc_scale"):
        TextIndexSpec(desc_scale=-1.0).check()


def test_fastdiff_sample_takes_a_text_coalescer(model_dir):
    import fastdiff

    gens = [torch.Generator().manual_seed(k) for k in (0, 3)]
    got = fastdiff.sample(model=str(model_dir), prompt=PROMPTS[:1], num_images_per_prompt=2, num_inference_steps=1,
                          guidance_scale=1.5, generator=gens, output_type="pt")
    want, _, _ = sample_images(model_dir, PROMPTS[:1], [0, 3], max_steps=1, guidance=1.5)
    torch.testing.assert_close(got, want, **TOL)
    pil = fastdiff.sample(model=str(model_dir), prompt="a red circle", num_inference_steps=2)
    assert len(pil) == 1 and pil[0].size == (64, 64)
    with pytest.raises(InvalidInput, match="1 to 2"):
        fastdiff.sample(model=str(model_dir), prompt="a red circle", num_inference_steps=3)
    with pytest.raises(InvalidInput, match="scheduler"):
        fastdiff.sample(model=str(model_dir), prompt="a red circle", scheduler="ddim")


def test_cli_builds_trains_resumes_and_evaluates(tmp_path, capsys):
    from fastdiff.cli import main
    from tests.cli_helpers import one_line_error

    idx, out = tmp_path / "idx", tmp_path / "m"
    assert main(["distill", "coalescer-index", "--model", "shapes", "--num-pairs", "24", "--shard-size", "12",
                 "--out", str(idx), "--no-progress"]) == 0
    train = ["distill", "coalescer-train", "--model", "shapes", "--index", str(idx), "--out", str(out), "--steps", "4",
             "--hidden", "16", "--depth", "1", "--batch-size", "8", "--save-every", "2", "--no-progress"]
    assert main([*train, "--stop-after", "2"]) == 0  # a job killed after its first checkpoint
    assert not out.exists()
    assert main(train) == 0
    assert "resuming from" in capsys.readouterr().out
    assert load(out).name == "shapes-coalescer"
    assert main(["eval", "--model", str(out), "--steps", "1", "--num-seeds", "1", "--guidance", "1"]) == 0
    text = capsys.readouterr().out
    assert "one object fully correct" in text and "mean steps per image 1.00" in text
    err = one_line_error(["distill", "coalescer-train", "--model", "digits", "--index", str(idx), "--out",
                          str(tmp_path / "m2")], capsys)
    assert "text (shapes) coalescer index" in err


@pytest.mark.slow
def test_onnx_export_matches_torch(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastdiff.export.text_coalescer import export_text_coalescer

    r = export_text_coalescer(model_dir, tmp_path / "onnx", steps=2, guidance=1.5)
    assert r.parity_rel_err is not None and r.parity_rel_err < 1e-3
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["inputs"] == ["input_ids", "noise"]
    import onnxruntime as ort

    from fastdiff.export.text_coalescer import _ids

    want, _, _ = sample_images(model_dir, PROMPTS, [5], max_steps=2, guidance=1.5)  # another batch size
    ids, noise = _ids(encoder(), PROMPTS), pipeline_noise([5]).repeat(2, 1, 1, 1)
    got = ort.InferenceSession(str(r.path)).run(["image"], {"input_ids": ids.numpy(), "noise": noise.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-3)


def test_the_unshipped_name_says_why():
    """shapes-coalescer was trained and measured but does not ship: its name is a clear error, not "unknown"."""
    from fastdiff.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match="is not shipped: .*35.1 %.*coalescer-train"):
        load("shapes-coalescer")


def test_sample_cli_draws_a_prompt_grid(model_dir, tmp_path, capsys):
    from fastdiff.cli import main
    from tests.cli_helpers import one_line_error

    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--num-per-prompt", "2",
                 "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    assert out.stat().st_size > 0 and "coalescer 1 steps" in capsys.readouterr().out
    err = one_line_error(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--scheduler", "ddim",
                          "--out", str(tmp_path / "g2.png")], capsys)
    assert "does not apply to a text coalescer" in err


def test_a_coalescer_folder_is_a_row_of_the_shapes_table(model_dir):
    """``eval --compare --model shapes --extra-model DIR`` with a text coalescer folder: 1 / 2 steps and adaptive,
    guidance 1.5 (the folder's default: a batch of 2 per step), steps beyond 2 refused before any work."""
    from fastdiff.errors import InvalidInput
    from fastdiff.quality import shapes_compare as SC

    path, steps = SC.parse_extra_pipeline(str(model_dir))
    assert steps == [1, 2]
    with pytest.raises(InvalidInput, match="1 or 2 steps"):
        SC.parse_extra_pipeline(f"{model_dir}:4")
    jobs = [j for j in SC.default_jobs([(path, [1])], adaptive_threshold=0.5) if j.model == path]
    assert [(j.kind, j.steps, j.adaptive, j.threshold) for j in jobs] == [("coalescer", 1, False, None),
                                                                         ("coalescer", 1, True, 0.5)]
    rows = SC.compare([SC.ShapesCompareJob(path, "coalescer", 2, kind="coalescer")], seeds=(0,), prompts=PROMPTS,
                      progress=False)
    assert rows[0].mean_steps == 2 and rows[0].guidance == 1.5
    assert rows[0].calls_per_image == pytest.approx(2 * 2)  # CFG: conditional + null rows at each of 2 steps
