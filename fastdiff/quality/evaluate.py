"""Quality of a model + sampler setting, measured: conditional accuracy, Fréchet distance, sampling time.

``evaluate`` draws ``num_per_class`` samples of every digit from fixed per-sample seeds, asks the judge
(:mod:`fastdiff.quality.classifier`) whether each shows the requested digit, and computes the Fréchet distance
between the samples' and all 1,797 real digits' judge features. ``sweep`` repeats it over schedulers x step counts.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from fastdiff._checks import check_int
from fastdiff.models import digits
from fastdiff.models.generate import balanced_labels, generate, make_noise, make_sampler, stream_seed
from fastdiff.quality.classifier import predict, train_classifier
from fastdiff.quality.frechet import frechet_distance


@dataclass
class EvalResult:
    """One measurement. ``sample_s``: wall time of sampling all ``n`` images (after a warm-up call)."""

    model: str
    scheduler: str
    steps: int
    guidance: float
    n: int
    accuracy: float
    fd: float
    sample_s: float
    ms_per_image: float
    per_class_accuracy: list[float] = field(default_factory=list)
    classifier_accuracy: float = 0.0
    fd_real_floor: float = 0.0
    device: str = ""
    # network rows evaluated per image in the timed run, counted (see count_network_rows): a CFG batch is 2 per
    # image per step, folded guidance 1; ``method`` / ``mean_steps`` / ``train_wall_s`` label rows of ``compare``
    calls_per_image: float | None = None
    method: str = ""
    mean_steps: float | None = None
    train_wall_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class NetworkRowCounter:
    """Rows (images) the network evaluated while installed; ``calls`` counts invocations."""

    def __init__(self):
        self.rows = 0
        self.calls = 0


@contextmanager
def count_network_rows(model):
    """Count the rows the network of ``model`` (a loaded model: ``model.unet``) evaluates inside the block.

    Wraps, on the instance, the method that does the network's work: ``heads`` for a coalescer network (its
    ``forward`` calls ``heads``, so it is counted once either way), else ``forward`` (what ``nn.Module.__call__``
    runs). The first argument (or ``sample=``) is the batch; its length is the rows evaluated, so a CFG batch of
    ``2B`` counts 2 per image."""
    net = getattr(model, "unet", model)
    name = "heads" if callable(getattr(net, "heads", None)) else "forward"
    counter = NetworkRowCounter()
    original = getattr(net, name)
    own = net.__dict__.get(name)  # an instance-level override already there (a hook) is put back afterwards

    def counted(*args, **kwargs):
        batch = args[0] if args else kwargs.get("sample")
        counter.rows += int(batch.shape[0])
        counter.calls += 1
        return original(*args, **kwargs)

    setattr(net, name, counted)
    try:
        yield counter
    finally:
        if own is None:
            delattr(net, name)  # the class's method shows through again
        else:
            setattr(net, name, own)


def machine_description(device: torch.device | str | None = None) -> str:
    """``"cpu: <processor>, N cores, T torch threads"`` or the CUDA device name."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    import os

    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            proc = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), proc)
    except OSError:
        pass
    return f"cpu: {proc}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def real_features(seed: int = 0) -> tuple[torch.Tensor, float]:
    """Judge features of all real digits ``(1797, 64)`` and the real-vs-real floor of the FD (two random halves)."""
    clf, _ = train_classifier(seed)
    x, _ = digits.load_digits_tensors()
    _, f = predict(clf, x)
    perm = torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(seed))
    half = f.shape[0] // 2
    return f, frechet_distance(f[perm[:half]], f[perm[half:]])


def score(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Accuracy, per-class accuracy and FD of samples ``images (N, 1, H, W)`` in [-1, 1] asked to show ``labels``."""
    clf, clf_acc = train_classifier(seed)
    pred, feats = predict(clf, images.clamp(-1, 1))
    ok = (pred == labels).float()
    per_class = [float(ok[labels == k].mean()) if bool((labels == k).any()) else float("nan")
                 for k in range(digits.NUM_CLASSES)]
    real, floor = real_features(seed)
    return {"accuracy": float(ok.mean()), "per_class_accuracy": per_class, "fd": frechet_distance(feats, real),
            "classifier_accuracy": clf_acc, "fd_real_floor": floor}


def evaluate(model="digits", scheduler=None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, num_per_class: int = 100, seed: int = 0, backend: str = "auto",
             device=None, batch_size: int = 500, progress: bool = False, compile: bool = False) -> EvalResult:
    """Measure one setting. ``None`` for scheduler / steps / guidance takes the model's defaults.

    Images: ``num_per_class * 10``, sample ``i`` asks for digit ``i % 10`` from noise seeded by
    ``(stream_seed(seed, "eval"), i)`` -- never the noise distillation triplets were made from.
    ``compile``: ``Sampler(..., compile=True)``; the warm-up then runs a full batch, so that compilation (once per
    batch shape) is not sampling time.
    """
    from fastdiff.models import load

    m = load(model) if isinstance(model, str) else model
    d = getattr(m, "defaults", {}) or {}
    # ``None`` means the model's default; 0 is an error, not "the default" (it used to run 20 steps labelled 0)
    steps = (int(d.get("num_inference_steps", 20)) if num_inference_steps is None
             else check_int("num_inference_steps", num_inference_steps, minimum=1))
    g = float(guidance_scale if guidance_scale is not None else d.get("guidance_scale", 1.0))
    sampler = make_sampler(m, scheduler=scheduler, backend=backend, device=device, compile=compile)
    n = num_per_class * m.num_classes
    idx = torch.arange(n)
    labels = balanced_labels(idx, m.num_classes)
    size = m.unet.config.sample_size
    noise = make_noise(stream_seed(seed, "eval"), idx, (m.unet.config.in_channels, size, size))
    warm = min(batch_size, n) if compile else 2
    generate(sampler, labels[:warm], noise[:warm], steps, g)  # warm-up: one-time costs are not sampling time
    if sampler.device.type == "cuda":
        torch.cuda.synchronize(sampler.device)
    # per-step noise of stochastic samplers (lcm, euler_a) from a seeded stream too: the same command, the same score
    step_noise = torch.Generator().manual_seed(stream_seed(seed, "eval-steps"))
    with count_network_rows(m) as counter:
        t0 = time.perf_counter()
        images = generate(sampler, labels, noise, steps, g, batch_size=batch_size, generator=step_noise)
        dt = time.perf_counter() - t0
    s = score(images, labels, seed)
    sched_name = scheduler if isinstance(scheduler, str) else (getattr(sampler.scheduler, "name", None) or "default")
    return EvalResult(model=str(getattr(m, "name", model)), scheduler=sched_name, steps=steps, guidance=g, n=n,
                      sample_s=dt, ms_per_image=1000 * dt / n, device=machine_description(sampler.device),
                      calls_per_image=counter.rows / n, **s)


def format_table(results: list[EvalResult]) -> str:
    """A Markdown table of results."""
    head = ("| model | scheduler | steps | CFG | accuracy | FD | sampling time (s) | ms / image |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {r.model} | {r.scheduler} | {r.steps} | {r.guidance:g} | {100 * r.accuracy:.1f}% | {r.fd:.1f} | "
            f"{r.sample_s:.2f} | {r.ms_per_image:.2f} |" for r in results]
    return "\n".join([head, *rows])
