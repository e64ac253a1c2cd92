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
def fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, softmax_lse): out like q, lse float32 (batch, nheads, seqlen_q).
    ``deterministic`` is not used by the forward pass; it is carried to the backward pass."""
    if q.is_cuda and q.dtype in _KERNEL_DTYPES:
        return _cuda_fwd(q, k, v, softmax_scale, causal)
    if q.is_cuda:
        _warn_slow_path(q.dtype)
    return reference.attention_forward(q, k, v, softmax_scale, causal)


def _warn_slow_path(dtype: torch.dtype) -> None:
    global _warned_slow_path
    if not _warned_slow_path:
        _warned_slow_path = True
        warnings.warn(
            f"flash_cute: {dtype} inputs run the tiled PyTorch reference (flash_cute.reference), "
            "not the CUDA kernels, which take float16 and bfloat16: this is the slow path.",
            stacklevel=4,
        )


@fwd.register_fake
def _(q, k, v, softmax_scale, causal, deterministic=False):
    batch, seqlen_q, nheads, d = q.shape
    return q.new_empty((batch, seqlen_q, nheads, d)), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


# How the backward kernel reduces dK and dV over the query heads that share a KV head (GQA/MQA):
# "in_kernel": one CTA per KV head walks all its query heads and accumulates in registers (no
# extra memory); "expand": one CTA per query head writes nheads-sized dK/dV that are summed
# afterwards (what the official package does). Kept switchable so benchmark/run.py can compare.
GQA_BWD_REDUCTION = "in_kernel"


def _cuda_bwd(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, deterministic: bool):
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dq = torch.empty((batch, seqlen_q, nheads, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, seqlen_k, nheads_k, d), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    if dq.numel() == 0 or dk.numel() == 0:  # nothing to attend: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    expand = nheads != nheads_k and GQA_BWD_REDUCTION == "expand"
    if expand:
        dk_buf = torch.empty((batch, seqlen_k, nheads, d), dtype=q.dtype, device=q.device)
        dv_buf = torch.empty_like(dk_buf)
    else:
        dk_buf, dv_buf = dk, dv
    dout, q, k, v, out = (_kernel_ready(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    # Workspace padded to whole tiles of the kernel (seqlen_q rounded up to its block_m, the
    # head-dim bucket), filled by the kernels: the fp32 dQ accumulator, rowsum(dout * out) and
    # lse * log2(e). Padding spares the main loop every bounds check on them.
    block_m, bucket = _bwd_tile_rows_cols(d)
    m_blocks = -(-seqlen_q // block_m)
    rows = m_blocks * block_m
    dq_accum = torch.empty((batch, nheads, rows, bucket), dtype=torch.float32, device=q.device)
    row_stats = torch.empty((2, batch, nheads, rows), dtype=torch.float32, device=q.device)  # D, lse*log2(e)
    semaphore = (
        torch.zeros((batch, nheads, m_blocks), dtype=torch.int32, device=q.device)
        if deterministic
        else None
    )
    _C().bwd(
        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        dq.data_ptr(), dk_buf.data_ptr(), dv_buf.data_ptr(), dq_accum.data_ptr(), row_stats[0].data_ptr(), row_stats[1].data_ptr(),
        0 if semaphore is None else semaphore.data_ptr(),
        batch, seqlen_q, seqlen_k, nheads, nheads_k, d, expand,
        _strides(q), _strides(k), _strides(v), _strides(out), _strides(dout),
        _strides(dq), _strides(dk_buf), _strides(dv_buf),
        softmax_scale, causal, _dtype_code(q.dtype), q.device.index,
        torch.cuda.current_stream(q.device).cuda_stream,
    )
    if expand:
        groups = nheads // nheads_k
        torch.sum(dk_buf.unflatten(2, (nheads_k, groups)), dim=3, out=dk)
        torch.sum(dv_buf.unflatten(2, (nheads_k, groups)), dim=3, out=dv)
    return dq, dk, dv


@functools.cache
def _bwd_tile_rows_cols(head_dim: int) -> tuple[int, int]:
    """(block_m, head-dim bucket) of the backward kernel: the padding of its workspace."""
    return _C().bwd_tile(head_dim)[0], _C().head_dim_bucket(head_dim)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2))


@torch.library.custom_op("flash_cute::bwd", mutates_args=())
def bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash_cute::fwd, shaped and typed like q, k, v."""
    if q.is_cuda and q.dtype in _KERNEL_DTYPES:
        return _cuda_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic)
    if q.is_cuda:
        _warn_slow_path(q.dtype)
    return reference.attention_backward(dout, q, k, v, out, softmax_lse, softmax_scale, causal)


@bwd.register_fake
def _(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic):
    # Contiguous, like both implementations' results (empty_like would copy q's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    # The lse's gradient is never used: do not have autograd fill a zero tensor for it.
    ctx.set_materialize_grads(False)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.deterministic = bool(rest[0]) if rest else False


def _fwd_backward(ctx, grad_out, grad_lse):
    # The log-sum-exp is an auxiliary output (as in the official package): its gradient is ignored.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic)
    return dq, dk, dv, None, None, None


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
