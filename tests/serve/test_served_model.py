"""The served model's request contract without a server: per-row seeding, batching independence, grouping by
steps / guidance, the reference images of ``python -m fastdiff sample``, and the checks on bad requests."""

from __future__ import annotations

import numpy as np
import pytest

from fastdiff.errors import InvalidInput
from fastdiff.serve.model import (
    GUIDANCE,
    IMAGES,
    LABELS,
    MAX_STEPS,
    PROMPT,
    RETRY_MARKER,
    SEED,
    STEPS,
    BatchRejected,
    ServedModel,
)
from tests.tolerances import SERVED_LEVELS_ATOL


def label_request(labels, seed, steps=None, guidance=None):
    n = len(labels)
    req = {LABELS: np.array(labels, np.int64).reshape(n, 1), SEED: np.full((n, 1), seed, np.int64)}
    if steps is not None:
        req[STEPS] = np.full((n, 1), steps, np.int32)
    if guidance is not None:
        req[GUIDANCE] = np.full((n, 1), guidance, np.float32)
    return req


def levels_apart(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ServedModel(tiny_dir, steps=4)


def test_served_digit_is_the_sample_commands_digit(tiny, tiny_dir):
    """`request --labels 3 --seed S` must draw what `sample --labels 3 --seed S` draws (its own reference)."""
    from fastdiff.cli.sample import draw
    from fastdiff.models import load

    seed = int(np.random.default_rng().integers(0, 2**31))
    ours = tiny.infer([label_request([3, 7], seed)])[0][IMAGES]
    ref, *_ = draw(load(tiny_dir), [3, 7], 1, seed, steps=tiny.steps, progress=False)
    assert ours.shape == (2, *tiny.image_shape) and ours.dtype == np.uint8
    for i in range(2):
        assert levels_apart(ours[i, ..., 0], np.asarray(ref[i])) <= SERVED_LEVELS_ATOL, f"seed {seed}, row {i}"


def test_a_request_does_not_depend_on_its_batch(tiny):
    rng = np.random.default_rng()
    seed = int(rng.integers(0, 2**31))
    labels = rng.integers(0, tiny.num_classes, 3).tolist()
    alone = tiny.infer([label_request(labels, seed)])[0][IMAGES]
    others = [label_request(rng.integers(0, tiny.num_classes, 2).tolist(), int(rng.integers(0, 2**31)))
              for _ in range(3)]
    batched = tiny.infer([others[0], label_request(labels, seed), others[1], others[2]])[1][IMAGES]
    assert levels_apart(alone, batched) <= SERVED_LEVELS_ATOL, f"seed {seed}, labels {labels}"


def test_rows_differ_and_seeds_matter(tiny):
    same_label_twice = tiny.infer([label_request([1, 1], 5)])[0][IMAGES]
    assert levels_apart(same_label_twice[0], same_label_twice[1]) > 0  # the second row has its own noise
    other_seed = tiny.infer([label_request([1], 6)])[0][IMAGES]
    assert levels_apart(same_label_twice[0], other_seed[0]) > 0


def test_rows_with_other_steps_and_guidance_are_grouped(tiny):
    """One Triton batch holding different steps / guidance: each request gets what it asked for."""
    a, b, c = label_request([2], 1, steps=2), label_request([2], 1, steps=5), label_request([2], 1, guidance=3.0)
    batched = [r[IMAGES] for r in tiny.infer([a, b, c])]
    alone = [tiny.infer([r])[0][IMAGES] for r in (a, b, c)]
    for x, y in zip(batched, alone, strict=True):
        assert levels_apart(x, y) <= SERVED_LEVELS_ATOL
    assert levels_apart(alone[0], alone[1]) > 0 and levels_apart(alone[1], alone[2]) > 0


@pytest.mark.parametrize("change, words", [
    ({LABELS: np.array([[99]], np.int64)}, "labels must be in [0, 9]"),
    ({LABELS: np.array([[-1]], np.int64)}, "labels must be in [0, 9]"),
    ({LABELS: np.array([[1.0]], np.float32)}, "labels must be integers"),
    ({STEPS: np.array([[0]], np.int32)}, f"steps must be integers in [1, {MAX_STEPS}]"),
    ({STEPS: np.array([[10**6]], np.int32)}, f"steps must be integers in [1, {MAX_STEPS}]"),
    ({GUIDANCE: np.array([[np.nan]], np.float32)}, "guidance must be finite"),
    ({LABELS: np.zeros((0, 1), np.int64), SEED: np.zeros((0, 1), np.int64)}, "is empty"),
    ({SEED: np.zeros((2, 1), np.int64)}, "must have shape (1, 1)"),
    ({SEED: np.zeros((0, 1), np.int64)}, "must have shape (1, 1)"),
    ({LABELS: np.int64(1)}, "got a scalar"),
])
def test_bad_requests_are_refused_with_the_reason(tiny, change, words):
    with pytest.raises(BatchRejected, match="invalid request: ") as e:
        tiny.infer([{**label_request([1], 0), **change}])
    assert words in str(e.value)
    assert isinstance(e.value, InvalidInput)


def test_a_batch_with_an_invalid_request_names_it_and_lets_the_others_retry(tiny):
    with pytest.raises(BatchRejected) as e:
        tiny.infer([label_request([1], 0), label_request([42], 0)], request_ids=["good", "bad"])
    msg = str(e.value)
    assert "request 2 (id bad): labels must be in [0, 9], got [42]" in msg and RETRY_MARKER in msg
    assert "good" not in msg
    assert tiny.infer([label_request([1], 0)])[0][IMAGES].shape[0] == 1  # and it still serves


def test_prompts_on_a_tiny_pipeline(tmp_path):
    """Text models: the prompt input path on a tiny random Stable Diffusion pipeline (no download)."""
    from diffusers import EulerDiscreteScheduler

    from tests.pipelines.tiny_pipelines import make_sd, sched

    served = ServedModel(make_sd(tmp_path / "vocab", sched(EulerDiscreteScheduler)), steps=3, guidance=2.0)
    assert [t.name for t in served.inputs()][0] == PROMPT

    def prompt_request(prompts, seed):
        return {PROMPT: np.array([[p.encode()] for p in prompts], dtype=object),
                SEED: np.full((len(prompts), 1), seed, np.int64)}

    alone = served.infer([prompt_request(["a red cat"], 3)])[0][IMAGES]
    batched = served.infer([prompt_request(["dog", "a red cat"], 8), prompt_request(["a red cat"], 3)])
    assert alone.shape == (1, *served.image_shape) and alone.dtype == np.uint8
    assert levels_apart(alone, batched[1][IMAGES]) <= SERVED_LEVELS_ATOL
    assert levels_apart(alone[0], batched[0][IMAGES][1]) > 0  # another seed, another image
    with pytest.raises(BatchRejected, match="not UTF-8"):
        served.infer([{PROMPT: np.array([[b"\xff\xfe"]], dtype=object), SEED: np.zeros((1, 1), np.int64)}])


@pytest.mark.parametrize("argv", [["serve", "--http-port", "0"], ["serve", "--max-batch", "0"],
                                  ["serve", "--steps", "1001"], ["request", "--out", "x.jpg", "--labels", "1"],
                                  ["request", "--out", "x.png"], ["request", "--labels", "1", "--prompt", "a"],
                                  ["request", "--labels", "1", "--timeout", "1", "--url", "grpc://127.0.0.1:1"]],
                         ids=lambda a: " ".join(a))
def test_serve_and_request_errors_are_one_line(argv, capsys, tmp_path, monkeypatch):
    from tests.cli_helpers import one_line_error

    monkeypatch.chdir(tmp_path)
    one_line_error(argv, capsys)


def test_serve_refuses_an_environment_it_cannot_serve_from(capsys, monkeypatch):
    """Without PyTriton, or with NumPy 2 (the stub would pass empty tensors), `serve` says so before loading."""
    from fastdiff.errors import ServingUnavailable
    from fastdiff.serve import server
    from tests.cli_helpers import one_line_error

    try:
        server.check_serving_available()
    except ServingUnavailable:
        pass
    else:
        monkeypatch.setattr(server.np, "__version__", "2.4.6")
    assert "serv" in one_line_error(["serve", "--model", "digits"], capsys).lower()
