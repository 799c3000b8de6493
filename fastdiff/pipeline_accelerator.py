"""``fastdiff.accelerate(pipe)``: the same diffusers pipeline object, its denoising loop run by fastdiff.

    pipe = fastdiff.accelerate(StableDiffusionXLPipeline.from_pretrained(...).to("cuda"))
    image = pipe("a red fox", num_inference_steps=25).images[0]      # same call, same outputs
    fastdiff.restore(pipe)                                            # back to the original loop

The instance's class is swapped for a per-instance subclass with the same name whose ``__call__`` has the original
signature (``inspect.signature(pipe.__call__)`` is unchanged) and returns the original outputs
(``StableDiffusionPipelineOutput`` / ``StableDiffusionXLPipelineOutput`` or their tuples). Each call binds its
arguments like the original; when fastdiff can run them all (see :mod:`fastdiff.pipelines`), the loop runs through
fastdiff's fused step on ``pipe.unet`` (optimized in place with ``fastdiff.optimize`` unless the backend is the
plain ``"torch"`` reference or a model backend); otherwise the original ``__call__`` runs, with a one-time
:class:`FallbackWarning` that says why. A wrong image is never the fallback: anything fastdiff does not reproduce
exactly goes to the original loop.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.errors import InvalidInput
from fastdiff.loop import split_backend
from fastdiff.model_optimizer import optimize as optimize_unet
from fastdiff.model_optimizer import restore as restore_unet
from fastdiff.pipelines import (
    PipelineSampler,
    Unsupported,
    bind_call,
    call_reasons,
    class_reasons,
    is_diffusers_pipeline,
    pipeline_output,
)

log = logging.getLogger("fastdiff")
_STATE = "_fastdiff_state"


class FallbackWarning(UserWarning):
    """An accelerated pipeline ran its original denoising loop for a call; the message says why."""


@dataclass
class _State:
    sampler: PipelineSampler
    original_class: type
    unet: torch.nn.Module  # the UNet fastdiff.optimize ran on (restored by restore())
    optimized: bool = False
    warned: set = field(default_factory=set)

    def warn(self, pipe_name: str, reasons: list[str]) -> None:
        new = [r for r in reasons if r not in self.warned]
        if not new:
            return
        self.warned.update(new)
        warnings.warn(f"fastdiff.accelerate: {pipe_name} runs its own denoising loop for this call because "
                      + "; ".join(new) + " (this warning is shown once per reason)", FallbackWarning, stacklevel=3)


def _optimize_unet(unet: torch.nn.Module, backend: str) -> bool:
    """Run :func:`fastdiff.model_optimizer.optimize` on the UNet in place; returns whether it did. A failure (e.g. no
    kernel for this GPU) is logged and leaves the UNet as it was: accelerate() must still run the pipeline."""
    try:
        report = optimize_unet(unet, backend=backend)
    except Exception as e:  # noqa: BLE001
        log.warning("fastdiff.optimize failed on the UNet (%s: %s); it runs unoptimized", type(e).__name__, e)
        return False
    log.info("fastdiff.optimize on the UNet: %s", report)
    return True


def _restore_unet(unet: torch.nn.Module) -> None:
    try:
        restore_unet(unet)
    except Exception as e:  # noqa: BLE001 - restore() of the pipeline must not fail on its UNet
        log.warning("fastdiff.optimize's restore failed on the UNet (%s: %s)", type(e).__name__, e)


def _progress(pipe) -> bool:
    """Show fastdiff's progress bar unless the pipeline's was disabled (``pipe.set_progress_bar_config``)."""
    config = getattr(pipe, "_progress_bar_config", None)
    return not (isinstance(config, dict) and config.get("disable", False))


def _accelerated_call(original_call):
    @functools.wraps(original_call)  # keeps the signature (via __wrapped__) and the docstring
    def __call__(self, *args, **kwargs):
        state: _State | None = self.__dict__.get(_STATE)
        if state is None:
            return original_call(self, *args, **kwargs)
        try:
            values, extra = bind_call(self, args, kwargs)
        except TypeError:  # the original raises its own error for a bad call
            return original_call(self, *args, **kwargs)
        reasons = call_reasons(values, extra)
        if not reasons:
            try:
                with torch.no_grad():
                    images, nsfw = state.sampler.generate(values, progress=_progress(self))
                return pipeline_output(self, images, nsfw, values["return_dict"])
            except Unsupported as e:  # raised before any random number is drawn
                reasons = e.reasons
        state.warn(state.original_class.__name__, reasons)
        return original_call(self, *args, **kwargs)

    return __call__


def is_accelerated(pipe: Any) -> bool:
    return _STATE in getattr(pipe, "__dict__", {})


def accelerate(pipe, backend: str = "auto", cuda_graph: bool = False):
    """Make ``pipe(...)`` run its denoising loop through fastdiff; returns the same pipeline object.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (also as loaded by
            ``AutoPipelineForText2Image``), on the device and in the dtype it will run in.
        backend: ``"auto"``, a fused-step backend (``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``; the UNet runs in
            PyTorch) or a model backend (``"onnxruntime"``, ``"tensorrt"``), as for :class:`fastdiff.Sampler`.
            Except with ``"torch"`` (the plain reference path), a PyTorch UNet is passed to ``fastdiff.optimize``;
            a failure there is logged and the UNet runs as it is.
        cuda_graph: capture one denoising step in a CUDA graph and replay it for every step (CUDA only).

    Accelerating an accelerated pipeline replaces its settings. Undo with :func:`restore`.
    """
    if not is_diffusers_pipeline(pipe):
        raise InvalidInput(f"fastdiff.accelerate takes a diffusers pipeline, got {type(pipe).__name__}; for a UNet "
                           "use fastdiff.optimize, for sampling with a bare UNet fastdiff.Sampler")
    if is_accelerated(pipe):
        restore(pipe)
    reasons = class_reasons(pipe)  # the UNet's state (offload hooks, IP-Adapter weights) is checked per call
    if reasons:
        raise InvalidInput("fastdiff.accelerate cannot accelerate this pipeline: " + "; ".join(reasons))
    model_backend, _ = split_backend(backend, None)  # UnknownBackend for a bad name
    optimized = model_backend == "torch" and backend != "torch" and _optimize_unet(pipe.unet, backend)
    sampler = PipelineSampler(pipe, scheduler=None, backend=backend, cuda_graph=cuda_graph, check=False)
    original = type(pipe)
    namespace = {"__call__": _accelerated_call(original.__call__), "_fastdiff_original_class": original,
                 "__module__": original.__module__, "__qualname__": original.__qualname__, "__doc__": original.__doc__}
    # Same name as the original so save_pretrained / from_pipe / repr see the pipeline's own class name.
    pipe.__class__ = type(original.__name__, (original,), namespace)
    pipe.__dict__[_STATE] = _State(sampler, original, pipe.unet, optimized)
    return pipe


def restore(obj):
    """Undo :func:`accelerate` on a pipeline (its class, and ``fastdiff.optimize`` on its UNet); returns it.

    Anything else (a UNet) goes to :func:`fastdiff.model_optimizer.restore` (which returns whether there was
    anything to undo), so ``fastdiff.restore`` undoes both ``fastdiff.accelerate(pipe)`` and
    ``fastdiff.optimize(unet)``. A pipeline that was not accelerated is returned unchanged."""
    state: _State | None = getattr(obj, "__dict__", {}).get(_STATE)
    if state is not None:
        obj.__class__ = state.original_class
        del obj.__dict__[_STATE]
        if state.optimized:
            _restore_unet(state.unet)
        return obj
    if is_diffusers_pipeline(obj):
        return obj
    return restore_unet(obj)

