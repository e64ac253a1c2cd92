"""The public functions, with the signatures, defaults, return values and shapes of the official
``flash_attn.flash_attn_interface`` (v2.8): code written against ``flash_attn`` ports by changing
the package name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _ops
from .errors import FlashAttnNotImplementedError, FlashAttnTypeError, FlashAttnValueError

__all__ = ["flash_attn_func"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# The kernels put (batch, heads) on the grid's y and z dimensions, which stop at 65535.
_MAX_GRID_YZ = 65535


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise FlashAttnTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise FlashAttnTypeError(
            f"{name} has dtype {t.dtype}; flash_cute supports torch.float16 and torch.bfloat16 "
            "(and torch.float32 on the slower reference path)"
        )
    if t.dim() != ndim:
        raise FlashAttnValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.numel() > 0 and t.stride(-1) != 1:
        raise FlashAttnValueError(
            f"{name} must have a contiguous last dimension (stride 1), got strides {tuple(t.stride())}"
        )


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise FlashAttnTypeError(f"{name} has dtype {t.dtype}, expected q's dtype {ref.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"flash_cute: {name} is on {t.device}, expected q's device {ref.device}")


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    _check_same("k", k, q)
    _check_same("v", v, q)
    if q.device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"flash_cute: q is on {q.device}; supported devices are CUDA GPUs and the CPU")
    batch, seqlen_q, nheads, d = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != d:
        raise FlashAttnValueError(
            f"k must have shape (batch={batch}, seqlen_k, nheads_k, headdim={d}), got {tuple(k.shape)}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise FlashAttnValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise FlashAttnValueError(f"head dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise FlashAttnValueError(
            f"the number of heads in q ({nheads}) must be a multiple of the number of heads in k and v ({nheads_k})"
        )
    if q.is_cuda and (nheads > _MAX_GRID_YZ or batch > _MAX_GRID_YZ):
        raise FlashAttnValueError(
            f"batch ({batch}) and nheads ({nheads}) must each be at most {_MAX_GRID_YZ} on CUDA"
        )


def _normalize_window(window_size, causal: bool, seqlen_k: int) -> bool:
    """Returns the effective causal flag. Windows that cover every key are no window; (-1, 0) is
    causal attention, as in the official package. Real windows are not implemented yet."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise FlashAttnValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    if left < 0 and right == 0:
        return True
    if left < 0 and right < 0:
        return False
    raise FlashAttnNotImplementedError(
        f"flash_cute: window_size={tuple(window_size)} (sliding-window attention) is not implemented yet"
    )


def _check_unsupported(dropout_p: float, softcap: float, alibi_slopes) -> None:
    if dropout_p != 0.0:
        raise FlashAttnNotImplementedError(f"flash_cute: dropout_p={dropout_p} is not implemented yet; use dropout_p=0.0")
    if softcap != 0.0:
        raise FlashAttnNotImplementedError(f"flash_cute: softcap={softcap} is not implemented yet; use softcap=0.0")
    if alibi_slopes is not None:
        raise FlashAttnNotImplementedError("flash_cute: alibi_slopes is not implemented yet; pass alibi_slopes=None")


def _pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    """The kernels need head dims that are multiples of 8 (16-byte rows): pad with zeros, which
    changes no score, as the official package does."""
    d = t.shape[-1]
    return t if d % 8 == 0 else F.pad(t, (0, 8 - d % 8))


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Exact attention softmax(q k^T * softmax_scale) v, FlashAttention-2 style.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), float16 or bfloat16 (float32 runs the
            PyTorch reference path).
        k: (batch_size, seqlen_k, nheads_k, headdim). nheads must be a multiple of nheads_k
            (multi-query and grouped-query attention; K and V are never expanded in memory).
        v: (batch_size, seqlen_k, nheads_k, headdim).
        dropout_p: float. Dropout probability (only 0.0 is supported so far).
        softmax_scale: float. Defaults to 1 / sqrt(headdim).
        causal: bool. Causal mask aligned to the bottom-right corner of the attention matrix:
            query i sees key j iff j <= i + seqlen_k - seqlen_q. Rows that see no key return 0.
        window_size: (left, right). (-1, -1) is full attention; (-1, 0) equals causal.
        softcap: float. 0.0 means off (only 0.0 is supported so far).
        alibi_slopes: None (ALiBi is not supported so far).
        deterministic: bool. Affects the backward pass only.
        return_attn_probs: bool. Also return the log-sum-exp and the attention-probability
            matrix (an empty tensor when dropout_p == 0, as in the official package).
    Return:
        out: (batch_size, seqlen_q, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q), float32,
            the log-sum-exp of each row of q k^T * softmax_scale (+inf for rows that see no key).
        S_dmask [optional, if return_attn_probs=True]: empty tensor (dropout is not supported).
    """
    _check_qkv(q, k, v)
    _check_unsupported(dropout_p, softcap, alibi_slopes)
    causal = _normalize_window(window_size, bool(causal), k.shape[1])
    head_dim = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    out, lse = _ops.fwd(
        _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v), float(softmax_scale), causal, bool(deterministic)
    )
    out = out[..., :head_dim]
    if return_attn_probs:
        return out, lse, torch.empty(0, dtype=q.dtype, device=q.device)
    return out
