"""``python -m fastdiff sample``: draw pictures of prompts with the embedded text-to-image ``shapes`` pipeline (the
default), or digits with an embedded (or any label-conditioned) model, and write a PNG grid.

Defaults: the ``shapes`` model with its own sampler settings (DPM-Solver++ 20 steps, CFG 5), five example prompts,
two images each, seed 0, into ``shapes.png``. ``--prompt "a red circle left of a blue square" [--prompt ...]``: one
column per prompt (the prompt written above it), ``--num-per-prompt`` rows; image ``j`` of the ``i``-th prompt
starts from noise seeded by ``(stream_seed(seed, "sample"), i * 10000 + j)``, so a prompt's pictures do not depend
on the other prompts, and the same seed gives the same PNG.

``--model digits`` (also implied by ``--labels`` / ``--num-per-label``): the digits teacher (DPM-Solver++ 20 steps,
CFG 1.5), every digit, into ``digits.png``; image ``j`` of label ``k`` starts from the noise of index
``k * 10000 + j`` in the same stream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastdiff._atomic import check_writable
from fastdiff._checks import cli_int, cli_number
from fastdiff.cli import add_compile_argument, add_device_argument, resolve_device
from fastdiff.errors import InvalidInput
from fastdiff.images import save_image
from fastdiff.sample_inputs import preview

DEFAULT_OUTPUT = "digits.png"
DEFAULT_PROMPT_OUTPUT = "shapes.png"
#: the model ``sample`` draws without ``--model`` (``DIGITS_MODEL`` when a digits-only option is given)
DEFAULT_MODEL = "shapes"
DIGITS_MODEL = "digits"
#: the prompts drawn by ``sample --model shapes`` without ``--prompt``
DEFAULT_PROMPTS = ("a red circle", "a blue square on the left", "a yellow triangle at the top",
                   "a red circle left of a blue square", "a green square above a magenta circle")
#: the largest grid cell: beyond it the PNG grows to gigabytes for no gain (the models draw 16x16).
MAX_CELL = 1024


def parse_labels(text: str | None, num_classes: int) -> list[int]:
    """``"0,1,7"`` / ``"0-9"`` / ``"3"`` -> a list of ints in [0, num_classes); None -> all classes.

    A range's ends are checked before it is expanded, so ``0-9999999`` is refused without building ten million
    labels (or a message listing them)."""
    if text is None or text.strip() in ("", "all"):
        return list(range(num_classes))
    valid = f"--labels must be digits in [0, {num_classes - 1}] (e.g. 0-{num_classes - 1} or 3,1,4)"
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if not 0 <= lo <= hi < num_classes:
                    raise InvalidInput(f"{valid}, got the range {part[:40]!r}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError as e:
        if isinstance(e, InvalidInput):
            raise
        raise InvalidInput(f"--labels must be comma-separated integers or ranges like 0-9, got {text[:80]!r}") from None
    bad = [v for v in out if not 0 <= v < num_classes]
    if bad or not out:
        raise InvalidInput(f"{valid}, got {text[:80]!r} (bad: {preview(bad)})")
    return out


def label_grid(images: list, labels: list[int], rows: int, cell: int = 64, title: str = ""):
    """A grid PIL image: one column per label (its number drawn above it), ``rows`` samples per column.

    ``images`` are PIL images ordered column by column (all samples of ``labels[0]`` first)."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # Pillow >= 10.1 scales its built-in font
        font, small = ImageFont.load_default(size=max(10, cell // 3)), ImageFont.load_default(size=12)
    except TypeError:
        font = small = ImageFont.load_default()
    cols = len(labels)
    head, pad = max(14, cell // 3) + 4, 2
    top = head + (16 if title else 0)
    grid = Image.new("L", (cols * (cell + pad) + pad, top + rows * (cell + pad) + pad), color=255)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 1), title, fill=0, font=small)
    for c, lab in enumerate(labels):
        x = pad + c * (cell + pad)
        draw.text((x + cell // 2, top - head // 2), str(lab), fill=0, font=font, anchor="mm")
        for r in range(rows):
            im = images[c * rows + r].convert("L").resize((cell, cell), Image.NEAREST)
            grid.paste(im, (x, top + r * (cell + pad)))
    return grid


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``sample`` subcommand."""
    p = subparsers.add_parser("sample", help="draw pictures of prompts (or digits) with an embedded model into a PNG "
                              "grid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="embedded model name (shapes: text to image, the default; digits, "
                   "digits-onestep, digits-coalescer, digits-consistency: labels, the default when --labels / "
                   "--num-per-label are given) or model dir")
    p.add_argument("--labels", default=None, help="digits to draw, e.g. 0-9 (default), 3,1,4")
    p.add_argument("--num-per-label", type=cli_int(1), default=None, help="images per digit (grid rows; default 1)")
    p.add_argument("--prompt", action="append", default=None,
                   help="with --model shapes: a prompt to draw (repeat for more columns; default: five examples)")
    p.add_argument("--negative-prompt", default=None, help="with --model shapes: the negative prompt of every image")
    p.add_argument("--num-per-prompt", type=cli_int(1), default=None,
                   help="with --model shapes: images per prompt (grid rows; default 2)")
    p.add_argument("--scheduler", default=None, help="dpmpp_2m, ddim, euler, euler_a, unipc, ddpm, lcm, onestep "
                   "(default: the model's own)")
    p.add_argument("--steps", type=cli_int(1), default=None, help="inference steps (default: the model's, 20 / 1)")
    p.add_argument("--guidance", type=cli_number(), default=None, help="CFG scale (default: the model's, 1.5 / 1)")
    p.add_argument("--backend", default="auto", help="auto, torch, cpp, cuda, triton, onnxruntime, tensorrt")
    add_device_argument(p)
    add_compile_argument(p)
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--cell", type=cli_int(1, MAX_CELL), default=None,
                   help="pixels per image in the grid (default 64; 128 for shapes)")
    p.add_argument("--out", "-o", "--output", dest="out", default=None,
                   help=f"PNG path (default {DEFAULT_OUTPUT}; {DEFAULT_PROMPT_OUTPUT} for shapes)")
    p.add_argument("--no-progress", action="store_true")
    return p


def draw(model, labels: list[int], num_per_label: int = 1, seed: int = 0, scheduler: str | None = None,
         steps: int | None = None, guidance: float | None = None, backend: str = "auto", progress: bool = True,
         compile: bool = False):
    """Images (PIL, column by column: all of ``labels[0]`` first) and the sampler used.

    Image ``j`` of label ``k`` starts from noise seeded by ``(stream_seed(seed, "sample"), k * 10000 + j)``
    (see the module docstring); stochastic samplers (``lcm``) draw their per-step noise from
    ``stream_seed(seed, "sample-steps")``. ``None`` settings take the
    model's defaults (``model.defaults``)."""
    from fastdiff.models.generate import LABEL_STRIDE, SAMPLE_STREAM, make_noise, make_sampler, stream_seed

    defaults = getattr(model, "defaults", {}) or {}
    steps = steps if steps is not None else int(defaults.get("num_inference_steps", 20))
    g = guidance if guidance is not None else float(defaults.get("guidance_scale", 1.0))
    sampler = make_sampler(model, scheduler=scheduler, backend=backend, compile=compile)
    ids = [lab * LABEL_STRIDE + j for lab in labels for j in range(num_per_label)]
    y = torch.tensor([lab for lab in labels for _ in range(num_per_label)])
    size = model.unet.config.sample_size
    noise = make_noise(stream_seed(seed, SAMPLE_STREAM), ids, (model.unet.config.in_channels, size, size))
    images = sampler.sample(num_inference_steps=steps, guidance_scale=g, class_labels=y.to(sampler.device),
                            latents=noise.to(sampler.device, sampler.dtype), output_type="pil", progress=progress,
                            generator=torch.Generator().manual_seed(stream_seed(seed, "sample-steps")))
    return images, sampler, steps, g


def prompt_grid(images: list, prompts: list[str], rows: int, cell: int = 128, title: str = ""):
    """A grid RGB PIL image: one column per prompt (its text wrapped above it), ``rows`` images per column, ordered
    column by column (all images of ``prompts[0]`` first)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)
    except TypeError:
        font = ImageFont.load_default()
    pad, line = 4, 13
    width = max(8, cell // 6)  # characters per caption line (~6 px each at size 11)
    wrapped = [textwrap.wrap(p, width) or [""] for p in prompts]
    head = line * max(len(w) for w in wrapped) + pad
    top = head + (line + pad if title else 0)
    grid = Image.new("RGB", (len(prompts) * (cell + pad) + pad, top + rows * (cell + pad) + pad), color="white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 2), title, fill="black", font=font)
    for c, lines in enumerate(wrapped):
        x = pad + c * (cell + pad)
        for k, text in enumerate(lines):
            draw.text((x, top - head + k * line), text, fill="black", font=font)
        for r in range(rows):
            grid.paste(images[c * rows + r].convert("RGB").resize((cell, cell), Image.NEAREST),
                       (x, top + r * (cell + pad)))
    return grid


def draw_prompts(pipe, prompts: list[str], num_per_prompt: int = 2, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, backend: str = "auto", negative_prompt: str | None = None,
                 scheduler: str | None = None, progress: bool = True):
    """Images of prompts (PIL, column by column) with ``fastdiff.Sampler(pipe)``: image ``j`` of prompt ``i``
    starts from noise index ``i * LABEL_STRIDE + j`` of ``stream_seed(seed, "sample")`` (see the module
    docstring). Returns ``(images, sampler, steps, guidance)``."""
    import fastdiff
    from fastdiff.models.generate import LABEL_STRIDE, SAMPLE_STREAM, make_noise, stream_seed

    defaults = getattr(pipe, "fastdiff_defaults", {}) or {}
    steps = steps if steps is not None else int(defaults.get("num_inference_steps", 50))
    g = guidance if guidance is not None else float(defaults.get("guidance_scale", 7.5))
    sampler = fastdiff.Sampler(pipe, scheduler=scheduler, backend=backend)
    ids = [i * LABEL_STRIDE + j for i in range(len(prompts)) for j in range(num_per_prompt)]
    size = pipe.unet.config.sample_size
    noise = make_noise(stream_seed(seed, SAMPLE_STREAM), ids, (pipe.unet.config.in_channels, size, size))
    texts = [p for p in prompts for _ in range(num_per_prompt)]
    negative = None if negative_prompt is None else [negative_prompt] * len(texts)
    images = sampler.sample(prompt=texts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=g,
                            latents=noise.to(sampler.device, sampler.dtype), output_type="pil", progress=progress,
                            generator=torch.Generator().manual_seed(stream_seed(seed, "sample-steps")))
    return images, sampler, steps, g


def _run_prompts(args: argparse.Namespace, out: Path) -> int:
    from fastdiff.models import load_pipeline

    if args.labels is not None or args.num_per_label is not None:
        raise InvalidInput(f"--labels / --num-per-label are for the digits models; --model {args.model} takes "
                           "--prompt and --num-per-prompt")
    if args.compile:
        raise InvalidInput(f"--compile is not supported for text-to-image pipelines ({args.model}) yet; it is for "
                           "the digits models (--model digits)")
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    for p in prompts:
        if len(p) > 1000:
            raise InvalidInput(f"--prompt is {len(p)} characters long; the tokenizer keeps 24 tokens: shorten it")
    rows = args.num_per_prompt or 2
    from fastdiff.models.text_coalescer_net import is_text_coalescer

    if is_text_coalescer(args.model):
        return _run_text_coalescer(args, out, prompts, rows)
    pipe = load_pipeline(args.model, device=resolve_device(args.device))
    images, sampler, steps, g = draw_prompts(pipe, prompts, rows, args.seed, args.steps, args.guidance,
                                             args.backend, args.negative_prompt, args.scheduler,
                                             progress=not args.no_progress)
    name = args.model if isinstance(args.model, str) and "/" not in args.model else "shapes"
    title = f"{name}: {getattr(sampler.scheduler, 'name', '?')} {steps} steps, CFG {g:g}, seed {args.seed}"
    save_image(prompt_grid(images, prompts, rows, cell=args.cell or 128, title=title), out)
    print(f"wrote {out} ({len(images)} images; {title})")
    return 0


def _run_text_coalescer(args: argparse.Namespace, out: Path, prompts: list[str], rows: int) -> int:
    """``--model shapes-coalescer``: the same noise as a pipeline's grid (``draw_prompts``), 1-2 coalescer steps."""
    from PIL import Image

    from fastdiff.models.generate import LABEL_STRIDE, SAMPLE_STREAM, make_noise, stream_seed
    from fastdiff.models.text_coalescer import encoder, load, sample_latents

    for flag, given in (("--negative-prompt", args.negative_prompt), ("--scheduler", args.scheduler),
                        ("--backend", args.backend != "auto"),
                        ("--device", args.device not in (None, "auto", "cpu"))):
        if given:
            raise InvalidInput(f"{flag} does not apply to a text coalescer ({args.model}); it takes --prompt, "
                               "--num-per-prompt, --steps, --guidance, --seed")
    m = load(args.model)
    steps = int(args.steps if args.steps is not None else m.defaults.get("num_inference_steps", 1))
    g = float(args.guidance if args.guidance is not None else m.defaults.get("guidance_scale", 1.0))
    ids = [i * LABEL_STRIDE + j for i in range(len(prompts)) for j in range(rows)]
    noise = make_noise(stream_seed(args.seed, SAMPLE_STREAM), ids, (4, 16, 16))
    enc = encoder()
    latents, _ = sample_latents(m, enc.embed(prompts).repeat_interleave(rows, dim=0), noise, steps, g)
    arr = enc.decode(latents).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]
    title = f"{m.name}: coalescer {steps} steps, CFG {g:g}, seed {args.seed}"
    save_image(prompt_grid(images, prompts, rows, cell=args.cell or 128, title=title), out)
    print(f"wrote {out} ({len(images)} images; {title})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Sample and write the grid; returns the exit status."""
    from fastdiff.models import is_pipeline_model, load

    if args.model is None:
        digits_only = args.labels is not None or args.num_per_label is not None
        args.model = DIGITS_MODEL if digits_only else DEFAULT_MODEL
    from fastdiff.models.text_coalescer_net import is_text_coalescer

    text_to_image = is_pipeline_model(args.model) or is_text_coalescer(args.model)
    if args.prompt and not text_to_image:
        raise InvalidInput(f"--prompt needs a text-to-image model (--model shapes); {args.model!r} draws labels")
    if not text_to_image and (args.num_per_prompt is not None or args.negative_prompt is not None):
        raise InvalidInput("--num-per-prompt / --negative-prompt are for --model shapes")
    out = Path(args.out or (DEFAULT_PROMPT_OUTPUT if text_to_image else DEFAULT_OUTPUT))
    if out.suffix.lower() != ".png":
        raise InvalidInput(f"--out must be a .png path, got {str(out)!r}")
    check_writable(out, "file", what="--out")  # before the model loads and samples, not after
    if text_to_image:
        return _run_prompts(args, out)
    model = load(args.model, device=resolve_device(args.device))
    labels = parse_labels(args.labels, model.num_classes)
    num_per_label = args.num_per_label or 1
    images, sampler, steps, g = draw(model, labels, num_per_label, args.seed, args.scheduler, args.steps,
                                     args.guidance, args.backend, progress=not args.no_progress,
                                     compile=args.compile)
    title = f"{model.name}: {getattr(sampler.scheduler, 'name', '?')} {steps} steps, CFG {g:g}, seed {args.seed}"
    save_image(label_grid(images, labels, num_per_label, cell=args.cell or 64, title=title), out)
    print(f"wrote {out} ({len(images)} images; {title})")
    if args.compile:
        print(f"compile time {sampler.compile_seconds:.1f} s (included in the run, not in later calls)")
    return 0
