"""``python -m fastdiff distill coalescer-index | coalescer-train | coalescer-eval``: the coalescer's commands.

    torchrun --nproc_per_node 2 -m fastdiff.distill coalescer-index --model digits --out runs/digits-index
    python -m fastdiff distill coalescer-train --index runs/digits-index --out runs/digits-coalescer
    python -m fastdiff distill coalescer-eval --model runs/digits-coalescer --steps 1 2 --guidance 1 1.5 --adaptive 0.9

``--model shapes`` makes the text-conditioned coalescer (:mod:`fastdiff.distill.text_coalescer`): the index holds
renders encoded by the shipped VAE and their captions' pooled text embeddings; ``coalescer-eval --model
shapes-coalescer`` judges it with the shapes judge. Options left out take the model's defaults (:data:`DEFAULTS`).
"""

from __future__ import annotations

import argparse

from fastdiff._checks import cli_int, cli_number

#: per-model defaults of the options given as None (digits: docs/notes/coalescer.md; shapes:
#: docs/notes/shapes-coalescer.md)
DEFAULTS = {
    "digits": {"desc_scale": 32.0, "prior_scale": 4.0, "guidance": 1.5, "hidden": 512, "shard_size": 500},
    "shapes": {"desc_scale": 256.0, "prior_scale": 4.0, "guidance": 3.0, "hidden": 1024, "shard_size": 1000},
}


def _default(a: argparse.Namespace, key: str):
    value = getattr(a, key)
    return DEFAULTS.get(a.model, DEFAULTS["digits"])[key] if value is None else value


def add_subcommands(sub) -> None:
    """Add the three subcommands to ``python -m fastdiff.distill``'s sub-parsers."""
    i = sub.add_parser("coalescer-index", help="faiss index of a model's training pairs (also under torchrun)")
    i.add_argument("--model", default="digits", help="the model whose latent space and data are indexed")
    i.add_argument("--out", required=True, help="index directory (shards, pairs, index.faiss, manifest)")
    i.add_argument("--desc-scale", type=cli_number(minimum=0.0), default=None,
                   help="weight of the condition part of the key (digits 32: queries from R = 4 z stay in their "
                        "class; shapes: see docs/notes/shapes-coalescer.md)")
    i.add_argument("--index-type", default="flat", choices=("flat", "hnsw", "ivf"))
    i.add_argument("--shard-size", type=cli_int(1), default=None)
    i.add_argument("--num-pairs", type=cli_int(1), default=50000, help="shapes: rendered (caption, image) pairs")
    i.add_argument("--data-seed", type=cli_int(None), default=0, help="shapes: the render.example dataset seed")
    i.add_argument("--threads", type=cli_int(1), default=None)
    i.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("coalescer-train", help="train a coalescer network on an index (no teacher)")
    t.add_argument("--index", required=True, help="directory written by coalescer-index")
    t.add_argument("--model", default="digits", help="the model the index must have been built for")
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--name", default=None, help="model name in its config (default: <model>-coalescer)")
    t.add_argument("--checkpoint", default=None, help="checkpoint file (default: <out>.ckpt); resumed when present")
    t.add_argument("--steps", type=cli_int(1), default=5000)
    t.add_argument("--batch-size", type=cli_int(1), default=256)
    t.add_argument("--lr", type=cli_number(minimum=0.0), default=1e-3)
    t.add_argument("--hidden", type=cli_int(1), default=None)
    t.add_argument("--depth", type=cli_int(1), default=2)
    t.add_argument("--label-dropout", type=cli_number(0.0, 1.0), default=0.1)
    t.add_argument("--refine-fraction", type=cli_number(0.0, 1.0), default=0.25)
    t.add_argument("--max-steps", type=cli_int(1), default=2, help="the most sampling steps the model supports")
    t.add_argument("--prior-scale", type=cli_number(minimum=0.0), default=None,
                   help="starting points R = prior_scale * N(0, I) (digits 4: see docs/notes/coalescer.md)")
    t.add_argument("--guidance", type=cli_number(), default=None,
                   help="default CFG scale stored with the model (digits 1.5: best FD in docs/notes/coalescer.md)")
    t.add_argument("--default-steps", type=cli_int(1), default=2, help="default sampling steps stored with the model")
    t.add_argument("--seed", type=cli_int(None), default=0)
    t.add_argument("--save-every", type=cli_int(1), default=250)
    t.add_argument("--threads", type=cli_int(1), default=None)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: a killed job

    e = sub.add_parser("coalescer-eval", help="accuracy / FD / steps used of a coalescer: steps x CFG x adaptive")
    e.add_argument("--model", default="digits-coalescer")
    e.add_argument("--steps", type=cli_int(1), nargs="+", default=[1, 2])
    e.add_argument("--guidance", type=cli_number(), nargs="+", default=[1.0])
    e.add_argument("--adaptive", type=cli_number(0.0), nargs="*", default=[],
                   help="also: up to max(--steps) steps, stopping once |direction| >= this threshold")
    e.add_argument("--num-per-class", type=cli_int(1), default=100)
    e.add_argument("--num-seeds", type=cli_int(1), default=None,
                   help="text coalescers: images per evaluation prompt (default: the shapes judge's 4)")
    e.add_argument("--seed", type=cli_int(None), default=0)
    e.add_argument("--threads", type=cli_int(1), default=None)


def run(a: argparse.Namespace) -> int:
    """Run a parsed coalescer subcommand (errors propagate as FastDiffError to the caller's one-line handler)."""
    from pathlib import Path

    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    if a.distill_command == "coalescer-index" and a.model == "shapes":
        from fastdiff.distill.text_coalescer_index import TextIndexSpec, build_index

        spec = TextIndexSpec(model=a.model, num_pairs=a.num_pairs, data_seed=a.data_seed,
                             desc_scale=float(_default(a, "desc_scale")), index_type=a.index_type,
                             shard_size=_default(a, "shard_size"))
        out = build_index(spec, a.out, progress=not a.no_progress)
        if out is not None:
            print(f"wrote the {spec.index_type} index of {spec.num_pairs} shapes pairs to {out}")
        return 0
    if a.distill_command == "coalescer-index":
        from fastdiff.distill.coalescer_index import IndexSpec, build_index

        spec = IndexSpec(model=a.model, desc_scale=float(_default(a, "desc_scale")), index_type=a.index_type,
                         shard_size=_default(a, "shard_size"))
        out = build_index(spec, a.out, progress=not a.no_progress)
        if out is not None:
            print(f"wrote the {spec.index_type} index of {spec.model!r} pairs to {out}")
        return 0
    if a.distill_command == "coalescer-train":
        from fastdiff._atomic import check_writable
        from fastdiff.distill.coalescer import CoalescerTrainSpec, train_coalescer
        from fastdiff.distill.coalescer_index import load_index

        check_writable(a.out, "dir", what="--out")
        text = a.model == "shapes"
        if text:
            from fastdiff.distill.text_coalescer import encoder, train_text_coalescer
            from fastdiff.distill.text_coalescer_index import load_index as load_text_index

            index = load_text_index(a.index, model=a.model, encoder=encoder())
        else:
            index = load_index(a.index, model=a.model)
        spec = CoalescerTrainSpec(index_sha256=index.sha256, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                  seed=a.seed, hidden=_default(a, "hidden"), depth=a.depth,
                                  label_dropout=a.label_dropout, refine_fraction=a.refine_fraction,
                                  num_steps=a.max_steps, prior_scale=float(_default(a, "prior_scale")),
                                  **({"embed_dim": int(index.embeddings.shape[1])} if text else {}))
        kwargs = dict(checkpoint=a.checkpoint or str(Path(a.out)) + ".ckpt", save_every=a.save_every,
                      name=a.name or f"{a.model}-coalescer", progress=not a.no_progress, stop_after=a.stop_after,
                      defaults={"scheduler": "coalescer", "guidance_scale": float(_default(a, "guidance")),
                                "num_inference_steps": a.default_steps})
        if text:
            train_text_coalescer(index, a.out, spec, **kwargs)
        else:
            train_coalescer(index, a.out, spec, **kwargs)
        return 0
    from fastdiff.models.text_coalescer_net import is_text_coalescer

    if is_text_coalescer(a.model):
        from fastdiff.distill.text_coalescer import evaluate
        from fastdiff.quality.shapes_eval import format_table as shapes_table

        seeds = list(range(a.num_seeds)) if a.num_seeds else None
        rows, used = [], []
        for g in a.guidance:
            for s, thr in [(s, None) for s in a.steps] + [(max(a.steps), t) for t in a.adaptive]:
                r, mean_steps = evaluate(a.model, s, g, thr, seeds=seeds)
                rows.append(r)
                used.append(f"{r.backend}, {s} steps, CFG {g:g}: mean steps {mean_steps:.2f}")
        print(shapes_table(rows))
        print("\n".join(used))
        return 0
    from fastdiff.distill.coalescer_eval import evaluate_settings, format_table

    rows = evaluate_settings(a.model, a.steps, a.guidance, a.adaptive, num_per_class=a.num_per_class, seed=a.seed)
    print(format_table(rows))
    return 0
