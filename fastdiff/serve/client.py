"""``fastdiff.serve.Client``: images from a ``python -m fastdiff serve`` server (or any Triton serving the
``fastdiff`` model contract of :mod:`fastdiff.serve.model`), over HTTP or gRPC through PyTriton's ``ModelClient``.

    with Client("grpc://127.0.0.1:8001") as c:
        images = c.sample(labels=[3, 1, 4], seed=0)          # (3, 16, 16, 1) uint8

One ``Client`` holds one connection and is not thread-safe: make one per thread.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence

import numpy as np

from fastdiff._checks import check_int, check_number
from fastdiff.errors import InvalidInput, ServingUnavailable
from fastdiff.serve.model import (
    GUIDANCE,
    IMAGES,
    LABELS,
    MAX_STEPS,
    PROMPT,
    REQUEST_ID_PARAMETER,
    RETRY_MARKER,
    SEED,
    STEPS,
)

#: how many times a valid request is sent again after Triton batched it with an invalid one (each retry lands in
#: a new batch; three in a row means something else is wrong).
MAX_RETRIES = 3


class Client:
    """A client of the served ``fastdiff`` model.

    Args:
        url: ``grpc://host:8001`` or ``http://host:8000`` (a bare ``host:port`` is HTTP).
        model: the served model's name.
        timeout_s: how long to wait for the server to be ready and for one request.
    """

    def __init__(self, url: str = "grpc://127.0.0.1:8001", model: str = "fastdiff", timeout_s: float = 120.0):
        try:
            from pytriton.client import ModelClient
        except ImportError as e:
            raise ServingUnavailable(f"the client needs PyTriton ({e}); install the serving extra: "
                                     "pip install -e '.[serve]'") from e
        self.url, self.model = url, model
        timeout_s = check_number("timeout_s", timeout_s, 0.1)
        with warnings.catch_warnings():  # gRPC applies the timeout to inference only, and PyTriton warns so
            warnings.simplefilter("ignore")
            self._client = ModelClient(url, model, init_timeout_s=timeout_s, inference_timeout_s=timeout_s)

    def sample(self, labels: Sequence[int] | None = None, prompt: str | Sequence[str] | None = None, seed: int = 0,
               steps: int | None = None, guidance: float | None = None) -> np.ndarray:
        """Images ``(n, H, W, C)`` uint8, one per label (label models) or prompt (text models).

        Raises :class:`InvalidInput` for a request the server refuses (its message says why) and
        :class:`ServingUnavailable` when the server cannot be reached."""
        if (labels is None) == (prompt is None):
            raise InvalidInput("pass exactly one of labels= (label models) or prompt= (text models)")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise InvalidInput(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
            n = len(prompts)
            inputs = {PROMPT: np.array([[p.encode("utf-8")] for p in prompts], dtype=object)}
        else:
            labels = [labels] if isinstance(labels, int) else list(labels)
            if not labels:
                raise InvalidInput("labels must hold at least one label")
            n = len(labels)
            inputs = {LABELS: np.array([check_int("label", v) for v in labels], np.int64).reshape(n, 1)}
        inputs[SEED] = np.full((n, 1), check_int("seed", seed, -(2**63), 2**63 - 1), np.int64)
        if steps is not None:
            inputs[STEPS] = np.full((n, 1), check_int("steps", steps, 1, MAX_STEPS), np.int32)
        if guidance is not None:
            inputs[GUIDANCE] = np.full((n, 1), check_number("guidance", guidance), np.float32)
        return self.infer(inputs)[IMAGES]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send raw inputs (the names and dtypes of :mod:`fastdiff.serve.model`); returns the outputs."""
        from pytriton.client.exceptions import PyTritonClientError, PyTritonClientInferenceServerError

        parameters = {REQUEST_ID_PARAMETER: uuid.uuid4().hex}
        for attempt in range(MAX_RETRIES + 1):
            try:
                return self._client.infer_batch(parameters=parameters, **inputs)
            except PyTritonClientInferenceServerError as e:
                message = _server_message(str(e))
                ours = parameters[REQUEST_ID_PARAMETER] in message
                if RETRY_MARKER in message and not ours and attempt < MAX_RETRIES:
                    continue  # valid, but batched with an invalid request: send it again
                raise InvalidInput(f"the server refused the request: {message}") from None
            except PyTritonClientError as e:
                raise ServingUnavailable(f"cannot get images from {self.url} (model {self.model!r}): {e}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _server_message(text: str) -> str:
    """The useful line of a Triton error: PyTriton sends the model's whole traceback; its last line that names the
    error is what the model said."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "BatchRejected:" in line or "InvalidInput:" in line:
            return line.split(":", 1)[1].strip()
    return text.strip()
