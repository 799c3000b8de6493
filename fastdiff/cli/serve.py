"""``python -m fastdiff serve``: serve a model behind NVIDIA Triton Inference Server (PyTriton), with dynamic
batching, until SIGTERM / Ctrl-C.

The model is named ``fastdiff``; its inputs are ``labels`` (INT64) or, for a text pipeline, ``prompt`` (BYTES),
``seed`` (INT64) and optional ``steps`` (INT32) / ``guidance`` (FP32), one row per image; its output is ``images``
(UINT8, H x W x C). The same seed gives the same image whether Triton batched the request with others or not (see
fastdiff.serve.model). Ask it with ``python -m fastdiff request`` or ``fastdiff.serve.Client``. Needs the serving
extra: pip install -e '.[serve]'.
"""

from __future__ import annotations

import argparse

from fastdiff._checks import cli_int, cli_number
from fastdiff.cli import add_compile_argument, add_device_argument, resolve_device
from fastdiff.serve.model import MAX_STEPS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand."""
    p = subparsers.add_parser("serve", help="serve a model behind Triton Inference Server (PyTriton)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="embedded model name (digits, digits-onestep), a model dir, "
                   "or a diffusers pipeline dir (text models)")
    p.add_argument("--scheduler", default=None, help="scheduler name (default: the model's own)")
    p.add_argument("--steps", type=cli_int(1, MAX_STEPS), default=None, help="default inference steps")
    p.add_argument("--guidance", type=cli_number(), default=None, help="default CFG scale")
    p.add_argument("--backend", default="auto", help="auto, torch, cpp, cuda, triton, onnxruntime, tensorrt")
    add_device_argument(p)
    add_compile_argument(p)
    p.add_argument("--max-batch", type=cli_int(1, 4096), default=16, help="most images per model call (16)")
    p.add_argument("--max-queue-delay-us", type=cli_int(0, 10_000_000), default=2000,
                   help="how long Triton may hold a request to batch it with later ones (2000 us)")
    p.add_argument("--no-dynamic-batching", action="store_true", help="run every request alone")
    p.add_argument("--address", default="127.0.0.1", help="interface to listen on (127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--http-port", type=cli_int(1, 65535), default=8000)
    p.add_argument("--grpc-port", type=cli_int(1, 65535), default=8001)
    p.add_argument("--metrics-port", type=cli_int(1, 65535), default=8002)
    p.add_argument("--log-verbose", type=cli_int(0, 10), default=0, help="Triton's verbose log level")
    return p


def run(args: argparse.Namespace) -> int:
    from fastdiff.serve.model import ServedModel
    from fastdiff.serve.server import Server, check_serving_available

    check_serving_available()  # before the model loads
    model = ServedModel(args.model, scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                        backend=args.backend, device=resolve_device(args.device), compile=args.compile)
    server = Server(model, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                    address=args.address, max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                    dynamic_batching=not args.no_dynamic_batching, log_verbose=args.log_verbose)
    server.start()
    batching = "off" if args.no_dynamic_batching else f"max batch {args.max_batch}, delay {args.max_queue_delay_us} us"
    print(f"serving {model.describe()} as 'fastdiff' at {server.http_url} and {server.grpc_url} (metrics port "
          f"{args.metrics_port}; dynamic batching {batching}); SIGTERM or Ctrl-C stops it", flush=True)
    server.serve_forever()
    print("stopped", flush=True)
    return 0
