"""The Triton Inference Server side: a :class:`~fastdiff.serve.model.ServedModel` bound into PyTriton's bundled
``tritonserver`` under the name ``fastdiff``, with Triton's dynamic batching.

PyTriton starts ``tritonserver`` as a child process; requests reach the infer function here (in this process)
through the Python backend's stub. Two environment facts decide whether that works, and both are checked or fixed
before the child starts:

- the stub links ``libpython3.X.so`` and finds it on ``LD_LIBRARY_PATH``: on a machine with several Pythons of the
  same minor version it can load another build's library and die at start-up with ``'_thread.RLock' object has no
  attribute '_recursion_count'`` (seen here: pyenv's 3.11.7 against the system's 3.11). :func:`prefer_own_libpython`
  puts this interpreter's ``LIBDIR`` first; the child inherits ``os.environ`` when it is spawned, so no re-exec is
  needed.
- the stub is built against NumPy 1.x (``nvidia-pytriton`` 0.7.0 requires ``numpy<2``): under NumPy 2 every tensor
  it passes has a zero-byte payload and Triton answers "output tensor shape does not match size of output".
  :func:`check_serving_available` refuses NumPy >= 2 with that explanation instead.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sysconfig
import threading

import numpy as np

from fastdiff.errors import InvalidInput, ServingUnavailable
from fastdiff.serve.model import REQUEST_ID_PARAMETER, ServedModel

MODEL_NAME = "fastdiff"
#: default ports: Triton's own (HTTP 8000, gRPC 8001, metrics 8002).
DEFAULT_PORTS = (8000, 8001, 8002)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (for tests and load tests that start a server
    beside others: another process can still take one before the server binds it)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
LOGGER = logging.getLogger(__name__)


def check_serving_available() -> None:
    """Raise :class:`ServingUnavailable` unless PyTriton imports and can pass tensors in this environment."""
    try:
        import pytriton.triton  # noqa: F401
    except ImportError as e:
        raise ServingUnavailable(f"serving needs PyTriton and tritonclient ({e}); install the serving extra: "
                                 "pip install -e '.[serve]'") from e
    if int(np.__version__.split(".")[0]) >= 2:
        raise ServingUnavailable(
            f"PyTriton's Triton Python-backend stub is built for NumPy 1.x, and NumPy {np.__version__} is "
            "installed: the server would answer every request with empty tensors. Serve from an environment with "
            "numpy<2 (pip install -e '.[serve]' resolves it)")


def prefer_own_libpython() -> str:
    """Put this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` (see the module docstring); returns it."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir:
        rest = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    return libdir


class Server:
    """A running Triton server for one :class:`ServedModel`: ``with Server(model, http_port=...) as s: ...``.

    Args:
        model: the :class:`ServedModel` to serve.
        http_port / grpc_port / metrics_port: Triton's ports.
        address: where to listen (``127.0.0.1``: this machine only; ``0.0.0.0``: every interface).
        max_batch: the most images Triton batches into one call of the model.
        max_queue_delay_us: how long Triton may hold a request to batch it with later ones.
        dynamic_batching: False runs every request alone (for comparison).
    """

    def __init__(self, model: ServedModel, http_port: int = DEFAULT_PORTS[0], grpc_port: int = DEFAULT_PORTS[1],
                 metrics_port: int = DEFAULT_PORTS[2], address: str = "127.0.0.1", max_batch: int = 16,
                 max_queue_delay_us: int = 2000, dynamic_batching: bool = True, log_verbose: int = 0):
        from fastdiff._checks import check_int

        self.model = model
        ports = [check_int(n, p, 1, 65535) for n, p in (("http_port", http_port), ("grpc_port", grpc_port),
                                                          ("metrics_port", metrics_port))]
        if len(set(ports)) != 3:
            raise InvalidInput(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.address = address
        self.max_batch = check_int("max_batch", max_batch, 1, 4096)
        self.max_queue_delay_us = check_int("max_queue_delay_us", max_queue_delay_us, 0, 10_000_000)
        self.dynamic_batching = bool(dynamic_batching)
        self.log_verbose = log_verbose
        self._triton = None
        self._stopped = threading.Event()

    @property
    def http_url(self) -> str:
        return f"http://{self._host()}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self._host()}:{self.grpc_port}"

    def _host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    def _infer(self, requests):
        ids = [(r.parameters or {}).get(REQUEST_ID_PARAMETER) for r in requests]
        return self.model.infer([r.data for r in requests], ids)

    def start(self) -> Server:
        check_serving_available()
        prefer_own_libpython()  # before PyTriton spawns tritonserver: the child copies os.environ
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        config = TritonConfig(http_port=self.http_port, grpc_port=self.grpc_port, metrics_port=self.metrics_port,
                              http_address=self.address, grpc_address=self.address, metrics_address=self.address,
                              log_verbose=self.log_verbose, exit_timeout_secs=10)
        triton = Triton(config=config)
        try:
            batcher = DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us) if self.dynamic_batching \
                else None
            triton.bind(model_name=MODEL_NAME, infer_func=self._infer,
                        inputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape, optional=t.optional)
                                for t in self.model.inputs()],
                        outputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in self.model.outputs()],
                        config=ModelConfig(max_batch_size=self.max_batch, batcher=batcher))
            triton.run()
        except Exception as e:
            triton.stop()
            raise ServingUnavailable(f"Triton Inference Server did not start ({type(e).__name__}: {e}); is a "
                                     f"port of {self.http_port}, {self.grpc_port}, {self.metrics_port} in use?") from e
        self._triton = triton
        return self

    def stop(self) -> None:
        """Stop the server (waits for requests in flight, up to Triton's exit timeout); safe to call twice."""
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()
        self._stopped.set()

    def statistics(self) -> dict[str, int]:
        """Triton's counters for the model: ``inference_count`` (images, one per batch row) and
        ``execution_count`` (model calls); their ratio is the mean batch size. PyTriton restricts the statistics API
        to its access token, which this process holds."""
        import tritonclient.http as http

        client = http.InferenceServerClient(f"{self._host()}:{self.http_port}")
        try:
            stats = client.get_inference_statistics(MODEL_NAME, headers={
                "triton-access-token": self._triton.get_access_token()})["model_stats"][0]
        finally:
            client.close()
        return {k: int(stats[k]) for k in ("inference_count", "execution_count")}

    def is_alive(self) -> bool:
        return self._triton is not None and self._triton.is_alive()

    def serve_forever(self, poll_s: float = 1.0) -> None:
        """Block until SIGTERM / SIGINT (then stop cleanly) or until the server dies."""
        def on_signal(signum, _frame):
            LOGGER.info("signal %s: stopping", signum)
            self._stopped.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stopped.wait(poll_s):
                if not self.is_alive():
                    raise ServingUnavailable("Triton Inference Server stopped unexpectedly (see its log above)")
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
