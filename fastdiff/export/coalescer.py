"""ONNX export of a coalescer model: the whole 1- or 2-step sampler (guidance included) as one graph.

``python -m fastdiff.export digits-coalescer --format onnx --out out/coalescer [--steps 2] [--guidance-scale 1.5]``
writes ``model.onnx`` with inputs ``noise (B, C, H, W)`` float32 (unit normal) and ``labels (B,)`` int64, output
``image (B, C, H, W)``, then checks it with onnxruntime against the PyTorch sampler
(:func:`fastdiff.distill.coalescer.generate`) on fresh random inputs. The network is a small MLP, so the graph is
the same at every batch size (batch is dynamic).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdiff._atomic import atomic_write_bytes, atomic_write_text, check_writable
from fastdiff.errors import BackendUnavailable, ExportError
from fastdiff.models.coalescer_net import FORMAT, CoalescerModel, check_steps, coalesce_step

#: max |onnx - torch| / max |torch| accepted (fp32; the graph is the same math in another runtime)
PARITY_RTOL = 1e-4


def is_coalescer(model) -> bool:
    """Whether ``model`` (a name, folder or object) is a coalescer model."""
    if isinstance(model, CoalescerModel):
        return True
    from fastdiff.errors import FastDiffError
    from fastdiff.models.registry import read_config

    try:
        return read_config(model).get("format") == FORMAT
    except (FastDiffError, TypeError):
        return False


class CoalescerSampler(nn.Module):
    """``(noise, labels) -> image``: ``steps`` coalescer steps from ``prior_scale * noise``, CFG when ``g != 1``."""

    def __init__(self, model: CoalescerModel, steps: int, guidance: float):
        super().__init__()
        self.model, self.steps, self.guidance = model, check_steps(model, steps), float(guidance)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = noise * m.unet.config.prior_scale
        emb_c = m.label_embedding(labels)
        emb_u = m.label_embedding(torch.full_like(labels, m.null_label))
        for _ in range(self.steps):
            t_c = coalesce_step(x, *m.unet.heads(x, emb_c))
            if self.guidance == 1.0:
                x = t_c
            else:
                t_u = coalesce_step(x, *m.unet.heads(x, emb_u))
                x = t_u + self.guidance * (t_c - t_u)
        return x


@dataclass
class CoalescerExport:
    path: Path
    steps: int
    guidance: float
    parity_rel_err: float | None

    def summary(self) -> str:
        parity = "skipped" if self.parity_rel_err is None else f"max rel err {self.parity_rel_err:.2e}"
        return (f"wrote {self.path} (coalescer sampler, {self.steps} step(s), CFG {self.guidance:g}); "
                f"onnxruntime parity: {parity}")


def export_coalescer(model, out_dir, steps: int | None = None, guidance: float | None = None, parity: bool = True,
                     tol: float | None = None, opset: int | None = None) -> CoalescerExport:
    """Export ``model`` (name, folder or :class:`CoalescerModel`) to ``out_dir/model.onnx`` and check parity."""
    from fastdiff.models import load

    m = load(model) if not isinstance(model, CoalescerModel) else model
    m = m.float().eval()
    steps = int(steps if steps is not None else m.defaults.get("num_inference_steps", 1))
    guidance = float(guidance if guidance is not None else m.defaults.get("guidance_scale", 1.0))
    out = Path(out_dir)
    check_writable(out, "dir", what="--out")
    graph = CoalescerSampler(m, steps, guidance).eval()
    cfg = m.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    g = torch.Generator().manual_seed(0)
    example = (torch.randn((2, *shape), generator=g), torch.arange(2) % m.num_classes)
    path = write_sampler_graph(graph, example, ["noise", "labels"], out, "coalescer sampler", {
        "kind": "coalescer_sampler", "model": m.name, "steps": steps, "guidance_scale": guidance,
        "prior_scale": cfg.prior_scale}, opset=opset, max_batch=65536)
    err = parity_error(path, graph, shape, m.num_classes) if parity else None
    if err is not None and err > (tol or PARITY_RTOL):
        raise ExportError(f"onnxruntime output differs from PyTorch: max rel err {err:.2e} > {tol or PARITY_RTOL:g}")
    return CoalescerExport(path, steps, guidance, err)


def write_sampler_graph(graph: torch.nn.Module, example: tuple, input_names: list[str], out: Path, what: str,
                        description: dict, opset: int | None = None, max_batch: int = 65536) -> Path:
    """Export ``graph`` (inputs batch-dynamic along dim 0, one output ``image``) to ``out/model.onnx`` and its
    ``description`` (+ inputs / outputs) to ``out/export.json``, each atomically; :class:`ExportError` when the
    exporter fails. Returns the model's path."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the inputs share the batch dimension on purpose; the exporter says so in a UserWarning
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            prog = torch.onnx.export(graph, example, dynamo=True, opset_version=opset or 18, verbose=False,
                                     input_names=input_names, output_names=["image"],
                                     dynamic_shapes={name: {0: batch} for name in input_names})
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed for the {what}: {type(e).__name__}: {str(e)[:1000]}") from e
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    atomic_write_bytes(path, prog.model_proto.SerializeToString())
    atomic_write_text(out / "export.json", json.dumps({**description, "inputs": input_names,
                                                       "outputs": ["image"]}) + "\n")
    return path


def parity_error(path: Path, graph: CoalescerSampler, shape, num_classes: int, batch: int = 16,
                 seed: int = 1) -> float:
    """max |onnxruntime - torch| / max |torch| on fresh random noise and labels."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable("the parity check needs onnxruntime (pip install fastdiff[export])") from e
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *shape), generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    with torch.no_grad():
        want = graph(noise, labels)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["image"], {"noise": noise.numpy(), "labels": labels.numpy()})[0])
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
