"""What the C++ and CUDA launchers share: the storage-dtype codes and the positional argument list of the compiled
``step`` function (csrc/bindings_common.h: ``make_params``). Tensors travel as addresses (``data_ptr()``, 0 for
None), so the compiled modules never see a torch header."""

from __future__ import annotations

import torch

from fastdiff.errors import InvalidInput

# Must match csrc/step_params.h (enum DType); tests compare against the modules' DTYPES.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def step_args(model_out, x, coef, out, guidance_scale, cfg, hist, saved, noise, next_in, m_scale, clip_range,
              x0_limit, flag) -> tuple:
    """The positional arguments of ``_C_cpu.step`` / ``_C_cuda.step`` (without their trailing extras).

    The launchers get validated tensors from :func:`fastdiff.ops.fused_step`; the contiguity check is kept here
    because a kernel walking raw addresses over a strided view would read and write the wrong memory."""
    code = DTYPE_CODES.get(x.dtype)
    if code is None:
        raise InvalidInput(f"the compiled step supports {', '.join(map(str, DTYPE_CODES))}; got {x.dtype}")
    for name, t in (("model_out", model_out), ("x", x), ("coef", coef), ("out", out), ("hist", hist),
                    ("saved", saved), ("noise", noise), ("next_in", next_in), ("m_scale", m_scale),
                    ("x0_limit", x0_limit), ("flag", flag)):
        if t is not None and not t.is_contiguous():
            raise InvalidInput(f"{name} must be contiguous for the compiled step (fastdiff.ops.fused_step copies "
                               "non-contiguous inputs; call that instead of the launcher)")
    batch = x.shape[0]
    return (
        _ptr(model_out), _ptr(x), _ptr(coef), _ptr(out), _ptr(hist), _ptr(saved), _ptr(noise), _ptr(next_in),
        _ptr(m_scale), _ptr(x0_limit), _ptr(flag), 0 if flag is None else flag.numel(), batch, x.numel() // batch,
        0 if next_in is None else next_in.shape[0] // batch, code, bool(cfg), float(guidance_scale),
        clip_range is not None, 0.0 if clip_range is None else float(clip_range),
    )
