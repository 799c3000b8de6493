"""``python -m fastdiff eval``: conditional accuracy, Fréchet distance and sampling time of a model + sampler.

A CNN judge trained on the real digits (seeded, held-out accuracy printed) decides whether each sample shows the
requested digit; the FD compares samples and all real digits in the judge's 64-wide feature space. ``--sweep``
measures every scheduler x step count and writes a Markdown table and a quality-against-time plot (PNG).
``--compare`` measures the fast-model methods on one table (compare.md / .json / .png): the teacher at 5 / 10 / 20
steps, digits-onestep, digits-coalescer at 1 / 2 steps and adaptive, digits-consistency at 1 / 2 / 4 steps, and each
``--extra-model DIR[:1,2,4]``.
``--model shapes`` judges the text-to-image pipeline's prompt adherence instead (:mod:`fastdiff.quality.shapes_eval`:
fractions of one- and two-object prompts fully correct, FD in the shapes judge's features; ``--sweep`` over
``--guidance-list``; ``--compare`` the fast-model methods of shapes on one table, compare_shapes.md / .json / .png:
teacher 5 / 10 / 20 steps, shapes-onestep, and shapes-consistency / shapes-coalescer where shipped).
Needs scikit-learn (and matplotlib for the plot): ``pip install fastdiff[digits]``.
"""

from __future__ import annotations

import argparse
import json
import sys

from fastdiff._atomic import atomic_write_text, check_writable
from fastdiff._checks import cli_int, cli_number
from fastdiff.cli import add_compile_argument, add_device_argument, resolve_device
from fastdiff.errors import InvalidInput


def _steps_list(text: str) -> list[int]:
    """``"5,10,20"`` -> [5, 10, 20]; every count >= 1 (a 0 would run the model's default and be labelled 0)."""
    parse = cli_int(1)
    try:
        steps = [parse(v) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"each step count {e}") from None
    if not steps:
        raise argparse.ArgumentTypeError("give at least one step count, e.g. 5,10,20")
    return steps


def _guidance_list(text: str) -> list[float]:
    """``"1,3,5"`` -> [1.0, 3.0, 5.0]; every scale >= 0."""
    parse = cli_number(minimum=0.0)
    try:
        values = [parse(v) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"each guidance scale {e}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one guidance scale, e.g. 1,3,5,7,9")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="measure accuracy / Fréchet distance / time; sweep schedulers x steps",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits",
                   help="embedded model name (digits, digits-onestep, digits-coalescer, digits-consistency, shapes, "
                   "shapes-onestep, shapes-consistency) or model directory")
    p.add_argument("--scheduler", default=None, help="scheduler name (default: the model's own)")
    p.add_argument("--steps", type=cli_int(1), default=None, help="inference steps (default: the model's)")
    p.add_argument("--guidance", type=cli_number(), default=None, help="CFG scale (default: the model's)")
    p.add_argument("--num-per-class", type=cli_int(2), default=100,
                   help="samples per digit, >= 2: the FD needs a covariance (default 100)")
    p.add_argument("--seed", type=cli_int(None), default=0)
    p.add_argument("--backend", default="auto")
    add_device_argument(p)
    add_compile_argument(p)
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="sweep --schedulers x --steps-list")
    mode.add_argument("--compare", action="store_true",
                      help="one table of the fast-model methods (teacher, one-step student, coalescer, extras)")
    p.add_argument("--adaptive-threshold", type=cli_number(0.0), default=None,
                   help="with --compare: confidence at which an adaptive coalescer sample stops (default 0.998); "
                        "with a text coalescer (shapes-coalescer): its adaptive step count (default: fixed steps)")
    p.add_argument("--schedulers", default="dpmpp_2m,ddim,euler,unipc")
    p.add_argument("--steps-list", type=_steps_list, default="5,10,20,50")
    p.add_argument("--extra-model", action="append", default=[],
                   help="with --sweep: also measure this model at its own settings (e.g. digits-onestep); with "
                        "--compare: DIR[:STEPS], a model folder sampled at its own scheduler and CFG at STEPS "
                        "(default 1,2,4), e.g. runs/digits-consistency:1,2,4")
    p.add_argument("--guidance-list", type=_guidance_list, default="1,2,3,5,7,9",
                   help="with --model shapes --sweep: the guidance scales (default 1,2,3,5,7,9)")
    p.add_argument("--num-seeds", type=cli_int(1), default=None,
                   help="with --model shapes: images per prompt (default 4: the judge's EVAL_SEEDS)")
    p.add_argument("--out", "--out-dir", dest="out", default=".",
                   help="with --sweep / --compare: the folder sweep.* / compare.* go to")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the measurement(s), print a table; returns the exit status."""
    from fastdiff.models import is_pipeline_model
    from fastdiff.quality.evaluate import evaluate, format_table

    if args.json:  # checked before the evaluation (minutes), so a bad path cannot lose its results
        check_writable(args.json, "file", what="--json")
    from fastdiff.models.text_coalescer_net import is_text_coalescer

    if is_text_coalescer(args.model):
        return _run_text_coalescer(args)
    if is_pipeline_model(args.model):
        return _run_shapes(args)
    common = dict(num_per_class=args.num_per_class, seed=args.seed, backend=args.backend)
    if (args.sweep or args.compare) and args.compile:
        mode = "--sweep" if args.sweep else "--compare"
        raise InvalidInput(f"--compile measures one setting; it does not combine with {mode}")
    if args.compare:
        results = _run_compare(args)
    elif args.sweep:
        from fastdiff.quality.sweep import plot, sweep, write_table

        out = check_writable(args.out, "dir", what="--out", must_exist=True)
        results = sweep(args.model, [s.strip() for s in args.schedulers.split(",") if s.strip()],
                        args.steps_list, guidance_scale=args.guidance,
                        extra=[{"model": m} for m in args.extra_model], **common)
        command = (f"python -m fastdiff eval --sweep --model {args.model} --schedulers {args.schedulers} "
                   f"--steps-list {','.join(map(str, args.steps_list))} --num-per-class {args.num_per_class} "
                   f"--seed {args.seed}"
                   + (f" --guidance {args.guidance}" if args.guidance is not None else "")
                   + (f" --backend {args.backend}" if args.backend != "auto" else "")
                   + "".join(f" --extra-model {m}" for m in args.extra_model))
        write_table(results, out / "sweep.md", note=f"Command: `{command}`.")
        print(format_table(results))
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # the table is the result; the plot is a view of it
            print(f"wrote {out / 'sweep.md'} and {out / 'sweep.json'}; skipped the plot: matplotlib is not installed "
                  "(pip install 'fastdiff[digits]')", file=sys.stderr)
        else:
            plot(results, out / "sweep.png")
            print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    else:
        r = evaluate(args.model, scheduler=args.scheduler, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, device=resolve_device(args.device), compile=args.compile,
                     **common)
        results = [r]
        print(format_table(results))
        print(f"judge held-out accuracy {100 * r.classifier_accuracy:.1f}%; FD real vs real {r.fd_real_floor:.1f}; "
              f"per-digit accuracy " + " ".join(f"{k}:{100 * a:.0f}%" for k, a in enumerate(r.per_class_accuracy)))
        print(f"machine: {r.device}")
    if args.json:
        atomic_write_text(args.json, json.dumps([r.as_dict() for r in results], indent=1) + "\n")
    return 0


def _run_compare(args: argparse.Namespace) -> list:
    """``--compare``: inputs checked (output folder, extra model folders, step lists) before minutes of sampling."""
    from fastdiff.quality.compare import (
        COALESCER_ADAPTIVE_THRESHOLD,
        compare,
        default_jobs,
        format_compare_table,
        parse_extra_model,
    )
    from fastdiff.quality.sweep import plot, write_table

    out = check_writable(args.out, "dir", what="--out", must_exist=True)
    extra = [parse_extra_model(e) for e in args.extra_model]
    threshold = COALESCER_ADAPTIVE_THRESHOLD if args.adaptive_threshold is None else args.adaptive_threshold
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInput("--compare draws a plot: install matplotlib (pip install 'fastdiff[digits]')") from None
    results = compare(default_jobs(extra, threshold), num_per_class=args.num_per_class, seed=args.seed)
    command = (f"python -m fastdiff eval --compare --num-per-class {args.num_per_class} --seed {args.seed}"
               + (f" --adaptive-threshold {args.adaptive_threshold:g}" if args.adaptive_threshold is not None else "")
               + "".join(f" --extra-model {e}" for e in args.extra_model))
    write_table(results, out / "compare.md", formatter=format_compare_table,
                note=f"Command: `{command}`. Network calls per image are counted (rows the network evaluated in "
                     "the timed run / images): a CFG batch counts 2 per image per step. Training wall time: "
                     "`metadata.wall_s` of each model's config (its own training only; \"-\": not recorded).")
    plot(results, out / "compare.png", title=f"fast models on the digits judge (labels: steps), {results[0].device}")
    print(format_compare_table(results))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
    return results


def _run_shapes(args: argparse.Namespace) -> int:
    """``--model shapes`` (or a folder written by ``train shapes``): prompt adherence on the shapes judge;
    ``--sweep`` over guidance scales (``--guidance-list``), writing shapes_sweep.md / .json / .png to ``--out``."""
    from fastdiff.quality import shapes_eval as E

    for flag, given in (("--compile", args.compile), ("--scheduler", args.scheduler),
                        ("--extra-model", args.extra_model and not args.compare)):
        if given:
            raise InvalidInput(f"{flag} is for the digits models; `eval --model {args.model}` takes --steps, "
                               "--guidance, --sweep [--guidance-list], --compare [--extra-model DIR[:STEPS]], "
                               "--backend, --json, --out")
    device = resolve_device(args.device)
    seeds = tuple(range(args.num_seeds)) if args.num_seeds else None
    if args.compare:
        results = _run_shapes_compare(args, seeds)
    elif args.sweep:
        out = check_writable(args.out, "dir", what="--out", must_exist=True)
        results = E.sweep(args.model, args.guidance_list, args.steps, seeds, backend=args.backend, device=device)
        command = (f"python -m fastdiff eval --model {args.model} --sweep --guidance-list "
                   f"{','.join(f'{g:g}' for g in args.guidance_list)}"
                   + (f" --steps {args.steps}" if args.steps else "") + (f" --num-seeds {args.num_seeds}"
                                                                         if args.num_seeds else ""))
        paths = E.write_results(results, out, "shapes_sweep", note=f"Command: `{command}`.")
        print(E.format_table(results))
        print("wrote " + ", ".join(str(p) for p in paths))
    else:
        results = [E.evaluate(args.model, args.steps, args.guidance, seeds, backend=args.backend, device=device)]
        print(E.format_table(results))
        print("why images failed (share of all images of that prompt kind):")
        print(E.format_errors(results))
        r = results[0]
        verdict = " ".join(f"{k.replace('_', ' ')} {'met' if getattr(r, k) >= v else 'MISSED'} (goal {100 * v:.0f} %)"
                           for k, v in E.goals_for(args.model).items())
        print(f"goals: {verdict}; machine: {r.device}")
    if args.json:
        atomic_write_text(args.json, json.dumps([r.as_dict() for r in results], indent=1) + "\n")
    return 0


def _run_text_coalescer(args: argparse.Namespace) -> int:
    """``--model shapes-coalescer`` (or a text coalescer folder): the shapes judge on its samples (1 or 2 steps,
    ``--adaptive-threshold`` for the adaptive step count); the mean steps taken are printed with the table."""
    from fastdiff.distill.text_coalescer import evaluate
    from fastdiff.quality import shapes_eval as E

    for flag, given in (("--compare", args.compare), ("--sweep", args.sweep), ("--compile", args.compile),
                        ("--scheduler", args.scheduler), ("--extra-model", args.extra_model)):
        if given:
            raise InvalidInput(f"{flag} is not for a text coalescer; `eval --model {args.model}` takes --steps, "
                               "--guidance, --adaptive-threshold, --num-seeds, --json")
    seeds = tuple(range(args.num_seeds)) if args.num_seeds else None
    r, mean_steps = evaluate(args.model, args.steps, args.guidance, args.adaptive_threshold, seeds=seeds)
    print(E.format_table([r]))
    calls = mean_steps * (1 if r.guidance == 1 else 2)  # a guided step evaluates the network twice
    print(f"mean steps per image {mean_steps:.2f}; network calls per image {calls:.2f}; machine: {r.device}")
    if args.json:
        atomic_write_text(args.json, json.dumps([{**r.as_dict(), "mean_steps": mean_steps}], indent=1) + "\n")
    return 0


def _run_shapes_compare(args: argparse.Namespace, seeds) -> list:
    """``--compare --model shapes``: inputs checked (output folder, extra pipeline folders, matplotlib) before
    minutes of sampling."""
    from fastdiff.quality import shapes_compare as SC

    if args.model != SC.TEACHER:
        raise InvalidInput(f"--compare measures the shapes methods against the teacher 'shapes'; pass another "
                           f"pipeline folder as --extra-model {args.model}[:STEPS] instead of --model")
    for flag, given in (("--steps", args.steps), ("--guidance", args.guidance)):
        if given is not None:
            raise InvalidInput(f"{flag} does not combine with --compare: every row runs at its own settings")
    out = check_writable(args.out, "dir", what="--out", must_exist=True)
    extra = [SC.parse_extra_pipeline(e) for e in args.extra_model]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInput("--compare draws a plot: install matplotlib (pip install 'fastdiff[digits]')") from None
    rows = SC.compare(SC.default_jobs(extra, args.adaptive_threshold), seeds=seeds)
    command = ("python -m fastdiff eval --compare --model shapes"
               + (f" --num-seeds {args.num_seeds}" if args.num_seeds else "")
               + (f" --adaptive-threshold {args.adaptive_threshold:g}" if args.adaptive_threshold is not None else "")
               + "".join(f" --extra-model {e}" for e in args.extra_model))
    paths = SC.write_results(rows, out, note=f"Command: `{command}`. Same prompts (the judge's 111) and seeds for "
                             "every row; network calls per image counted (a CFG batch counts 2 per image per step); "
                             "training wall time: each model's recorded training (+ the data made for it; the "
                             "shared VAE not counted; \"-\": not recorded).")
    print(SC.format_table(rows))
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows
