"""ONNX export of the shapes pipeline's components (``python -m fastdiff.export shapes --format onnx``): the three
graphs and their signatures, parity with PyTorch on fresh random inputs, the manifest and its verification, the
exported graphs in the pipeline's own sampling loop, atomicity, and bad input.

Runs on a tiny randomly initialised UNet and text encoder (with the shipped VAE and tokenizer) saved by the trainer's
``save_components``, i.e. a folder as ``python -m fastdiff train shapes`` writes it; one export serves every test."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from fastdiff._atomic import sha256_file
from fastdiff.errors import ExportError, InvalidInput, ModelConfigError, ModelNotFound
from fastdiff.export.__main__ import main as export_main
from fastdiff.export.onnx import PARITY_TOL
from fastdiff.export.profiles import available_profiles
from fastdiff.export.text_to_image import export_pipeline_onnx, is_pipeline_export
from fastdiff.exported.manifest import MANIFEST_NAME, read_manifest
from fastdiff.models import load_pipeline
from fastdiff.models.shapes import pipeline as P
from tests.export.tiny_models import tiny_shapes_pipeline
from tests.tolerances import ONNX_FP32_RTOL, ONNX_PIPELINE_IMG_ATOL, rel_err

ort = pytest.importorskip("onnxruntime")

# one cross-attention block (+ the cross-attention mid block) instead of the shipped three blocks: tracing time grows
# with the number of graph ops (UNet trace 13 s vs 34 s for the shipped architecture; 1 thread, load average 3)
TINY_UNET = {**P.UNET_CONFIG, "block_out_channels": [8], "norm_num_groups": 4, "attention_head_dim": 4,
             "cross_attention_dim": 16, "down_block_types": ["CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D"]}
FILES = ["text_encoder.onnx", "unet.onnx", "vae_decoder.onnx"]
PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_shapes_pipeline(tmp_path_factory.mktemp("shapes_tiny"), TINY_UNET)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """The CLI's export of the tiny folder: (out folder, printed summary)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("shapes_onnx") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = export_main([str(tiny_dir), "--format", "onnx", "--out", str(out), "--quiet"])
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipeline(tiny_dir)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_files_manifest_and_summary(exported, tiny_dir):
    out, printed = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES + [MANIFEST_NAME])  # no staging left behind
    m = read_manifest(out)
    assert m["opset"] == 18 and m["precision"] == "fp32" and m["model"] == tiny_dir.name
    assert {f["name"]: f["sha256"] for f in m["files"]} == {f: sha256_file(out / f) for f in FILES}
    assert {f["name"]: f["bytes"] for f in m["files"]} == {f: (out / f).stat().st_size for f in FILES}
    for comp in ("unet", "text_encoder", "vae_decoder"):
        parity = m["components"][comp]["parity"]
        assert [p["label"] for p in parity] == ["opt", "odd"]
        assert [p["shape"]["batch"] for p in parity] == [16, 1]  # the profile's opt (8 images with CFG) and min
        assert all(p["ok"] and p["max_rel"] <= PARITY_TOL["fp32"] for p in parity), parity
        assert f"{comp}.onnx" in printed
    assert m["scheduler"]["_class_name"] == "DPMSolverMultistepScheduler" and m["defaults"] == P.DEFAULTS
    assert m["tokenizer"]["model_max_length"] == 24 and m["vae"]["scale_factor"] == 4
    assert printed.count("ok") >= 6 and "manifest" in printed


def _dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def test_graph_signatures(exported):
    out, _ = exported
    want = {
        "text_encoder.onnx": ({"input_ids": ["batch", 24]}, {"last_hidden_state": ["batch", 24, 16]}),
        "unet.onnx": ({"sample": ["batch", 4, 16, 16], "timestep": ["batch"],
                       "encoder_hidden_states": ["batch", 24, 16]}, {"out_sample": ["batch", 4, 16, 16]}),
        "vae_decoder.onnx": ({"latents": ["batch", 4, 16, 16]}, {"image": ["batch", 3, 64, 64]}),
    }
    for name, (inputs, outputs) in want.items():
        proto = onnx.load(str(out / name))
        onnx.checker.check_model(proto, full_check=True)
        assert _dims(proto.graph.input) == inputs and _dims(proto.graph.output) == outputs, name
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["fastdiff.kind"] == name.removesuffix(".onnx") and proto.opset_import[0].version >= 18
    ids = onnx.load(str(out / "text_encoder.onnx")).graph.input[0]
    assert ids.type.tensor_type.elem_type == onnx.TensorProto.INT64


@pytest.mark.parametrize("batch", [3, 5])  # neither the export's trace size (2) nor its parity sizes (16, 1)
def test_components_match_pytorch_on_fresh_inputs(exported, pipe, batch):
    """Each graph against the pipeline's own PyTorch call (not the exporter's wrappers) on new random inputs."""
    out, _ = exported
    g = torch.Generator().manual_seed(100 + batch)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (batch, 24), generator=g)
    sample, latents = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    with torch.no_grad():
        ehs = pipe.text_encoder(ids)[0]
        eps = pipe.unet(sample, t, encoder_hidden_states=ehs).sample
        image = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    got_ehs = _session(out / "text_encoder.onnx").run(None, {"input_ids": ids.numpy()})[0]
    got_eps = _session(out / "unet.onnx").run(None, {"sample": sample.numpy(), "timestep": t.numpy(),
                                                     "encoder_hidden_states": ehs.numpy()})[0]
    got_image = _session(out / "vae_decoder.onnx").run(None, {"latents": latents.numpy()})[0]
    for name, got, want in (("text_encoder", got_ehs, ehs), ("unet", got_eps, eps), ("vae_decoder", got_image, image)):
        assert got.shape == tuple(want.shape), name
        assert rel_err(torch.from_numpy(got), want) <= ONNX_FP32_RTOL, (name, rel_err(torch.from_numpy(got), want))
    # the comparisons mean something: outputs vary across the batch, and the image is not all clipped
    assert (ehs[0] - ehs[1]).abs().max() > 1e-3 and (eps[0] - eps[1]).abs().max() > 1e-3
    assert ((image > 0) & (image < 1)).float().mean() > 0.1


def test_onnx_graphs_in_the_pipeline_loop_give_its_images(exported, pipe):
    from fastdiff.backends.onnx_pipeline import OnnxTextToImage

    runner = OnnxTextToImage(exported[0])
    for steps, guidance in ((4, 5.0), (3, 1.0)):  # with and without classifier-free guidance
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
        got = runner(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(3))
        assert got.shape == ref.shape == (2, 64, 64, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=ONNX_PIPELINE_IMG_ATOL, rtol=0)
        assert np.abs(ref[0] - ref[1]).max() > 1e-2  # the prompts (and noises) differ, so do the images
    negative = ["a blue square", "a green circle at the top"]
    ref = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(4), output_type="np").images
    got = runner(PROMPTS, negative_prompt=negative, num_inference_steps=3, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(got, ref, atol=ONNX_PIPELINE_IMG_ATOL, rtol=0)
    with pytest.raises(InvalidInput, match="negative_prompt"):
        runner(PROMPTS, negative_prompt=["x"])


def test_manifest_verification_refuses_damaged_exports(exported, tmp_path):
    from fastdiff.backends.onnx_pipeline import OnnxTextToImage

    def copy(name):
        d = tmp_path / name
        shutil.copytree(exported[0], d)
        return d

    d = copy("flipped")
    data = bytearray((d / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelNotFound, match="unet.onnx has sha256"):
        OnnxTextToImage(d)
    d = copy("missing")
    (d / "vae_decoder.onnx").unlink()
    with pytest.raises(ModelNotFound, match="missing"):
        read_manifest(d)
    d = copy("escape")
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["files"][0]["name"] = "../unet.onnx"
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ModelConfigError, match="plain file name"):
        read_manifest(d)
    m["files"][0]["name"] = "text_encoder.onnx"
    del m["components"]["unet"]["inputs"][0]["dims"]
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ModelConfigError, match="malformed signature"):
        read_manifest(d)
    (d / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelConfigError, match="cannot read"):
        read_manifest(d)
    (d / MANIFEST_NAME).unlink()
    with pytest.raises(ModelNotFound, match="holds no manifest.json"):
        read_manifest(d)


def test_a_failed_export_keeps_the_previous_one(exported, tiny_dir, tmp_path):
    """A parity failure (forced by a tolerance nothing meets) publishes nothing: the earlier export still verifies,
    and a new folder is not created. The text encoder is exported first, so this fails within seconds."""
    d = tmp_path / "kept"
    shutil.copytree(exported[0], d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ExportError, match="parity check failed"):
        export_pipeline_onnx(tiny_dir, d, parity_tol=1e-12, progress=False)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    read_manifest(d)
    with pytest.raises(ExportError):
        export_pipeline_onnx(tiny_dir, tmp_path / "new" / "out", parity_tol=1e-12, progress=False)
    assert not (tmp_path / "new").exists()


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = export_main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_bad_input_is_one_error_line_and_exit_2(tiny_dir, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    dynamic = tmp_path / "dynamic.toml"  # the shapes profile with a height range: the VAE graph needs one size
    dynamic.write_text(available_profiles()["shapes"].read_text().replace(
        "height = { min = 16, opt = 16, max = 16 }", "height = { min = 8, opt = 16, max = 32 }"))
    cases = [
        (["no-such-model", "--format", "onnx", "--out", tmp_path / "o1"], "unknown model"),
        ([empty, "--format", "onnx", "--out", tmp_path / "o2"], "holds no model"),  # a folder, not a pipeline
        ([tiny_dir, "--format", "onnx", "--out", a_file], "is a file"),  # --out cannot be a folder
        ([tiny_dir, "--format", "onnx", "--out", tmp_path / "o3", "--sampler", "onestep"], "do not apply"),
        ([tiny_dir, "--format", "onnx", "--out", tmp_path / "o4", "--batch", "1:128"], "batch"),  # profile: 1..64
        (["shapes", "--format", "tensorrt", "--out", tmp_path / "o5"], "DIR/unet.onnx"),
        ([tiny_dir, "--format", "onnx", "--out", tmp_path / "o7", "--profile", dynamic], "one latent size"),
    ]
    for argv, words in cases:
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dynamic.toml", "empty"]  # nothing written
    # the shipped name without its weights: the trainer's hint, not a crash
    monkeypatch.setattr(P, "PIPELINE_DIR", tmp_path / "no_weights")
    rc, err = _cli(capsys, "shapes", "--format", "onnx", "--out", tmp_path / "o6")
    assert rc == 2 and len(err) == 1 and "train shapes" in err[0]


def test_what_counts_as_a_pipeline(tiny_dir, tmp_path):
    assert is_pipeline_export("shapes") and is_pipeline_export(tiny_dir) and is_pipeline_export(str(tiny_dir))
    assert not is_pipeline_export("digits") and not is_pipeline_export(tmp_path)
    # a diffusers pipeline folder without fastdiff's training record (Stable Diffusion's) keeps its UNet-only export
    sd = tmp_path / "sd"
    shutil.copytree(tiny_dir, sd)
    cfg = json.loads((sd / "unet" / "config.json").read_text())
    del cfg["_fastdiff"]
    (sd / "unet" / "config.json").write_text(json.dumps(cfg))
    assert not is_pipeline_export(sd)
    with pytest.raises(ModelNotFound, match="not a text-to-image pipeline"):
        export_pipeline_onnx(sd, tmp_path / "out")
    with pytest.raises(ModelNotFound, match="not a text-to-image pipeline"):
        export_pipeline_onnx("digits", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_defaults_to_out_name_onnx_for_a_pipeline(tiny_dir, monkeypatch, capsys):
    import fastdiff.export.text_to_image as T

    seen = {}

    class Done:
        def summary(self):
            return "done"

    def fake_export(model, out_dir, **kw):
        seen.update(model=model, out=out_dir, **kw)
        return Done()

    monkeypatch.setattr(T, "export_pipeline_onnx", fake_export)
    assert export_main([str(tiny_dir), "--format", "onnx", "--precision", "fp16", "--batch", "1:8"]) == 0
    assert seen["out"] == f"out/{tiny_dir.name}-onnx" and seen["precision"] == "fp16" and seen["batch"] == "1:8"
    assert capsys.readouterr().out.strip() == "done"
    with pytest.raises(SystemExit):  # not a pipeline: --out stays required
        export_main(["digits", "--format", "onnx"])
