"""Serving fastdiff behind NVIDIA Triton Inference Server (through PyTriton), and a client for it.

    python -m fastdiff serve --model digits --http-port 8000      # the server (fastdiff.serve.server)
    python -m fastdiff request --url grpc://127.0.0.1:8001 --labels 3 --seed 0 --out three.png

- :mod:`fastdiff.serve.model`: the request contract (inputs, outputs, checks, per-row seeding), no PyTriton;
- :mod:`fastdiff.serve.server`: the PyTriton glue (ports, dynamic batching, start / stop, the libpython fix);
- :mod:`fastdiff.serve.client`: :class:`Client`, ``.sample(labels=... | prompt=..., seed=...) -> images``.

Nothing here imports PyTriton or tritonclient until a server starts or a client connects (the ``serve`` extra:
``pip install -e '.[serve]'``).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "Client":
        from fastdiff.serve.client import Client

        return Client
    if name == "ServedModel":
        from fastdiff.serve.model import ServedModel

        return ServedModel
    if name == "Server":
        from fastdiff.serve.server import Server

        return Server
    raise AttributeError(f"module 'fastdiff.serve' has no attribute {name!r}")


__all__ = ["Client", "ServedModel", "Server"]
