"""Whole-sampler graphs: the unrolled loop equals ``fastdiff.sample`` (eager, for many schedulers), and its ONNX
export run by onnxruntime reproduces ``fastdiff.sample`` with the same noise."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import fastdiff
from fastdiff.errors import ExportError
from fastdiff.export import export_onnx
from fastdiff.export.source import resolve_model
from fastdiff.export.unrolled import UnrolledSampler, make_plan
from fastdiff.schedulers import get_scheduler
from tests.export.tiny_models import load_embedded, tiny_label_model, tiny_unet
from tests.tolerances import rel_err

pytest.importorskip("onnxruntime")
LABELS = torch.tensor([3, 1, 4])
SHAPE = (3, 1, 8, 8)


def _sampler_inputs(u: UnrolledSampler, noise, cond: list, g: float, gen) -> list[torch.Tensor]:
    args = [noise, *cond]
    if u.cfg:
        args.append(torch.tensor([g]))
    if u.noise_steps:
        args.append(torch.stack([randn_tensor(tuple(noise.shape), generator=gen) for _ in u.noise_steps]))
    return args


@pytest.mark.parametrize("spec,g", [
    ("onestep", 1.0), ("onestep", 4.0), ("lcm:3", 2.5), ("dpmpp_2m:4", 3.0), ("unipc:3", 2.0),
    ("euler_a:3", 2.0), ("ddim:3", 3.0), ("euler:2", 1.0), ("ddpm:2", 2.0),
])
def test_unrolled_loop_equals_sampler(spec, g):
    """Eager: same noise (drawn in the sampler's order from one generator) -> the same final sample."""
    model = tiny_label_model()
    source = resolve_model(model)
    plan, _ = make_plan(source, spec)
    sched = get_scheduler(spec.split(":")[0], config=model.scheduler_config)
    want = fastdiff.sample(model, scheduler=sched, num_inference_steps=plan.num_steps, guidance_scale=g,
                           class_labels=LABELS, generator=torch.Generator().manual_seed(7), output_type="latent",
                           progress=False, backend="torch")
    u = UnrolledSampler(model.unet, plan, g > 1.0, model, source.facts)
    gen = torch.Generator().manual_seed(7)
    noise = randn_tensor(SHAPE, generator=gen)
    with torch.no_grad():
        got = u(*_sampler_inputs(u, noise, [LABELS], g, gen))
    assert rel_err(got, want) < 1e-5, spec


def test_unrolled_with_text_embeddings_and_negative():
    unet = tiny_unet()
    plan = get_scheduler("lcm").plan(2)
    ehs, neg = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    want = fastdiff.sample(unet, scheduler="lcm", num_inference_steps=2, guidance_scale=3.0,
                           encoder_hidden_states=ehs, negative_encoder_hidden_states=neg,
                           generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
                           backend="torch")
    u = UnrolledSampler(unet, plan, True, None, {"cross_attention_dim": 8})
    assert u.input_names == ["noise", "encoder_hidden_states", "negative_encoder_hidden_states", "guidance_scale",
                             "step_noise"]
    gen = torch.Generator().manual_seed(0)
    noise = randn_tensor(SHAPE, generator=gen)
    with torch.no_grad():
        got = u(*_sampler_inputs(u, noise, [ehs, neg], 3.0, gen))
    assert rel_err(got, want) < 1e-5


def test_unsupported_plans_are_refused():
    model = tiny_label_model()
    plan = get_scheduler("ddim", thresholding=True).plan(2)
    with pytest.raises(ExportError, match="dynamic thresholding"):
        UnrolledSampler(model.unet, plan, False, model)
    sdxl_like = {"cross_attention_dim": 8, "addition_embed_type": "text_time"}
    with pytest.raises(ExportError, match="SDXL added conditioning"):
        UnrolledSampler(model.unet, get_scheduler("onestep").plan(1), False, None, sdxl_like)


def _check_onnx_sampler(model, out_dir, spec, g, steps=None):
    """Export the whole loop, run it with onnxruntime, compare with fastdiff.sample (same generator)."""
    from fastdiff.backends.onnxruntime import OnnxSampler

    report = export_onnx(model, out_dir, sampler=spec, steps=steps, guidance_scale=g, batch="1:2:8", progress=False)
    assert report.kind == "sampler" and all(p.ok for p in report.parity)
    path = report.files[-1][0]
    meta = json.loads({p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}[
        "fastdiff.sampler"])
    runner = OnnxSampler(path)
    size = model.unet.config.sample_size
    shape = (3, model.unet.config.in_channels, size, size)
    sched = get_scheduler(meta["scheduler"], config=model.scheduler_config)
    want = fastdiff.sample(model, scheduler=sched, num_inference_steps=meta["steps"], guidance_scale=g,
                           class_labels=LABELS, generator=torch.Generator().manual_seed(3), output_type="latent",
                           progress=False, backend="torch")
    gen = torch.Generator().manual_seed(3)
    got = runner(randn_tensor(shape, generator=gen), class_labels=LABELS, guidance_scale=g, generator=gen)
    return got, want, meta


def test_onestep_graph_reproduces_sample(tmp_path):
    """Acceptance: the unrolled one-step graph (digits-onestep when present) equals fastdiff.sample."""
    try:
        model = load_embedded("digits-onestep")
    except pytest.skip.Exception:
        model = tiny_label_model(name="tiny-student",
                                 scheduler_config={"num_train_timesteps": 1000, "prediction_type": "sample"})
    g = float(getattr(model, "defaults", {}).get("guidance_scale", 1.0))
    got, want, meta = _check_onnx_sampler(model, tmp_path, "onestep", g)
    assert meta["steps"] == 1 and meta["scheduler"] == "onestep"
    assert rel_err(got, want) < 1e-4


def test_few_step_cfg_graph_with_step_noise(tmp_path):
    """LCM, 2 steps, CFG inside the graph and fresh noise between steps as an input."""
    model = tiny_label_model()
    got, want, meta = _check_onnx_sampler(model, tmp_path, "lcm2", 2.5)
    assert meta["cfg"] and meta["noise_steps"] == [0]
    assert rel_err(got, want) < 1e-4
