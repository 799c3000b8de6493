"""``compile=True``: the network of a :class:`~fastdiff.backends.base.TorchRunner` compiled with ``torch.compile``.

:class:`CompiledRunner` wraps a runner and is itself a :class:`~fastdiff.backends.base.ModelRunner`, so the loop
(:mod:`fastdiff.loop`) runs it like any other. What it compiles and why (digits teacher, CFG batch 20x1x16x16, the
2-core CPU VM, torch 2.13; numbers in ``benches/results/``):

- the UNet forward, with inductor's ``freezing`` (the weights become constants, so inductor prepacks the
  convolution / linear weights for oneDNN once instead of per call) under ``torch.no_grad``;
- the sample converted to channels-last inside the compiled graph (so the user's module is not modified).

  One ad hoc run per variant (one forward on the CFG batch, median of 10, the VM under a load of ~6 on 2 cores, so
  only the order means much): eager 457 ms, eager channels-last 439 ms, ``torch.compile`` default 400 ms, freezing
  with NCHW 1134 ms, freezing with channels-last 295 ms (that run converted the module; this one converts only the
  input, inside the graph, and the frozen weights are prepacked by inductor). Freezing alone was the slowest and
  freezing with channels-last the fastest, hence both together; the interleaved end-to-end numbers are in the bench
  results;
- ``dynamic=False``: every new (shape, dtype, device) of the inputs compiles once -- a diffusion loop calls the
  network with one shape for all its steps, so the specialised graph is the one that pays off. At most
  :data:`MAX_SHAPES` signatures compile per runner; further ones run eagerly (with a warning) so that a caller
  cycling through sizes does not pay a compile per call or hold unbounded graphs.

The fused step stays outside the compiled region: it is already one C++ call per step (~0.2 ms of host cost per
step against ~40 ms of network on this CPU; ``benches/results/CPU_x86_64_x2-2026-11-23-digits.md``), so merging it
into the graph could save at most a fraction of a percent, and :mod:`fastdiff.loop` stays as it is.

Where compilation is unavailable or fails (no ``torch.compile`` / inductor, no C++ compiler, a model dynamo cannot
trace, a runner that is not PyTorch), the runner warns once with the reason and runs the model eagerly: the caller
gets images either way. ``compile_seconds`` is the wall time spent in first calls of new signatures (compilation
plus one forward), kept apart from sampling time.
"""

from __future__ import annotations

import logging
import time
import types
import warnings

import torch

from fastdiff.backends.base import ModelRunner, TorchRunner

log = logging.getLogger("fastdiff")

#: at most this many input signatures are compiled per runner (torch._dynamo's own default recompile limit is 8)
MAX_SHAPES = 8
#: inductor options (see the module docstring for why each one)
INDUCTOR_OPTIONS = {"freezing": True}


class CompileWarning(UserWarning):
    """``compile=True`` could not compile (the reason is in the message); the model runs eagerly instead."""


class _Forward(torch.nn.Module):
    """The traced function: channels-last in, the runner's forward, a contiguous (NCHW) result out."""

    def __init__(self, runner: TorchRunner, channels_last: bool):
        super().__init__()
        self.unet = runner.unet
        self.runner = runner
        self.channels_last = channels_last

    def forward(self, sample, timestep, encoder_hidden_states, class_labels, model_kwargs: dict):
        if self.channels_last and sample.dim() == 4:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return self.runner(sample, timestep, encoder_hidden_states, class_labels, **model_kwargs).contiguous()


def _own_code(module: _Forward):
    """A function calling ``module`` with a code object of its own: torch._dynamo keeps compiled graphs and counts
    recompilations per code object, so every runner gets its own cache and its own recompile budget instead of
    sharing them with every other compiled sampler in the process."""
    def forward(sample, timestep, encoder_hidden_states, class_labels, model_kwargs):
        return module(sample, timestep, encoder_hidden_states, class_labels, model_kwargs)

    return types.FunctionType(forward.__code__.replace(), forward.__globals__, "fastdiff_compiled_forward",
                              forward.__defaults__, forward.__closure__)


def _signature(*values, kwargs: dict) -> tuple:
    def sig(v):
        return (tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else type(v).__name__

    return tuple(sig(v) for v in values) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


class CompiledRunner(ModelRunner):
    """``runner`` with its network compiled on first use per input signature; eager where that is impossible."""

    def __init__(self, runner: ModelRunner, channels_last: bool = True, options: dict | None = None):
        self.inner = runner
        for attr in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "needs_class_labels",
                     "time_cond_proj_dim", "device", "dtype"):
            setattr(self, attr, getattr(runner, attr))
        self.name = f"{runner.name}+compile"
        self.compile_seconds = 0.0
        self.reason: str | None = None  # why the model runs eagerly, once that is known
        self._signatures: set[tuple] = set()
        self._fn = None
        if not isinstance(runner, TorchRunner):
            self._give_up(f"the {runner.name or type(runner).__name__} runner is not a PyTorch module")
        elif not hasattr(torch, "compile"):
            self._give_up("this PyTorch has no torch.compile")
        else:
            opts = dict(INDUCTOR_OPTIONS if options is None else options)
            self._fn = torch.compile(_own_code(_Forward(runner, channels_last)), dynamic=False, options=opts)

    @property
    def compiled(self) -> bool:
        """Whether calls go to the compiled network (False after a fallback)."""
        return self.reason is None

    def _give_up(self, reason: str) -> None:
        self.reason = reason
        self._fn = None
        warnings.warn(f"compile=True: {reason}; the model runs eagerly", CompileWarning, stacklevel=3)

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **model_kwargs):
        args = (sample, timestep, encoder_hidden_states, class_labels)
        if self._fn is None:
            return self.inner(*args, **model_kwargs)
        key = _signature(*args, kwargs=model_kwargs)
        if key in self._signatures:
            return self._fn(*args, model_kwargs)
        if len(self._signatures) >= MAX_SHAPES:
            warnings.warn(f"compile=True: more than {MAX_SHAPES} input shapes on one sampler; new shapes run "
                          "eagerly", CompileWarning, stacklevel=2)
            return self.inner(*args, **model_kwargs)
        t0 = time.perf_counter()
        try:
            out = self._fn(*args, model_kwargs)
        except Exception as e:  # noqa: BLE001 -- any compiler failure falls back; the eager call re-raises input errors
            out = self.inner(*args, **model_kwargs)  # raises here if the inputs themselves are at fault
            self._give_up(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})")
            return out
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        self._signatures.add(key)
        log.info("fastdiff: compiled the model for %s in %.1f s", key[0], dt)
        return out
