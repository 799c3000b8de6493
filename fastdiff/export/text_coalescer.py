"""ONNX export of a text coalescer (``shapes-coalescer``): prompt token ids and noise to image, one graph.

``python -m fastdiff.export shapes-coalescer --format onnx --out out/shapes-coalescer [--steps 2]
[--guidance-scale G]`` writes ``model.onnx`` with inputs ``input_ids (B, 24)`` int64 (the shipped tokenizer's ids,
padded to 24 as the pipeline pads) and ``noise (B, 4, 16, 16)`` float32 (unit normal), output ``image (B, 3, 64,
64)`` in [0, 1]: the frozen text encoder's pooled embedding, 1 or 2 guided coalescer steps and the VAE decoder, the
whole sampler of :func:`fastdiff.models.text_coalescer.sample_images`. It is then checked with onnxruntime against
that PyTorch sampler on fresh random noise and real prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff._atomic import check_writable
from fastdiff.errors import BackendUnavailable, ExportError
from fastdiff.export.coalescer import write_sampler_graph
from fastdiff.models.coalescer_net import check_steps, coalesce_step

#: max |onnx - torch| / max |torch| accepted (fp32; the same math in another runtime, through a VAE decoder)
PARITY_RTOL = 1e-3
#: the prompts of the parity check (from the judge's grammar; tokenized by the shipped tokenizer)
PARITY_PROMPTS = ("a red circle left of a blue square", "a small green triangle at the top", "",
                  "a large yellow square above a magenta circle")


class TextCoalescerSampler(nn.Module):
    """``(input_ids, noise) -> image``: pooled text embedding, ``steps`` coalescer steps from ``prior_scale *
    noise`` (CFG with the empty prompt's embedding when ``g != 1``), VAE decode to [0, 1]."""

    def __init__(self, model, text_encoder, vae, steps: int, guidance: float):
        super().__init__()
        self.model, self.text_encoder, self.vae = model, text_encoder, vae
        self.steps, self.guidance = check_steps(model, steps), float(guidance)
        self.scale = float(vae.config.scaling_factor)

    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        m = self.model
        de = self.text_encoder(input_ids).pooler_output
        null = m.null_embedding.expand(de.shape[0], -1)
        x = noise * m.unet.config.prior_scale
        for _ in range(self.steps):
            t_c = coalesce_step(x, *m.unet.heads(x, de))
            if self.guidance == 1.0:
                x = t_c
            else:
                t_u = coalesce_step(x, *m.unet.heads(x, null))
                x = t_u + self.guidance * (t_c - t_u)
        image = self.vae.decode(x / self.scale).sample
        return ((image + 1) / 2).clamp(0, 1)


@dataclass
class TextCoalescerExport:
    path: Path
    steps: int
    guidance: float
    parity_rel_err: float | None

    def summary(self) -> str:
        parity = "skipped" if self.parity_rel_err is None else f"max rel err {self.parity_rel_err:.2e}"
        return (f"wrote {self.path} (text coalescer sampler: token ids + noise -> image, {self.steps} step(s), "
                f"CFG {self.guidance:g}); onnxruntime parity: {parity}")


def export_text_coalescer(model, out_dir, steps: int | None = None, guidance: float | None = None,
                          parity: bool = True, tol: float | None = None,
                          opset: int | None = None) -> TextCoalescerExport:
    """Export ``model`` (name, folder or loaded text coalescer) to ``out_dir/model.onnx`` and check parity."""
    from fastdiff.models.text_coalescer import encoder, load

    m = load(model)
    out = Path(out_dir)
    check_writable(out, "dir", what="--out")
    steps = int(steps if steps is not None else m.defaults.get("num_inference_steps", 1))
    guidance = float(guidance if guidance is not None else m.defaults.get("guidance_scale", 1.0))
    enc = encoder()
    graph = TextCoalescerSampler(m.float().eval(), enc.text_encoder, enc.vae, steps, guidance).eval()
    ids = _ids(enc, PARITY_PROMPTS[:2])
    example = (ids, torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0)))
    path = write_sampler_graph(graph, example, ["input_ids", "noise"], out, "text coalescer sampler", {
        "kind": "text_coalescer_sampler", "model": m.name, "steps": steps, "guidance_scale": guidance,
        "prior_scale": m.unet.config.prior_scale,
        "tokenizer": "fastdiff/models/weights/shapes-tokenizer (padding to 24, truncation)"},
        opset=opset, max_batch=4096)
    err = parity_error(path, graph, enc) if parity else None
    if err is not None and err > (tol or PARITY_RTOL):
        raise ExportError(f"onnxruntime output differs from PyTorch: max rel err {err:.2e} > {tol or PARITY_RTOL:g}")
    return TextCoalescerExport(path, steps, guidance, err)


def _ids(enc, prompts) -> torch.Tensor:
    tok = enc.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def parity_error(path: Path, graph: TextCoalescerSampler, enc, seed: int = 1) -> float:
    """max |onnxruntime - torch| / max |torch| on the parity prompts and fresh random noise."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable("the parity check needs onnxruntime (pip install fastdiff[export])") from e
    ids = _ids(enc, PARITY_PROMPTS)
    noise = torch.randn((ids.shape[0], 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = graph(ids, noise)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["image"], {"input_ids": ids.numpy(), "noise": noise.numpy()})[0])
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
