"""Small random-weight models shared by the export / onnxruntime tests (no tests in this file).

Export time is dominated by the number of graph ops, not weights, so these keep the block structure small.
"""

from __future__ import annotations

import pytest
import torch


def tiny_unet(in_channels: int = 1, cross_attention_dim: int = 8, sample_size: int = 8, seed: int = 0):
    """A 2-block UNet2DConditionModel (one cross-attention block), ~50k parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=4,
    ).eval()


def tiny_label_model(name: str = "tiny", seed: int = 0, scheduler_config: dict | None = None):
    """A random LabelConditionedUNet (10 classes, 1 token) with the digits teacher's noise schedule."""
    from fastdiff.models.label_unet import LabelConditionedUNet

    cfg = scheduler_config or {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                               "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
    model = LabelConditionedUNet(tiny_unet(seed=seed), num_classes=10, tokens=1, scheduler_config=cfg, name=name)
    torch.manual_seed(seed + 1)
    torch.nn.init.normal_(model.label_embedding.weight)
    return model.eval().requires_grad_(False)


def sd15_like_unet(seed: int = 0):
    """A random UNet2DConditionModel with SD 1.5's block layout (3 cross-attention down blocks + 1 plain, cross-
    attention mid block, mirrored up blocks), scaled down: 1 layer per block, widths 32-64, text width 32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def sdxl_like_unet(seed: int = 0):
    """A tiny UNet2DConditionModel with SDXL's added conditioning (``text_embeds`` 12 wide, 6 ``time_ids``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 12,
    ).eval()


def load_embedded(name: str):
    """An embedded model, or skip with the reason when its weights are not there yet."""
    from fastdiff.errors import ModelNotFound

    try:
        from fastdiff.models import load
    except ImportError as e:  # pragma: no cover - fastdiff.models is being written in parallel
        pytest.skip(f"fastdiff.models is not importable yet: {e}")
    try:
        return load(name)
    except ModelNotFound as e:
        pytest.skip(f"embedded model {name!r} is not available: {str(e)[:200]}")


def digits_model():
    """The embedded digits teacher; while its weights are absent (being retrained), the same architecture and label
    conditioning freshly initialised - what the export and backend tests exercise is the architecture."""
    from fastdiff.errors import ModelNotFound

    try:
        from fastdiff.models import load

        return load("digits")
    except ModelNotFound:
        from fastdiff.models.digits import build_model

        return build_model(seed=0).eval().requires_grad_(False)


class TinyConv(torch.nn.Module):
    """``(sample (B, 1, H, W), timestep (B,)) -> conv(sample) * t``: a graph that exports in a second or two."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)  # > 256 bytes: stored as external data when asked
        self.out = torch.nn.Conv2d(16, 1, 1)

    def forward(self, *args):
        x, t = args
        return self.out(self.conv(x)) * t.view(-1, 1, 1, 1)


def tiny_graph(reference=None, **kw):
    """A :class:`~fastdiff.export.onnx.GraphExport` of :class:`TinyConv` with full fastdiff metadata
    (batch 1..4, height / width 4..16)."""
    import json

    from fastdiff.export.onnx import GraphExport
    from fastdiff.export.profiles import ExportProfile
    from fastdiff.exported.specs import DimRange, TensorSpec

    module = TinyConv().eval()
    inputs = [TensorSpec("sample", "float32", ("batch", 1, "height", "width")),
              TensorSpec("timestep", "float32", ("batch",))]
    outputs = [TensorSpec("out_sample", "float32", ("batch", 1, "height", "width"))]
    dims = {"batch": DimRange("batch", 1, 2, 4), "height": DimRange("height", 4, 8, 16),
            "width": DimRange("width", 4, 8, 16)}
    profile = ExportProfile(name="tiny", family="tiny", dims=dims, tensorrt={"workspace_mb": 64})
    meta = {"fastdiff.kind": "unet", "fastdiff.model": "tiny", "fastdiff.profile": profile.to_json(),
            "fastdiff.inputs": json.dumps([s.to_dict() for s in inputs]),
            "fastdiff.outputs": json.dumps([s.to_dict() for s in outputs]),
            "fastdiff.dims": json.dumps({k: v.as_list() for k, v in dims.items()}),
            "fastdiff.model_config": json.dumps({"in_channels": 1, "out_channels": 1})}
    return GraphExport("tiny", "unet", module, reference or (lambda a: module(*a)), inputs, outputs, dims, "fp32",
                       18, meta, **kw)


#: a tiny CLIPTextModel for the shapes pipeline (the shipped tokenizer's 24 positions)
TINY_SHAPES_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "projection_dim": 16, "max_position_embeddings": 24}


def tiny_shapes_unet3_config() -> dict:
    """The shipped three-block layout (latents 16x16 down to a 4x4 mid block) at 8 / 16 / 16 channels."""
    from fastdiff.models.shapes import pipeline as P

    return {**P.UNET_CONFIG, "block_out_channels": [8, 16, 16], "norm_num_groups": 4, "attention_head_dim": 4,
            "cross_attention_dim": TINY_SHAPES_TEXT["hidden_size"]}


def tiny_shapes_unet_config() -> dict:
    """The smallest shapes UNet the tests use: one cross-attention block of 8 channels over the shipped layout."""
    from fastdiff.models.shapes import pipeline as P

    return {**P.UNET_CONFIG, "block_out_channels": [8], "norm_num_groups": 4, "attention_head_dim": 4,
            "cross_attention_dim": 16, "down_block_types": ["CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D"]}


def tiny_shapes_pipeline(directory, unet_config: dict, text_config: dict | None = None):
    """Write a randomly initialised shapes pipeline folder (``unet_config``'s UNet, a tiny text encoder, the shipped
    VAE and tokenizer) with the trainer's own ``save_components``; returns the folder."""
    from fastdiff.models.shapes import pipeline as P

    unet, te = P.build_unet(1, unet_config), P.build_text_encoder(2, text_config or TINY_SHAPES_TEXT)
    with torch.no_grad():  # a freshly built UNet's output conv is zero: make the output depend on the input
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.1)
    P.save_components(unet, te, directory, {"command": "test"})
    return directory
