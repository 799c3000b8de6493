"""``python -m fastdiff request``: ask a ``python -m fastdiff serve`` server for images and write them as a PNG
(one image, or a labelled grid for several).

    python -m fastdiff request --url grpc://127.0.0.1:8001 --labels 3 --seed 0 --out three.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff._atomic import check_writable
from fastdiff._checks import cli_int, cli_number
from fastdiff.errors import InvalidInput
from fastdiff.images import save_image
from fastdiff.serve.model import MAX_STEPS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``request`` subcommand."""
    p = subparsers.add_parser("request", help="ask a fastdiff serve server for images, write a PNG",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="grpc://127.0.0.1:8001", help="server URL: grpc://HOST:8001 or http://HOST:8000")
    p.add_argument("--model-name", default="fastdiff", help="the served model's name")
    p.add_argument("--labels", default=None, help="labels, e.g. 3 or 0-9 or 3,1,4 (label models)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (text models; repeat for several)")
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--steps", type=cli_int(1, MAX_STEPS), default=None, help="inference steps (server default)")
    p.add_argument("--guidance", type=cli_number(), default=None, help="CFG scale (server default)")
    p.add_argument("--timeout", type=cli_number(0.1), default=120.0, help="seconds to wait for the server")
    p.add_argument("--out", "-o", default="request.png", help="PNG path (default request.png)")
    return p


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from fastdiff.cli.sample import label_grid, parse_labels
    from fastdiff.serve.client import Client

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InvalidInput(f"--out must be a .png path, got {str(out)!r}")
    if (args.labels is None) == (args.prompt is None):
        raise InvalidInput("pass exactly one of --labels (label models) or --prompt (text models)")
    check_writable(out, "file", what="--out")  # before the request, not after
    # the server checks labels against its model; 2**20 (the most classes a model folder may have) keeps a range
    # like "0-9999999999" from expanding here
    labels = parse_labels(args.labels, 2**20) if args.labels is not None else None
    with Client(args.url, args.model_name, timeout_s=args.timeout) as client:
        images = client.sample(labels=labels, prompt=args.prompt, seed=args.seed, steps=args.steps,
                               guidance=args.guidance)
    pil = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in images]
    if len(pil) == 1:
        save_image(pil[0], out)
    elif labels is not None:
        save_image(label_grid(pil, labels, 1, title=f"seed {args.seed}"), out)
    else:
        grid = Image.new(pil[0].mode, (sum(im.width for im in pil), pil[0].height))
        for i, im in enumerate(pil):
            grid.paste(im, (i * pil[0].width, 0))
        save_image(grid, out)
    print(f"wrote {out} ({len(pil)} image{'s' if len(pil) > 1 else ''} {images.shape[1]}x{images.shape[2]} from "
          f"{args.url})")
    return 0
