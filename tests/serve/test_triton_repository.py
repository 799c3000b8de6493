"""``python -m fastdiff.export MODEL --format triton``: the model repository's files, every ``config.pbtxt`` parsed
by Triton's own model-config protobuf (shipped with tritonclient), and the Python-backend sampling model loaded
and asked for images in the ``tritonserver`` PyTriton bundles (its onnxruntime backend is not bundled, so only the
Python model is loaded there)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from fastdiff.errors import InvalidInput
from fastdiff.export.triton_repository import NETWORK_MODEL, SAMPLER_MODEL, export_triton
from fastdiff.serve.model import IMAGES, LABELS, SEED, ServedModel
from fastdiff.serve.server import free_ports
from tests.tolerances import SERVED_LEVELS_ATOL

#: seconds tritonserver may take to load the Python model (it imports torch and fastdiff: ~10 s here, loaded).
LOAD_S = 120
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from tests.export.tiny_models import tiny_label_model

    out = tmp_path_factory.mktemp("triton_repo")
    export_triton(tiny_label_model(), out, steps=3, guidance=2.0, max_batch=8, max_queue_delay_us=500,
                  parity=False, progress=False)
    return out


def parse_config(path: Path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (the serve extra) parses "
                             "config.pbtxt with Triton's own protobuf")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_repository_layout(repo):
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert f"{NETWORK_MODEL}/config.pbtxt" in files and f"{NETWORK_MODEL}/1/model.onnx" in files
    assert f"{SAMPLER_MODEL}/config.pbtxt" in files and f"{SAMPLER_MODEL}/1/model.py" in files


def test_configs_parse_with_tritons_protobuf(repo):
    net = parse_config(repo / NETWORK_MODEL / "config.pbtxt")
    assert net.name == NETWORK_MODEL and net.platform == "onnxruntime_onnx" and net.max_batch_size == 0
    assert [i.name for i in net.input] and all(d == -1 or d > 0 for i in net.input for d in i.dims)
    sampler = parse_config(repo / SAMPLER_MODEL / "config.pbtxt")
    assert sampler.backend == "python" and sampler.max_batch_size == 8
    assert sampler.dynamic_batching.max_queue_delay_microseconds == 500
    inputs = {i.name: i for i in sampler.input}
    assert set(inputs) == {"labels", "seed", "steps", "guidance"}
    assert inputs["steps"].optional and not inputs["labels"].optional
    assert [tuple(o.dims) for o in sampler.output] == [(8, 8, 1)]
    assert sampler.parameters["network"].string_value == f"../{NETWORK_MODEL}/1/model.onnx"
    assert sampler.parameters["steps"].string_value == "3"


def test_refuses_what_it_cannot_export(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(InvalidInput, match="label-conditioned"):
        export_triton(tmp_path / "pipe", tmp_path / "out")
    with pytest.raises(InvalidInput, match="max_batch"):
        export_triton("digits", tmp_path / "out", max_batch=0)


@pytest.mark.parametrize("argv", [["export", "digits", "--format", "triton", "--sampler", "onestep", "--out", "r"],
                                  ["export", "digits", "--format", "triton", "--max-batch", "0", "--out", "r"]],
                         ids=["sampler", "max-batch"])
def test_cli_errors_are_one_line(argv, capsys, tmp_path, monkeypatch):
    from tests.cli_helpers import one_line_error

    monkeypatch.chdir(tmp_path)
    one_line_error(argv, capsys)
    assert not (tmp_path / "r").exists()




@pytest.mark.slow  # tritonserver imports torch + fastdiff into its stub: ~10 s idle, 40 s on a loaded 2-core machine
def test_python_model_serves_in_the_bundled_tritonserver(repo, tmp_path):
    from fastdiff.errors import ServingUnavailable
    from fastdiff.serve.server import check_serving_available

    try:
        check_serving_available()
    except ServingUnavailable as e:
        pytest.skip(str(e))
    import pytriton
    import tritonclient.http as http

    bundle = Path(pytriton.__file__).parent / "tritonserver"
    server_dir = tmp_path / "tritonserver"
    shutil.copytree(bundle, server_dir, ignore=shutil.ignore_patterns("python_backend_stubs"))
    stub = bundle / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    shutil.copy(stub, server_dir / "backends" / "python" / "triton_python_backend_stub")
    http_port, grpc_port, metrics_port = free_ports(3)
    env = dict(os.environ)
    # as fastdiff.serve.server does: this Python's libpython first; the stub embeds the Python found on PATH, and
    # its sys.path starts with the working directory (this checkout's fastdiff)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([sysconfig.get_config_var("LIBDIR"),
                                              str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = tmp_path / "tritonserver.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [str(server_dir / "bin" / "tritonserver"), f"--model-repository={repo}",
             f"--backend-directory={server_dir / 'backends'}", "--model-control-mode=explicit",
             f"--load-model={SAMPLER_MODEL}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
             f"--metrics-port={metrics_port}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
             "--metrics-address=127.0.0.1"], env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.is_model_ready(SAMPLER_MODEL):
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        assert client.is_model_ready(SAMPLER_MODEL), log.read_text()[-4000:]

        def infer(labels, seed):
            inputs = [http.InferInput(LABELS, [len(labels), 1], "INT64"), http.InferInput(SEED, [len(labels), 1],
                                                                                          "INT64")]
            inputs[0].set_data_from_numpy(np.array(labels, np.int64).reshape(-1, 1))
            inputs[1].set_data_from_numpy(np.full((len(labels), 1), seed, np.int64))
            return client.infer(SAMPLER_MODEL, inputs).as_numpy(IMAGES)

        images = infer([3, 1], 7)
        ref = ServedModel(repo / NETWORK_MODEL / "1" / "model.onnx", steps=3, guidance=2.0)
        expected = ref.infer([{LABELS: np.array([[3], [1]]), SEED: np.full((2, 1), 7)}])[0][IMAGES]
        assert images.shape == expected.shape
        assert int(np.abs(images.astype(int) - expected).max()) <= SERVED_LEVELS_ATOL
        with pytest.raises(Exception, match=r"labels must be in \[0, 9\]"):
            infer([10], 0)
        assert infer([2], 0).shape[0] == 1  # still serving
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
