"""The torch.library operators behind the public functions.

``flash_cute::fwd`` is the forward pass on tensors whose head dim is a multiple of 8 (the public
functions pad other head dims first). Its CUDA implementation hands device pointers, strides and
the current stream to the compiled module ``flash_cute._C``; every other device and float32 run
:mod:`flash_cute.reference`. The fake implementation gives torch.compile the output shapes.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from . import reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_warned_slow_path = False


@functools.cache
def _C():
    """The compiled module, imported on first use so that CPU-only code never needs it."""
    from . import _C as module

    return module


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels load 16-byte vectors: a base address aligned to 16 bytes, strides that are
    multiples of 8 elements. Anything else (offset views, odd strides) is copied once."""
    aligned = t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.stride(-1) == 1
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _dtype_code(dtype: torch.dtype) -> int:
    return _C().kDTypeFloat16 if dtype == torch.float16 else _C().kDTypeBFloat16


def _cuda_fwd(q, k, v, softmax_scale: float, causal: bool):
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, nheads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:  # no key at all: every row is empty
        return out.zero_(), lse.fill_(math.inf)
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    _C().fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        batch, seqlen_q, seqlen_k, nheads, nheads_k, d,
        (q.stride(0), q.stride(1), q.stride(2)),
        (k.stride(0), k.stride(1), k.stride(2)),
        (v.stride(0), v.stride(1), v.stride(2)),
        (out.stride(0), out.stride(1), out.stride(2)),
        (lse.stride(0), lse.stride(1)),
        softmax_scale, causal, _dtype_code(q.dtype), q.device.index,
        torch.cuda.current_stream(q.device).cuda_stream,
    )
    return out, lse


@torch.library.custom_op("flash_cute::fwd", mutates_args=())
def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, softmax_lse): out like q, lse float32 (batch, nheads, seqlen_q)."""
    if q.is_cuda and q.dtype in _KERNEL_DTYPES:
        return _cuda_fwd(q, k, v, softmax_scale, causal)
    if q.is_cuda:
        global _warned_slow_path
        if not _warned_slow_path:
            _warned_slow_path = True
            warnings.warn(
                f"flash_cute: {q.dtype} inputs run the tiled PyTorch reference (flash_cute.reference), "
                "not the CUDA kernels, which take float16 and bfloat16: this is the slow path.",
                stacklevel=3,
            )
    return reference.attention_forward(q, k, v, softmax_scale, causal)


@fwd.register_fake
def _(q, k, v, softmax_scale, causal):
    batch, seqlen_q, nheads, d = q.shape
    return q.new_empty((batch, seqlen_q, nheads, d)), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


def _fwd_backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        "flash_cute: gradients of flash_attn_func are not implemented yet (the backward pass is the next milestone); "
        "call it under torch.no_grad() or on inputs that do not require grad"
    )


fwd.register_autograd(_fwd_backward)
