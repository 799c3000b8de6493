"""Model backends on CPU: the digits sampler with the UNet in onnxruntime vs PyTorch eager, and the unrolled one-step
graph (one onnxruntime call) vs the Python sampling loop.

Run: ``OMP_NUM_THREADS=1 pytest benches/bench_onnx.py --benchmark-only`` (``FASTDIFF_BENCH_SAVE=1`` writes the ratio
table to ``benches/results/``). Both providers use the same number of threads (onnxruntime's intra-op pool is sized
from ``torch.get_num_threads()``). The exports happen once per session, before timing, into a temporary cache.

Suites (ratio = the table's "onnxruntime/torch" etc.: < 1 means the ONNX path is faster):
- ``sampler``: ``Sampler(model, backend=...)``, 10 images x CFG (model batch 20), DPM-Solver++ 2M, 10 steps.
- ``onestep``: 10 images, one step, no CFG: ``Sampler(scheduler="onestep")`` with the torch / onnxruntime UNet,
  vs the whole loop exported as one graph (:class:`fastdiff.backends.onnxruntime.OnnxSampler`).
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import fastdiff
from benches.helpers import digits_model

pytest.importorskip("onnxruntime")

IMAGES, STEPS, G = 10, 10, 3.0
LABELS = torch.arange(IMAGES) % 10


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """Model, samplers per provider and the one-step graph, all exported before any timing."""
    from fastdiff.backends.onnxruntime import OnnxSampler
    from fastdiff.export import export_onnx
    from fastdiff.schedulers import get_scheduler

    cache = tmp_path_factory.mktemp("bench-cache")
    old = os.environ.get("FASTDIFF_CACHE_DIR")
    os.environ["FASTDIFF_CACHE_DIR"] = str(cache)
    try:
        model = digits_model()
        samplers = {b: fastdiff.Sampler(model, scheduler="dpmpp_2m", backend=b) for b in ("torch", "onnxruntime")}
        one = get_scheduler("onestep", config=model.scheduler_config)  # the plan the graph export unrolls
        onestep = {b: fastdiff.Sampler(model, scheduler=one, backend=b) for b in ("torch", "onnxruntime")}
        report = export_onnx(model, cache / "graph", sampler="onestep", guidance_scale=1.0, progress=False)
        graph = OnnxSampler(report.files[-1][0])
    finally:
        if old is None:
            os.environ.pop("FASTDIFF_CACHE_DIR", None)
        else:
            os.environ["FASTDIFF_CACHE_DIR"] = old
    return model, samplers, onestep, graph


def _run(sampler, steps, g):
    return sampler.sample(num_inference_steps=steps, guidance_scale=g, class_labels=LABELS, output_type="latent",
                          generator=torch.Generator().manual_seed(0), progress=False)


@pytest.mark.parametrize("provider", ["torch", "onnxruntime"])
def test_sampler(benchmark, record, setup, provider):
    _, samplers, _, _ = setup
    s = samplers[provider]
    benchmark.pedantic(lambda: _run(s, STEPS, G), rounds=5, iterations=1, warmup_rounds=1)
    record("sampler", f"digits {IMAGES} img CFG {STEPS} steps", provider, benchmark,
           threads=torch.get_num_threads(), model_batch=2 * IMAGES)


@pytest.mark.parametrize("provider", ["loop-torch", "loop-onnxruntime", "graph-onnxruntime"])
def test_onestep(benchmark, record, setup, provider):
    model, _, onestep, graph = setup
    if provider == "graph-onnxruntime":
        def run():
            gen = torch.Generator().manual_seed(0)
            return graph(randn_tensor((IMAGES, 1, 16, 16), generator=gen), class_labels=LABELS)
    else:
        s = onestep[provider.split("-", 1)[1]]

        def run():
            return _run(s, 1, 1.0)

    benchmark.pedantic(run, rounds=40, iterations=1, warmup_rounds=3)
    record("onestep", f"digits {IMAGES} img 1 step", provider, benchmark, threads=torch.get_num_threads())
