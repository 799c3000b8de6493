"""The served model: a batch of Triton requests (each a dict of NumPy arrays) in, one ``images`` array per request out.

Nothing here imports PyTriton, so the request contract is tested without a server. One row of a request is one
image. Inputs, each with the batch dimension first (``n`` rows):

- ``labels`` (INT64, ``(n, 1)``) for label models, or ``prompt`` (BYTES, ``(n, 1)``, UTF-8) for text pipelines;
- ``seed`` (INT64, ``(n, 1)``);
- optional ``steps`` (INT32, ``(n, 1)``) and ``guidance`` (FP32, ``(n, 1)``) overriding the server's defaults.

Output ``images`` (UINT8, ``(n, H, W, C)``). A row's image depends only on its own request: its starting noise is
drawn from its own generator (:func:`fastdiff.models.generate.make_noise`), seeded as ``python -m fastdiff sample``
seeds it -- the ``j``-th row asking for label ``k`` with seed ``s`` starts from
``sample_seed(stream_seed(s, "sample"), k * 10000 + j)`` -- so ``request --labels 3 --seed 0`` draws the image
``sample --labels 3 --seed 0`` draws, whatever else Triton batched it with. Prompt rows use the row's index among
the request's rows with the same prompt and seed. Rows of one Triton batch that ask for different ``steps`` /
``guidance`` cannot share a sampler call; they are grouped by those two values and each group runs as one batch.

A request with a bad value (a label out of range, steps outside [1, MAX_STEPS], a non-finite guidance, an empty
batch, bytes that are not UTF-8) makes :meth:`ServedModel.infer` raise :class:`BatchRejected`. PyTriton answers a
raised error for every request of the batch Triton formed, so the message names each invalid request and tells
the valid ones they are safe to send again (:class:`fastdiff.serve.Client` does so by itself).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff.errors import InvalidInput

LABELS, PROMPT, SEED, STEPS, GUIDANCE, IMAGES = "labels", "prompt", "seed", "steps", "guidance", "images"
#: the most steps one request may ask for: every scheduler here plans at most its 1000 training timesteps.
MAX_STEPS = 1000
#: the marker a rejected batch's message carries, and the request parameter naming a request in it.
RETRY_MARKER = "[fastdiff: valid requests in this batch may be sent again]"
REQUEST_ID_PARAMETER = "fastdiff_request_id"


class BatchRejected(InvalidInput):
    """One or more requests of a Triton batch are invalid; the message names each (and ``problems`` lists them)."""

    def __init__(self, problems: list[tuple[int, str | None, str]], batch_size: int):
        self.problems = problems
        if batch_size == 1:
            msg = f"invalid request: {problems[0][2]}"
        else:
            parts = [f"request {i + 1}" + (f" (id {rid})" if rid else "") + f": {p}" for i, rid, p in problems]
            msg = (f"{len(problems)} of the {batch_size} requests Triton batched together are invalid: "
                   + "; ".join(parts) + ". The other requests failed only because they shared the batch. "
                   + RETRY_MARKER)
        super().__init__(msg)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton declares it (``shape`` without the batch dimension)."""

    name: str
    dtype: type
    shape: tuple[int, ...]
    optional: bool = False


def is_pipeline_dir(path) -> bool:
    """A diffusers pipeline folder (``model_index.json``) rather than a fastdiff model folder."""
    try:
        return (Path(os.fspath(path)) / "model_index.json").is_file()
    except TypeError:
        return False


def is_exported_file(path) -> bool:
    """An exported ``.onnx`` / TensorRT engine file (served through its model backend)."""
    return isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).suffix in (".onnx", ".engine", ".plan") \
        and Path(os.fspath(path)).is_file()


@dataclass
class _Row:
    request: int
    row: int
    cond: object  # int label or str prompt
    noise_seed: int
    noise_index: int
    steps: int
    guidance: float


class ServedModel:
    """A model and its sampler, fixed at start-up, answering batches of requests.

    Args:
        model: an embedded name (``"digits"``), a fastdiff model folder, a ``LabelConditionedUNet``, a label model
            exported to ``.onnx`` / a TensorRT engine by ``python -m fastdiff.export``, a diffusers
            StableDiffusion(XL) pipeline or a pipeline folder (text models: ``prompt`` input).
        scheduler / backend / device / compile: as :class:`fastdiff.Sampler`.
        steps / guidance: the defaults for requests that do not send them (None: the model's own; 20 and 7.5 for
            pipelines).
    """

    def __init__(self, model="digits", scheduler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, backend: str = "auto", device=None, compile: bool = False):
        from fastdiff._checks import check_int, check_number
        from fastdiff.pipelines import is_diffusers_pipeline

        if is_pipeline_dir(model):
            from diffusers import DiffusionPipeline

            model = DiffusionPipeline.from_pretrained(os.fspath(model))
        self.text = is_diffusers_pipeline(model)
        if self.text:
            from fastdiff.sampler import Sampler

            pipe = model.to(device) if device is not None else model
            self.sampler = Sampler(pipe, scheduler=scheduler, backend=backend, compile=compile)
            unet = pipe.unet.config
            scale = getattr(pipe, "vae_scale_factor", 8)
            self.latent_shape = (unet.in_channels, unet.sample_size, unet.sample_size)
            self.image_shape = (unet.sample_size * scale, unet.sample_size * scale, 3)
            self.num_classes = None
            defaults = {"num_inference_steps": 20, "guidance_scale": 7.5}
            self.name = type(pipe).__name__
        elif is_exported_file(model):
            from fastdiff.sampler import Sampler

            self.sampler = Sampler(os.fspath(model), scheduler=scheduler, backend=backend, device=device)
            runner, labels = self.sampler.runner, self.sampler.label_model
            if labels is None:
                raise InvalidInput(f"{os.fspath(model)} is not a label-conditioned export (no label table); serve "
                                   "a label model exported by python -m fastdiff.export")
            self.latent_shape = (runner.in_channels, runner.sample_size, runner.sample_size)
            self.image_shape = (runner.sample_size, runner.sample_size, runner.in_channels)
            self.num_classes = int(labels.num_classes)
            info = getattr(runner, "info", None)
            defaults = dict(getattr(info, "defaults", None) or {})
            self.name = getattr(info, "model", None) or Path(os.fspath(model)).stem
        else:
            from fastdiff.models import load
            from fastdiff.models.generate import make_sampler

            if isinstance(model, (str, os.PathLike)):
                model = load(model, device=device)
            self.sampler = make_sampler(model, scheduler=scheduler, backend=backend, compile=compile)
            cfg = model.unet.config
            self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
            self.image_shape = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
            self.num_classes = int(model.num_classes)
            defaults = getattr(model, "defaults", None) or {}
            self.name = getattr(model, "name", "model")
        self.steps = check_int("steps", steps if steps is not None else int(defaults.get("num_inference_steps", 20)),
                               1, MAX_STEPS)
        self.guidance = check_number("guidance", guidance if guidance is not None
                                     else float(defaults.get("guidance_scale", 1.0)))

    # ----- the Triton contract --------------------------------------------------------------------------------
    def inputs(self) -> list[TensorSpec]:
        cond = TensorSpec(PROMPT, bytes, (1,)) if self.text else TensorSpec(LABELS, np.int64, (1,))
        return [cond, TensorSpec(SEED, np.int64, (1,)), TensorSpec(STEPS, np.int32, (1,), optional=True),
                TensorSpec(GUIDANCE, np.float32, (1,), optional=True)]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(IMAGES, np.uint8, self.image_shape)]

    def describe(self) -> str:
        cond = "prompt" if self.text else f"labels 0-{self.num_classes - 1}"
        sched = getattr(self.sampler.scheduler, "name", "?")
        return f"{self.name} ({cond}; {sched}, {self.steps} steps, CFG {self.guidance:g} by default)"

    # ----- checking ---------------------------------------------------------------------------------------------
    def problem(self, request: Mapping[str, np.ndarray]) -> str | None:
        """What is wrong with one request, or None. Triton has already checked dtypes, shapes and required
        inputs against :meth:`inputs`; this checks values (and the shapes again, for callers without Triton)."""
        cond_name = PROMPT if self.text else LABELS
        if cond_name not in request or SEED not in request:
            return f"a request needs the inputs {cond_name!r} and {SEED!r}"
        cond = np.asarray(request[cond_name])
        if cond.ndim == 0:
            return f"{cond_name!r} must have shape (n, 1) (one row per image), got a scalar"
        n = len(cond)
        if n == 0:
            return f"{cond_name!r} is empty: send at least one row"
        for name in (cond_name, SEED, STEPS, GUIDANCE):
            shape = np.shape(request[name]) if name in request else (n, 1)
            if shape not in ((n,), (n, 1)):
                return f"{name!r} must have shape ({n}, 1) (one value per row), got {shape}"
        if self.text:
            for i, v in enumerate(cond.reshape(-1)):
                if not isinstance(v, (bytes, np.bytes_, str)):
                    return f"prompt row {i} is not text ({type(v).__name__})"
                if isinstance(v, (bytes, np.bytes_)):
                    try:
                        bytes(v).decode("utf-8")
                    except UnicodeDecodeError:
                        return f"prompt row {i} is not UTF-8 text"
        else:
            if not np.issubdtype(cond.dtype, np.integer):
                return f"labels must be integers (INT64), got {cond.dtype}"
            bad = cond[(cond < 0) | (cond >= self.num_classes)]
            if bad.size:
                return f"labels must be in [0, {self.num_classes - 1}], got {bad.reshape(-1)[:5].tolist()}"
        if not np.issubdtype(np.asarray(request[SEED]).dtype, np.integer):
            return f"seed must be integers (INT64), got {np.asarray(request[SEED]).dtype}"
        if STEPS in request:
            steps = np.asarray(request[STEPS])
            bad = steps[(steps < 1) | (steps > MAX_STEPS)] if np.issubdtype(steps.dtype, np.integer) else steps
            if bad.size:
                return f"steps must be integers in [1, {MAX_STEPS}], got {bad.reshape(-1)[:5].tolist()}"
        if GUIDANCE in request:
            g = np.asarray(request[GUIDANCE], dtype=np.float64)
            if not np.isfinite(g).all():
                return f"guidance must be finite, got {g[~np.isfinite(g)].reshape(-1)[:5].tolist()}"
        return None

    # ----- sampling ---------------------------------------------------------------------------------------------
    def _rows(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[_Row]:
        from fastdiff.models.generate import LABEL_STRIDE, SAMPLE_STREAM, stream_seed

        rows = []
        for r, req in enumerate(requests):
            conds = np.asarray(req[PROMPT if self.text else LABELS]).reshape(-1)
            seeds = np.asarray(req[SEED]).reshape(-1)
            n = len(conds)
            steps = np.asarray(req[STEPS]).reshape(-1).tolist() if STEPS in req else [self.steps] * n
            # an FP32 input's value as sent; the default exactly as given (1.3 stays 1.3, as the sample command has it)
            guidance = np.asarray(req[GUIDANCE]).reshape(-1).tolist() if GUIDANCE in req else [self.guidance] * n
            seen: dict[tuple, int] = defaultdict(int)
            for j in range(n):
                cond = conds[j]
                cond = bytes(cond).decode("utf-8") if isinstance(cond, (bytes, np.bytes_)) else (
                    str(cond) if self.text else int(cond))
                key = (cond, int(seeds[j]))
                index = seen[key] + (cond * LABEL_STRIDE if not self.text else 0)
                seen[key] += 1
                rows.append(_Row(r, j, cond, stream_seed(int(seeds[j]), SAMPLE_STREAM), index, int(steps[j]),
                                 float(guidance[j])))
        return rows

    def _noise(self, rows: list[_Row]) -> torch.Tensor:
        from fastdiff.models.generate import make_noise

        return torch.cat([make_noise(row.noise_seed, [row.noise_index], self.latent_shape) for row in rows])

    @torch.no_grad()
    def _sample(self, rows: list[_Row], steps: int, guidance: float) -> np.ndarray:
        noise = self._noise(rows)
        s = self.sampler
        if self.text:
            images = s.sample(prompt=[row.cond for row in rows], latents=noise, num_inference_steps=steps,
                              guidance_scale=guidance, output_type="np", progress=False)
        else:
            labels = torch.tensor([row.cond for row in rows])
            images = s.sample(num_inference_steps=steps, guidance_scale=guidance, class_labels=labels.to(s.device),
                              latents=noise.to(s.device, s.dtype), output_type="np", progress=False)
        # as fastdiff.images.to_images makes PIL images: round to the nearest of 256 levels
        return (np.asarray(images) * 255).round().astype(np.uint8)

    def infer(self, requests: Sequence[Mapping[str, np.ndarray]],
              request_ids: Sequence[str | None] | None = None) -> list[dict[str, np.ndarray]]:
        """One ``{"images": (n, H, W, C) uint8}`` per request; raises :class:`BatchRejected` if any is invalid."""
        problems = [(i, (request_ids or [None] * len(requests))[i], p)
                    for i, p in enumerate(self.problem(req) for req in requests) if p]
        if problems:
            raise BatchRejected(problems, len(requests))
        rows = self._rows(requests)
        out = [np.empty((len(np.asarray(req[SEED])), *self.image_shape), np.uint8) for req in requests]
        groups: dict[tuple[int, float], list[_Row]] = defaultdict(list)
        for row in rows:
            groups[(row.steps, row.guidance)].append(row)
        for (steps, guidance), group in groups.items():
            for row, image in zip(group, self._sample(group, steps, guidance), strict=True):
                out[row.request][row.row] = image
        return [{IMAGES: images} for images in out]
