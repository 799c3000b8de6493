"""Export profiles, range requests, sampler specs and the CLI's argument errors (no export runs here)."""

from __future__ import annotations

import pytest

from fastdiff.errors import InvalidInput
from fastdiff.export.api import resolve_profile
from fastdiff.export.profiles import (
    DIM_NAMES,
    ExportProfile,
    auto_profile,
    available_profiles,
    infer_family,
    load_profile,
    parse_dim,
    parse_sampler_spec,
)
from fastdiff.exported.specs import DimRange

SHIPPED = ("digits", "sd15", "sdxl", "sd-turbo")
DIGITS_FACTS = {"family": "digits", "in_channels": 1, "out_channels": 1, "sample_size": 16, "cross_attention_dim": 32,
                "addition_embed_type": None, "down_factor": 2, "tokens": 1}
SD15_FACTS = {"in_channels": 4, "out_channels": 4, "sample_size": 64, "cross_attention_dim": 768,
              "addition_embed_type": None, "down_factor": 8}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load(name):
    p = load_profile(name)
    assert p.name == name and p.opset >= 18 and p.precision in ("fp32", "fp16")
    assert set(p.dims) == set(DIM_NAMES)
    for r in p.dims.values():
        assert r.min <= r.opt <= r.max
    assert p.tensorrt.get("workspace_mb", 0) > 0
    assert name in available_profiles()
    assert ExportProfile.from_dict(p.to_dict()).to_json() == p.to_json()  # survives the metadata round trip


def test_parse_dim_forms():
    assert parse_dim("batch", "4") == DimRange("batch", 4, 4, 4)
    assert parse_dim("batch", "1:8") == DimRange("batch", 1, 1, 8)
    assert parse_dim("batch", "1:2:8") == DimRange("batch", 1, 2, 8)
    for bad in ("", "a", "1:2:3:4", "0", "4:2:8"):
        with pytest.raises(InvalidInput):
            parse_dim("batch", bad)


def test_request_outside_profile_names_dimension_and_range():
    p = load_profile("sd15")
    with pytest.raises(InvalidInput, match=r"height=200 is outside profile 'sd15'.*\[32, 128\].*256\.\.1024 pixels"):
        p.narrowed(height="64:64:200")
    with pytest.raises(InvalidInput, match=r"batch=16 .*\[1, 8\]"):
        p.narrowed(batch=16)
    q = p.narrowed(batch="1:1:4", width=96)
    assert q.dims["batch"] == DimRange("batch", 1, 1, 4) and q.dims["width"].static
    assert p.dims["batch"].max == 8  # the original is untouched


def test_resolve_profile_infers_family_rounds_and_fixes_tokens():
    p = resolve_profile(DIGITS_FACTS)
    assert p.name == "digits"
    assert p.dims["height"].multiple == 2 and p.dims["tokens"].static and p.dims["tokens"].min == 1
    with pytest.raises(InvalidInput, match="multiples of 2"):
        resolve_profile(DIGITS_FACTS, height=9)
    p = resolve_profile(SD15_FACTS, precision="fp32", batch="1:2:4")
    assert p.name == "sd15" and p.precision == "fp32" and p.dims["height"].multiple == 8
    with pytest.raises(InvalidInput, match="opset"):
        resolve_profile(SD15_FACTS, opset=17)


def test_profile_model_mismatch_is_refused():
    with pytest.raises(InvalidInput, match="cross_attention_dim: profile expects 768, the model has 32"):
        resolve_profile({**DIGITS_FACTS, "in_channels": 4}, "sd15")


def test_auto_profile_for_unknown_family():
    facts = {**SD15_FACTS, "cross_attention_dim": 32, "sample_size": 16}
    assert infer_family(facts) is None
    p = resolve_profile(facts, tokens=7)
    assert p.name == "auto" and p.dims["height"].min == 8 and p.dims["height"].max == 32
    assert p.dims["tokens"] == DimRange("tokens", 7, 7, 7)
    assert "tokens" not in auto_profile({"sample_size": 8}).dims  # unconditional: no tokens


@pytest.mark.parametrize("facts,family", [
    (SD15_FACTS, "sd15"),
    ({**SD15_FACTS, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "sdxl"),
    ({**SD15_FACTS, "cross_attention_dim": 1024}, "sd-turbo"),
    (DIGITS_FACTS, "digits"),
    ({**SD15_FACTS, "in_channels": 9}, None),  # inpainting UNet: no shipped profile
])
def test_infer_family(facts, family):
    assert infer_family(facts) == family


def test_sampler_specs():
    assert parse_sampler_spec("onestep") == ("onestep", None)
    assert parse_sampler_spec("lcm4") == ("lcm", 4)
    assert parse_sampler_spec("LCM:4") == ("lcm", 4)
    assert parse_sampler_spec("dpmpp_2m") == ("dpmpp_2m", None)
    assert parse_sampler_spec("dpmpp_2m:8") == ("dpmpp_2m", 8)
    assert parse_sampler_spec("onestep_euler_a1") == ("onestep_euler_a", 1)
    for bad in ("warp9", "lcm:x", "lcm0", ""):
        with pytest.raises(InvalidInput, match="--sampler"):
            parse_sampler_spec(bad)


# A profile file's text, and the error it must raise.
BAD_PROFILES = {
    "not-toml": ("name = 'x'\n[dims\n", "not valid TOML"),
    "unknown-key": ("name = 'x'\ncolour = 'red'\n", "unknown keys"),
    "old-opset": ("name = 'x'\nopset = 13\n", ">= 18"),
    "opt-below-min": ("name = 'x'\n[dims]\nbatch = { min = 4, opt = 2, max = 8 }\n", "min <= opt <= max"),
}


@pytest.mark.parametrize("text, error", BAD_PROFILES.values(), ids=BAD_PROFILES.keys())
def test_bad_profile_file(tmp_path, text, error):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(InvalidInput, match=error):
        load_profile(bad)


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(InvalidInput, match="unknown export profile 'nope'.*digits"):
        load_profile("nope")


def test_profile_dir_env(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text("name = 'mine'\nfamily = 'x'\n[dims]\nbatch = [1, 2, 4]\nheight = 8\n")
    monkeypatch.setenv("FASTDIFF_PROFILE_DIR", str(tmp_path))
    p = load_profile("mine")
    assert p.dims["batch"] == DimRange("batch", 1, 2, 4) and p.dims["height"].static


@pytest.fixture
def tiny_folder(tmp_path):
    """A saved random LabelConditionedUNet folder (fastdiff format), so the CLI has a model that always exists."""
    from fastdiff.models import save
    from tests.export.tiny_models import tiny_label_model

    return save(tiny_label_model(), tmp_path / "tiny")


def test_cli_errors_before_any_export(capsys, tmp_path, tiny_folder):
    from fastdiff.export.__main__ import main

    out = tmp_path / "out"
    assert main(["--list-profiles"]) == 0
    assert "sd15" in capsys.readouterr().out
    assert main([str(tiny_folder), "--out", str(out), "--batch", "1:2:100"]) == 2
    err = capsys.readouterr().err
    assert "batch=100" in err and "[1, 8]" in err
    assert main([str(tiny_folder), "--out", str(out), "--profile", "sd15"]) == 2
    assert "does not match export profile 'sd15'" in capsys.readouterr().err
    assert main(["no-such-model", "--out", str(out)]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["x.onnx", "--format", "onnx", "--out", str(out)]) == 1
    assert not out.exists()  # nothing was written by any of them


def test_cli_tensorrt_unavailable_fails_before_export(capsys, tmp_path, tiny_folder):
    from fastdiff.errors import BackendUnavailable
    from fastdiff.export.__main__ import main
    from fastdiff.exported.engine import import_trt

    try:
        import_trt()
        pytest.skip("tensorrt is importable here; this checks the message where it is not")
    except BackendUnavailable:
        pass
    out = tmp_path / "out"
    assert main([str(tiny_folder), "--format", "tensorrt", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "backend 'tensorrt' cannot run here" in err and "not importable" in err
    assert not out.exists()  # failed before the (long) ONNX export
