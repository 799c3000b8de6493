"""The Triton server end to end (PyTriton's bundled tritonserver on free loopback ports, one per module): the
client and the ``request`` command, dynamic batching, Triton's own checks, bad requests next to good ones, and a
clean stop on SIGTERM. Skipped, with the reason, where PyTriton cannot serve (not installed, or NumPy >= 2)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fastdiff.errors import InvalidInput, ServingUnavailable
from fastdiff.serve.server import check_serving_available, free_ports, prefer_own_libpython

try:
    check_serving_available()
except ServingUnavailable as e:
    pytest.skip(str(e), allow_module_level=True)

from fastdiff.serve.client import Client  # noqa: E402
from fastdiff.serve.model import IMAGES, LABELS, SEED, STEPS, ServedModel  # noqa: E402
from fastdiff.serve.server import MODEL_NAME, Server  # noqa: E402
from tests.tolerances import SERVED_LEVELS_ATOL  # noqa: E402

#: long enough that requests sent together from threads land in one batch even on a loaded 2-core machine.
QUEUE_DELAY_US = 200_000
#: seconds the SIGTERM test waits for the server to start (model load + tritonserver: ~5 s here) and to stop.
START_S, STOP_S = 120, 60
#: what `serve` prints once Triton serves the model
READY_PHRASE = "as 'fastdiff' at"




@pytest.fixture(scope="module")
def served(tiny_dir):
    return ServedModel(tiny_dir, steps=3)


@pytest.fixture(scope="module")
def server(served):
    http, grpc, metrics = free_ports(3)
    with Server(served, http, grpc, metrics, max_batch=16, max_queue_delay_us=QUEUE_DELAY_US) as s:
        yield s
    assert not s.is_alive()


def raw_infer(server, **inputs):
    from pytriton.client import ModelClient

    with ModelClient(server.http_url, MODEL_NAME, init_timeout_s=30) as c:
        return c.infer_batch(**inputs)


def test_prefer_own_libpython_puts_libdir_first(monkeypatch):
    import sysconfig

    monkeypatch.setenv("LD_LIBRARY_PATH", f"/somewhere/else{os.pathsep}{sysconfig.get_config_var('LIBDIR')}")
    libdir = prefer_own_libpython()
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/somewhere/else"]


def test_client_gets_the_served_models_images(server, served):
    with Client(server.grpc_url) as c:
        images = c.sample(labels=[3, 1, 3], seed=11)
    ref = served.infer([{LABELS: np.array([[3], [1], [3]]), SEED: np.full((3, 1), 11)}])[0][IMAGES]
    assert images.shape == (3, *served.image_shape) and images.dtype == np.uint8
    assert int(np.abs(images.astype(int) - ref).max()) <= SERVED_LEVELS_ATOL
    with Client(server.http_url) as c:  # HTTP too, with steps overridden
        assert c.sample(labels=[3], seed=11, steps=1).shape == (1, *served.image_shape)


def test_concurrent_requests_are_batched_and_keep_their_images(server, served):
    """Requests sent together are batched by Triton (its statistics say so) and each gets its own images."""
    seeds = list(range(100, 108))
    results, errors = {}, []

    def ask(seed):
        try:
            with Client(server.http_url) as c:
                results[seed] = c.sample(labels=[seed % 10], seed=seed)
        except Exception as e:  # reported below, with the seed
            errors.append((seed, e))

    before = server.statistics()
    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.statistics()
    assert not errors, errors
    executions = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == len(seeds)
    assert executions < len(seeds), "Triton ran every request alone: dynamic batching did not batch"
    for s in seeds:
        alone = served.infer([{LABELS: np.array([[s % 10]]), SEED: np.array([[s]])}])[0][IMAGES]
        assert int(np.abs(results[s].astype(int) - alone).max()) <= SERVED_LEVELS_ATOL, f"seed {s}"


@pytest.mark.parametrize("inputs, words", [
    ({LABELS: np.array([[1.0]], np.float32), SEED: np.array([[0]], np.int64)}, "expects 'INT64'"),
    ({LABELS: np.array([[1, 2]], np.int64), SEED: np.array([[0]], np.int64)}, "labels"),
    ({LABELS: np.array([[1]], np.int64)}, "seed"),
    ({LABELS: np.array([[12]], np.int64), SEED: np.array([[0]], np.int64)}, "labels must be in [0, 9], got [12]"),
    ({LABELS: np.array([[1]], np.int64), SEED: np.array([[0]], np.int64), STEPS: np.array([[0]], np.int32)},
     "steps must be integers in [1, 1000], got [0]"),
    ({LABELS: np.array([[1]], np.int64), SEED: np.array([[0]], np.int64), "guidance": np.array([[np.nan]], np.float32)},
     "guidance must be finite"),
])
def test_bad_requests_come_back_as_triton_errors(server, inputs, words):
    from pytriton.client.exceptions import PyTritonClientError

    with pytest.raises(PyTritonClientError) as e:
        raw_infer(server, **inputs)
    assert words in str(e.value)
    with Client(server.grpc_url) as c:  # and the server keeps serving
        assert c.sample(labels=[1], seed=0).shape[0] == 1


def test_bad_requests_do_not_disturb_good_ones_batched_with_them(server):
    good, bad = {}, []

    def ask_good(seed):
        with Client(server.grpc_url) as c:
            good[seed] = c.sample(labels=[seed % 10], seed=seed)

    def ask_bad():
        with Client(server.grpc_url) as c:
            try:
                c.sample(labels=[77], seed=0)
            except InvalidInput as e:
                bad.append(str(e))

    threads = [threading.Thread(target=ask_bad)] + [threading.Thread(target=ask_good, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(good) == list(range(4))
    assert len(bad) == 1 and "labels must be in [0, 9], got [77]" in bad[0], bad


def test_a_client_that_gives_up_mid_request_does_not_disturb_others(server, served):
    """A client that stops waiting (its timeout, then its connection closed) while its request is batched with
    another's: the other still gets its image, and the server keeps serving."""
    from pytriton.client import ModelClient
    from pytriton.client.exceptions import PyTritonClientTimeoutError

    other = {}

    def ask():
        with Client(server.grpc_url) as c:
            other["images"] = c.sample(labels=[4], seed=9, steps=3)

    quitter = ModelClient(server.http_url, MODEL_NAME, init_timeout_s=30, inference_timeout_s=0.05)
    quitter.wait_for_model(30)
    t = threading.Thread(target=ask)
    t.start()
    with pytest.raises(PyTritonClientTimeoutError):
        # QUEUE_DELAY_US alone outlasts the 50 ms timeout: it gives up while its request waits in the batch
        quitter.infer_batch(labels=np.array([[5]], np.int64), seed=np.array([[1]], np.int64))
    quitter.close()
    t.join()
    alone = served.infer([{LABELS: np.array([[4]]), SEED: np.array([[9]]), STEPS: np.array([[3]], np.int32)}])
    assert int(np.abs(other["images"].astype(int) - alone[0][IMAGES]).max()) <= SERVED_LEVELS_ATOL
    with Client(server.grpc_url) as c:
        assert c.sample(labels=[1], seed=0).shape[0] == 1


def test_request_command_writes_the_png(server, tmp_path, capsys):
    from PIL import Image

    from fastdiff.cli import main

    out = tmp_path / "three.png"
    assert main(["request", "--url", server.grpc_url, "--labels", "3", "--seed", "4", "--out", str(out)]) == 0
    with Client(server.grpc_url) as c:
        expected = c.sample(labels=[3], seed=4)[0, ..., 0]
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    assert "wrote" in capsys.readouterr().out


def test_serve_command_stops_cleanly_on_sigterm(tiny_dir):
    """The real command in its own process: it must start (the libpython fix is what lets the stub start on a
    machine with several Pythons) and exit 0 on SIGTERM."""
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastdiff", "serve", "--model", str(tiny_dir), "--steps", "2", "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
    # tritonserver's log shares the pipe and may leave a line unfinished before ours: look for the phrase anywhere,
    # and read in a thread so the deadline holds even when nothing more is written
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + START_S
        while not any(READY_PHRASE in line for line in seen) and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert any(READY_PHRASE in line for line in seen), "".join(seen[-30:])
        with Client(f"grpc://127.0.0.1:{grpc}") as c:
            assert c.sample(labels=[2], seed=0).shape[0] == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_S)
        reader.join(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())
    assert proc.returncode == 0, "".join(seen[-30:])
    assert any("stopped" in line for line in seen[-20:])
