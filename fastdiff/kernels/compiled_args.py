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


def group_norm_args(x, y, weight, bias, add, groups, eps, silu) -> tuple:
    """The positional arguments of ``_C_cpu.group_norm`` / ``_C_cuda.group_norm`` (without their trailing extras)
    for (N, C, L) views ``x`` / ``y`` of any strides, (C,) ``weight`` / ``bias`` and an (N, C) ``add`` (or None).

    weight and bias must share a dtype (x's or float32) and be contiguous; :func:`fastdiff.ops.groupnorm.group_norm`
    sees to it."""
    code = DTYPE_CODES.get(x.dtype)
    if code is None or y.dtype != x.dtype:
        raise InvalidInput(f"the compiled GroupNorm supports {', '.join(map(str, DTYPE_CODES))}; got x {x.dtype}, "
                           f"y {y.dtype}")
    params = [t for t in (weight, bias) if t is not None]
    if any(t.dtype != params[0].dtype or t.dtype not in DTYPE_CODES or not t.is_contiguous() for t in params):
        raise InvalidInput("weight and bias must be contiguous and share one dtype of "
                           f"{', '.join(map(str, DTYPE_CODES))}")
    if add is not None and add.dtype not in DTYPE_CODES:
        raise InvalidInput(f"add must be one of {', '.join(map(str, DTYPE_CODES))}, got {add.dtype}")
    n, c, length = x.shape
    a_strides = (0, 0) if add is None else add.stride()
    return (
        _ptr(x), _ptr(y), _ptr(weight), _ptr(bias), _ptr(add), n, c, length, groups, *x.stride(), *y.stride(),
        *a_strides, code, DTYPE_CODES[params[0].dtype] if params else code,
        code if add is None else DTYPE_CODES[add.dtype], float(eps), bool(silu),
    )
