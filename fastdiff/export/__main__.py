"""``python -m fastdiff.export MODEL --format onnx|tensorrt|triton --out DIR [options]``.

MODEL: an embedded model (``digits``, ``digits-onestep``), a fastdiff model folder (e.g. a distilled one-step
student), a diffusers pipeline folder (with ``unet/``) or UNet folder, or - with ``--format tensorrt`` - an ``.onnx``
file written by this command. ``--format triton`` writes a Triton Inference Server model repository (the ONNX
network and a Python-backend sampling model; see fastdiff.export.triton_repository). Exit status: 0 done, 1 export /
parity failure, 2 bad arguments or model, 3 backend unavailable.

A text-to-image pipeline (``shapes``, or a folder written by ``python -m fastdiff train shapes``) exports, with
``--format onnx``, its UNet, text encoder and VAE decoder plus a manifest (fastdiff.export.text_to_image); ``--out``
defaults to ``out/<name>-onnx`` there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastdiff.errors import BackendUnavailable, ExportError, FastDiffError, InvalidInput


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastdiff.export", description="Export a diffusion UNet (or a whole few-step sampler) to "
        "ONNX or a TensorRT engine, with a parity check against PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m fastdiff.export digits --format onnx --out out/digits\n"
               "  python -m fastdiff.export digits-onestep --format onnx --sampler onestep --out out/student\n"
               "  python -m fastdiff.export shapes --format onnx --out out/shapes   # text encoder, UNet, VAE "
               "decoder + manifest\n"
               "  python -m fastdiff.export ./sd15 --format onnx --profile sd15 --precision fp16 --out out/sd15\n"
               "  python -m fastdiff.export out/sd15/model.onnx --format tensorrt --batch 1:2:4 --out out/sd15\n"
               "sizes are in model-input units (latents for latent models): --height 64 is 512 px for SD 1.5")
    p.add_argument("model", nargs="?", help="model name, folder, or .onnx file (tensorrt)")
    p.add_argument("--format", choices=("onnx", "tensorrt", "triton"), default="onnx")
    p.add_argument("--out", help="output folder (created; for a text-to-image pipeline default out/NAME-onnx)")
    p.add_argument("--profile", help="export profile name (digits, sd15, sdxl, sd-turbo) or .toml path; default: "
                                     "the model family's, or one derived from the model")
    p.add_argument("--precision", choices=("fp32", "fp16"), help="override the profile's precision")
    p.add_argument("--opset", type=int, help="ONNX opset (>= 18; default: the profile's)")
    for dim in ("batch", "height", "width", "tokens"):
        p.add_argument(f"--{dim}", metavar="N|MIN:MAX|MIN:OPT:MAX",
                       help=f"{dim} range inside the profile's (a single N makes it static)")
    p.add_argument("--sampler", help="export the whole sampling loop of a few-step sampler as one graph: onestep, "
                                     "lcm4, lcm:4, euler_a:2, dpmpp_2m:8 ...")
    p.add_argument("--steps", type=int, help="step count for --sampler (overrides a count in the spec); "
                   "triton: the sampling model's default steps")
    p.add_argument("--guidance-scale", type=float, help="default guidance scale of a --sampler graph (> 1: CFG "
                                                        "inside the graph, with the scale as an input); triton: the "
                                                        "sampling model's default")
    p.add_argument("--max-batch", type=int, default=16, help="triton: most images per batch of the sampling model")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="triton: dynamic batching delay")
    p.add_argument("--scheduler", help="triton: the sampling model's scheduler (default: the model's own)")
    p.add_argument("--no-parity", action="store_true", help="skip the onnxruntime / TensorRT vs PyTorch check")
    p.add_argument("--parity-tol", type=float, help="max relative error of the parity check (default: 1e-4 fp32, "
                                                    "2e-2 fp16)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="weights in a separate .data file (auto: over ~2 GB)")
    p.add_argument("--cache-dir", help="engine / timing cache folder (default $FASTDIFF_CACHE_DIR or "
                                       "~/.cache/fastdiff)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list-profiles", action="store_true", help="list the export profiles and exit")
    return p


def _list_profiles() -> int:
    from fastdiff.export.profiles import available_profiles, load_profile

    for name, path in available_profiles().items():
        prof = load_profile(path)
        dims = ", ".join(f"{k} {v.min}..{v.max} (opt {v.opt})" for k, v in prof.dims.items())
        print(f"{name:10s} {prof.precision}  {dims}\n           {prof.description}  [{path}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_profiles:
        return _list_profiles()
    from fastdiff.export.text_to_image import is_pipeline_export

    pipeline = bool(args.model) and is_pipeline_export(args.model)
    if pipeline and not args.out:
        args.out = f"out/{Path(args.model).name}-onnx"
    if not args.model or not args.out:
        build_parser().error("MODEL and --out are required")
    from fastdiff.export.api import export_onnx, export_tensorrt

    common = dict(profile=args.profile, precision=args.precision, opset=args.opset, batch=args.batch,
                  height=args.height, width=args.width, tokens=args.tokens, sampler=args.sampler, steps=args.steps,
                  guidance_scale=args.guidance_scale, parity=not args.no_parity, parity_tol=args.parity_tol,
                  external_data=args.external_data, progress=not args.quiet)
    try:
        if args.format == "onnx":
            if args.model.endswith(".onnx"):
                raise ExportError(f"{args.model} is already an ONNX file; use --format tensorrt to build an engine")
            from fastdiff.export.coalescer import export_coalescer, is_coalescer
            from fastdiff.models.text_coalescer_net import is_text_coalescer

            if pipeline:  # its three components and a manifest
                from fastdiff.export.text_to_image import export_pipeline_onnx

                if args.sampler or args.steps or args.guidance_scale:
                    raise InvalidInput("a text-to-image pipeline exports its UNet, text encoder and VAE decoder; "
                                       "--sampler / --steps / --guidance-scale do not apply (drop them)")
                report = export_pipeline_onnx(args.model, args.out, **{k: v for k, v in common.items() if k not in (
                    "sampler", "steps", "guidance_scale")})
            elif is_text_coalescer(args.model):  # token ids + noise -> image, one graph
                from fastdiff.export.text_coalescer import export_text_coalescer

                report = export_text_coalescer(args.model, args.out, steps=args.steps, guidance=args.guidance_scale,
                                               parity=not args.no_parity, tol=args.parity_tol, opset=args.opset)
            elif is_coalescer(args.model):  # not a UNet: the whole coalescer sampler is one small graph
                report = export_coalescer(args.model, args.out, steps=args.steps, guidance=args.guidance_scale,
                                          parity=not args.no_parity, tol=args.parity_tol, opset=args.opset)
            else:
                report = export_onnx(args.model, args.out, **common)
        elif pipeline and not Path(args.model).is_dir():
            raise InvalidInput(f"the {args.model!r} pipeline exports with --format onnx (UNet, text encoder, VAE "
                               "decoder); for a TensorRT engine of its UNet pass the exported file: python -m "
                               "fastdiff.export DIR/unet.onnx --format tensorrt --out DIR")
        elif args.format == "triton":
            from fastdiff.export.triton_repository import export_triton

            triton = {k: v for k, v in common.items() if k not in ("sampler", "steps", "guidance_scale")}
            if args.sampler:
                raise InvalidInput("--format triton exports the network; the sampling loop runs in the Python "
                                   "model (drop --sampler)")
            report = export_triton(args.model, args.out, max_batch=args.max_batch,
                                   max_queue_delay_us=args.max_queue_delay_us, scheduler=args.scheduler,
                                   steps=args.steps, guidance=args.guidance_scale, **triton)
        else:
            report = export_tensorrt(args.model, args.out, cache_dir=args.cache_dir, **common)
    except BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FastDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
