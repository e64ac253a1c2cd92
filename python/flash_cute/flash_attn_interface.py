"""The public functions, with the signatures, defaults, return values and shapes of the official
``flash_attn.flash_attn_interface`` (v2.8): code written against ``flash_attn`` ports by changing
the package name."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import _ops, reference
from .errors import FlashAttnNotImplementedError, FlashAttnTypeError, FlashAttnValueError

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

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


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise FlashAttnTypeError(f"{name} has dtype {t.dtype}, expected q's dtype {ref.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"flash_cute: {name} is on {t.device}, expected q's device {ref.device}")


def _check_qkv(q, k, v, varlen: bool = False, paged: bool = False) -> None:
    """Padded batches: q (batch, seqlen_q, nheads, d), k and v (batch, seqlen_k, nheads_k, d).
    Varlen: q (total_q, nheads, d), k and v (total_k, nheads_k, d), or with paged K/V
    (num_pages, page_size, nheads_k, d)."""
    q_dims = 3 if varlen else 4
    kv_dims = 4 if paged or not varlen else 3
    _check_tensor("q", q, q_dims)
    _check_tensor("k", k, kv_dims)
    _check_tensor("v", v, kv_dims)
    _check_same("k", k, q)
    _check_same("v", v, q)
    if q.device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"flash_cute: q is on {q.device}; supported devices are CUDA GPUs and the CPU")
    nheads, d = q.shape[-2:]
    nheads_k = k.shape[-2]
    if varlen:
        expected = "(num_pages, page_size, nheads_k, headdim=%d)" if paged else "(total_k, nheads_k, headdim=%d)"
        if k.shape[-1] != d:
            raise FlashAttnValueError(f"k must have shape {expected % d}, got {tuple(k.shape)}")
    elif k.shape[0] != q.shape[0] or k.shape[3] != d:
        raise FlashAttnValueError(
            f"k must have shape (batch={q.shape[0]}, seqlen_k, nheads_k, headdim={d}), got {tuple(k.shape)}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise FlashAttnValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise FlashAttnValueError(f"head dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise FlashAttnValueError(
            f"the number of heads in q ({nheads}) must be a multiple of the number of heads in k and v ({nheads_k})"
        )
    if q.is_cuda and nheads > _MAX_GRID_YZ:
        raise FlashAttnValueError(f"nheads ({nheads}) must be at most {_MAX_GRID_YZ} on CUDA")
    if q.is_cuda and not varlen and q.shape[0] > _MAX_GRID_YZ:
        raise FlashAttnValueError(f"batch ({q.shape[0]}) must be at most {_MAX_GRID_YZ} on CUDA")


def _check_varlen(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table) -> None:
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise FlashAttnTypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise FlashAttnTypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise FlashAttnValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise RuntimeError(f"flash_cute: {name} is on {cu.device}, expected q's device {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise FlashAttnValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    batch = cu_seqlens_q.shape[0] - 1
    if q.is_cuda and batch > _MAX_GRID_YZ:
        raise FlashAttnValueError(f"batch ({batch}, from cu_seqlens_q) must be at most {_MAX_GRID_YZ} on CUDA")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise FlashAttnValueError(f"{name} must be a non-negative int, got {m!r}")
    if block_table is not None:
        _check_block_table(block_table, batch, q.device)


def _check_block_table(block_table, batch: int, device) -> None:
    if not isinstance(block_table, torch.Tensor):
        raise FlashAttnTypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise FlashAttnTypeError(f"block_table must have dtype torch.int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise FlashAttnValueError(
            f"block_table must have shape (batch={batch}, max_num_pages_per_seq), got {tuple(block_table.shape)}"
        )
    if block_table.device != device:
        raise RuntimeError(f"flash_cute: block_table is on {block_table.device}, expected q's device {device}")


# The values in the index tensors (cu_seqlens_*, cache_seqlens, cache_batch_idx, cache_leftpad,
# block_table) say where the kernels read and write. They are checked on the host (a clear error):
# always for CPU tensors (no cost worth naming), for CUDA tensors only when CHECK_INDEX_VALUES is
# true (environment variable FLASH_CUTE_CHECK_INDICES=1), because reading them costs a host sync
# per call, which the decoding loop and the varlen path are written to avoid. Never inside
# torch.compile / torch.export graphs or while a CUDA graph is captured. Unchecked, the kernels
# hold them to the tensors (seq_span and cache_span in include/flash_cute/seqlen.h): a sequence or
# cache row with values out of range gets NaN output, and nothing outside the tensors is touched.
CHECK_INDEX_VALUES = os.environ.get("FLASH_CUTE_CHECK_INDICES", "0").strip().lower() not in ("", "0", "false", "no")


def _check_index_values(q) -> bool:
    """Whether this call checks the values of its index tensors (see CHECK_INDEX_VALUES). On the
    CUDA hot path (the flag off) this is one attribute read. CUDA tensors of other dtypes than
    float16 / bfloat16 run the reference in torch ops, which cannot hold bad values to the
    tensors as the kernels do: they are always checked."""
    if q.is_cuda:
        return ((CHECK_INDEX_VALUES or q.dtype not in _ops._KERNEL_DTYPES)
                and not (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()))
    return q.device.type == "cpu" and not torch.compiler.is_compiling()


def _first_bad(bad: torch.Tensor):
    """The index (a tuple) of the first True in a boolean tensor, or None (one host read)."""
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def _check_cu_seqlens_values(name: str, cu: torch.Tensor, rows: int | None, what: str) -> None:
    """cu_seqlens: starts at >= 0, never decreases, and (rows given) ends at <= rows."""
    values = cu.long()
    if values.numel() == 0:
        return
    bad = torch.cat([values[:1] < 0, values[1:] < values[:-1]])
    if rows is not None:
        bad[-1] |= values[-1] > rows
    at = _first_bad(bad)
    if at is not None:
        i = at[0]
        shown = values.tolist()
        shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-5:]
        bound = "" if rows is None else f" and end at <= {what} ({rows})"
        raise FlashAttnValueError(
            f"{name} must start at >= 0, never decrease{bound}; got {name}[{i}] = {int(values[i])} "
            f"({name} = {shown})"
        )


def _check_block_table_values(block_table: torch.Tensor, keys: torch.Tensor, page_size: int, num_pages: int,
                              what: str) -> None:
    """The entries of block_table that a batch row uses (its first ceil(keys[b] / page_size))
    name pages of the cache: 0 <= entry < num_pages. Unused entries may hold anything."""
    table = block_table.long()
    width = table.shape[1]
    used = (keys.long() + page_size - 1) // page_size
    too_long = _first_bad(used > width)
    if too_long is not None:
        b = too_long[0]
        raise FlashAttnValueError(
            f"batch row {b} has {int(keys[b])} keys ({what}), more than its block_table row holds "
            f"({width} pages of {page_size} rows)"
        )
    at = _first_bad(_ops.unpaged_entries(table, keys.long(), page_size, num_pages))
    if at is not None:
        b, j = at
        raise FlashAttnValueError(
            f"block_table[{b}, {j}] = {int(table[b, j])} is not a page of the cache (0 .. {num_pages - 1}); "
            f"batch row {b} uses its first {int(used[b])} entries"
        )


def _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, block_table) -> None:
    """The values of a variable-length batch's index tensors (see CHECK_INDEX_VALUES)."""
    _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q.shape[0]")
    paged = block_table is not None
    _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, None if paged else k.shape[0], "k.shape[0]")
    if paged:
        cu = cu_seqlens_k.long()
        _check_block_table_values(block_table, cu[1:] - cu[:-1], k.shape[1], k.shape[0], "from cu_seqlens_k")


def _check_kvcache_values(k_cache, seqlen_new: int, cache_len: int, cache_seqlens, cache_batch_idx, cache_leftpad,
                          block_table) -> None:
    """The values of flash_attn_with_kvcache's index tensors (see CHECK_INDEX_VALUES): every
    batch row's cache_seqlens plus the new rows fit its cache row, its left padding is at most
    its cache_seqlens, its cache_batch_idx names a row of the cache, and the block_table entries
    it uses name pages of the cache."""
    seqlens = None
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens = cache_seqlens.long()
        at = _first_bad((seqlens < 0) | (seqlens + seqlen_new > cache_len))
        if at is not None:
            b = at[0]
            raise FlashAttnValueError(
                f"cache_seqlens must be in [0, {cache_len - seqlen_new}] (the cache's {cache_len} rows minus the "
                f"{seqlen_new} new ones), got cache_seqlens[{b}] = {int(seqlens[b])}"
            )
    if cache_batch_idx is not None:
        idx = cache_batch_idx.long()
        at = _first_bad((idx < 0) | (idx >= k_cache.shape[0]))
        if at is not None:
            b = at[0]
            raise FlashAttnValueError(
                f"cache_batch_idx must name a row of k_cache (0 .. {k_cache.shape[0] - 1}), "
                f"got cache_batch_idx[{b}] = {int(idx[b])}"
            )
    if cache_leftpad is not None:
        pad = cache_leftpad.long()
        limit = cache_len if cache_seqlens is None else (seqlens if seqlens is not None else int(cache_seqlens))
        at = _first_bad((pad < 0) | (pad > limit))
        if at is not None:
            b = at[0]
            bound = int(limit[b]) if isinstance(limit, torch.Tensor) else limit
            raise FlashAttnValueError(
                f"cache_leftpad must be in [0, cache_seqlens[b]], got cache_leftpad[{b}] = {int(pad[b])} "
                f"(cache_seqlens[{b}] = {bound})"
            )
    if block_table is not None:
        if seqlens is None:
            keys = torch.full((block_table.shape[0],), cache_len if cache_seqlens is None else int(cache_seqlens),
                              dtype=torch.long, device=block_table.device)
        else:
            keys = seqlens
        _check_block_table_values(block_table, keys + seqlen_new, k_cache.shape[1], k_cache.shape[0],
                                  "cache_seqlens plus the new rows")


def _normalize_window(window_size, causal: bool, seqlen_k: int) -> tuple[bool, tuple[int, int]]:
    """(causal, (left, right)): the official package's reading of window_size and causal. Key j is
    visible from query i iff i + d - left <= j <= i + d + right (d = seqlen_k - seqlen_q; -1:
    unbounded). Sides at least seqlen_k wide are unbounded; causal sets right = 0; (-1, 0) is
    causal attention and (-1, -1) none, returned as the causal flag with no window."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise FlashAttnValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    left = -1 if left < 0 or left >= seqlen_k else left
    right = -1 if right < 0 or right >= seqlen_k else right
    if causal:
        right = 0
    if left < 0 and right == 0:
        return True, (-1, -1)
    return False, (left, right)


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise FlashAttnValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_softmax_scale(softmax_scale, head_dim: int) -> float:
    """softmax_scale as a float (None: 1 / sqrt(head_dim)); anything float() takes, as the official
    binding does, but finite."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        if isinstance(softmax_scale, (str, bytes)):
            raise TypeError
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise FlashAttnTypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}") from None
    if not math.isfinite(scale):
        raise FlashAttnValueError(f"softmax_scale must be finite, got {scale}")
    return scale


def _rng_state(dropout_p: float, device) -> torch.Tensor | None:
    """Dropout's (seed, offset), int64 on the device, drawn from torch's generator of the device:
    torch.manual_seed reproduces a call, and a CUDA graph draws fresh ones on every replay."""
    if dropout_p == 0.0:
        return None
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device)


def _check_options(q, softcap, alibi_slopes, batch: int, nheads: int) -> float:
    """Validates softcap (returned as a float) and alibi_slopes: float32 (nheads,) or (batch, nheads)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise FlashAttnValueError(f"softcap must be a float >= 0 (0.0: off), got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise FlashAttnTypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise FlashAttnTypeError(f"alibi_slopes must have dtype torch.float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise FlashAttnValueError(
                f"alibi_slopes must have shape (nheads={nheads},) or (batch={batch}, nheads={nheads}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.device != q.device:
            raise RuntimeError(f"flash_cute: alibi_slopes is on {alibi_slopes.device}, expected q's device {q.device}")
    return float(softcap)


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width S_dmask (return_attn_probs) is laid out in: the forward kernel's block
    of keys for this head dim (the same on every GPU and on the CPU path), so code that decodes
    the matrix the official way (running maxima per block of this many keys) works unchanged."""
    return _ops._fwd_block_n(int(head_dim), False)


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
        dropout_p: float. Dropout probability on the attention probabilities, in [0, 1) (Philox
            random numbers from a seed drawn from torch's generator: torch.manual_seed
            reproduces a call, the backward pass draws the same mask). 0.0 outside training.
        softmax_scale: float. Defaults to 1 / sqrt(headdim).
        causal: bool. Causal mask aligned to the bottom-right corner of the attention matrix:
            query i sees key j iff j <= i + seqlen_k - seqlen_q. Rows that see no key return 0.
        window_size: (left, right). If not (-1, -1), local attention: query i sees key j iff
            i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right (-1: unbounded).
            (-1, 0) equals causal.
        softcap: float. 0.0 means off; else scores become softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch_size, nheads), float32. Adds the bias
            -slope * |i + seqlen_k - seqlen_q - j| to the score of query i and key j (after softcap).
        deterministic: bool. Affects the backward pass only.
        return_attn_probs: bool. Also return the log-sum-exp and, with dropout_p > 0, the
            attention-probability matrix S_dmask (an empty tensor when dropout_p == 0, as in the
            official package). For testing only.
    Return:
        out: (batch_size, seqlen_q, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q), float32,
            the log-sum-exp of each row of q k^T * softmax_scale (+inf for rows that see no key).
        S_dmask [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q_rounded,
            seqlen_k_rounded), rounded up to 128: the probabilities exp(score - m) with m the row
            maximum so far when the kernel reached each block of _get_block_size_n keys (the
            kernel walks them from the last one), negative where dropout dropped them; empty
            without dropout.
    """
    return _attention(
        "", (q, k, v), None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def _unpack(kind: str, tensors):
    """(q, k, v) from the arguments: "" (q, k, v); "qkv" (qkv,) with the 3 at dim -3; "kv" (q, kv)
    with the 2 at dim -3. Views, no copies."""
    if kind == "qkv":
        return tensors[0].unbind(-3)
    if kind == "kv":
        return (tensors[0], *tensors[1].unbind(-3))
    return tensors


def _check_packed(kind: str, tensors, varlen: bool) -> None:
    name, count = ("qkv", 3) if kind == "qkv" else ("kv", 2)
    t = tensors[-1]
    layout = "(total, %d, nheads, headdim)" if varlen else "(batch, seqlen, %d, nheads, headdim)"
    if not isinstance(t, torch.Tensor):
        raise FlashAttnTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != (4 if varlen else 5) or t.shape[-3] != count:
        raise FlashAttnValueError(f"{name} must have shape {layout % count}, got {tuple(t.shape)}")


def _attention(kind, tensors, varlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_attn_probs):
    """The body of every public function: checks, defaults, head-dim padding, the op (through the
    packed autograd function for packed inputs), the official return values."""
    if kind:
        _check_packed(kind, tensors, varlen is not None)
    q, k, v = _unpack(kind, tensors)
    if varlen is not None:
        _check_qkv(q, k, v, varlen=True, paged=varlen[4] is not None)
        _check_varlen(q, *varlen)
        if _check_index_values(q):
            _check_varlen_values(q, k, varlen[0], varlen[1], varlen[4])
    else:
        _check_qkv(q, k, v)
    dropout_p = _check_dropout(dropout_p)
    softcap = _check_options(q, softcap, alibi_slopes, q.shape[0] if varlen is None else varlen[0].shape[0] - 1,
                             q.shape[-2])
    causal, window = _normalize_window(window_size, bool(causal), _max_keys(k, varlen))
    head_dim = q.shape[-1]
    softmax_scale = _check_softmax_scale(softmax_scale, head_dim)
    tensors = tuple(_pad_head_dim(t) for t in tensors)
    bad = None  # paged K/V gathered with unchecked index values: the sequences out of range
    if varlen is not None and varlen[4] is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        # Paged K/V with gradients: the backward runs on the gathered rows (autograd scatters the
        # gradients back into the pages).
        q, k, v = _unpack(kind, tensors)
        block_table = varlen[4]
        if _check_index_values(q):
            cu_seqlens_k = varlen[1]
        else:  # unchecked values: the sequences out of range get NaN rows, as in the kernels
            bad, cu_seqlens_k = _ops.checked_pages(block_table, varlen[1], k.shape[0], k.shape[1])
        k, v = _ops.gather_pages(k, block_table, cu_seqlens_k), _ops.gather_pages(v, block_table, cu_seqlens_k)
        kind, tensors, varlen = "", (q, k, v), (varlen[0], cu_seqlens_k, *varlen[2:4], None)
    if softmax_scale < 0:
        # The kernels take each row's maximum of q . k, the maximum of the scaled scores only for a
        # scale >= 0: softmax(q . k * scale) = softmax((-q) . k * -scale), lse and S_dmask included.
        q, k, v = _unpack(kind, tensors)
        kind, tensors, softmax_scale = "", (-q, k, v), -softmax_scale
    args = (softmax_scale, causal, bool(deterministic), *(varlen or (None, None, 0, 0, None)), softcap,
            *window, alibi_slopes, dropout_p, _rng_state(dropout_p, q.device), bool(return_attn_probs))
    if kind:
        out, lse, s_dmask = _PackedAttention.apply(kind, args, *tensors)
    else:
        out, lse, s_dmask = _ops.fwd_call(*tensors, *args)
    if bad is not None:
        out, lse = _ops.nan_rows(out, lse, bad, varlen[0])
    out = out[..., :head_dim]
    if return_attn_probs:
        return out, lse, s_dmask
    return out


def _max_keys(k, varlen) -> int:
    """An upper bound of every sequence's key count known without reading the GPU: a window at
    least this wide is no window (max_seqlen_k is only a hint and may be too small)."""
    if varlen is None:
        return k.shape[1]
    if varlen[4] is not None:  # paged: the pages a sequence can own
        return varlen[4].shape[1] * k.shape[1]
    return k.shape[0]


class _PackedAttention(torch.autograd.Function):
    """Attention on q, k, v that are views of packed tensors (qkv, or q and kv). The backward
    writes dq, dk, dv into views of one gradient tensor per packed input, as the official package
    does, so the packed gradient costs no copy."""

    @staticmethod
    def forward(ctx, kind, args, *tensors):
        q, k, v = _unpack(kind, tensors)
        out, lse, s_dmask = _ops.fwd_call(q, k, v, *args)
        ctx.save_for_backward(*tensors, out, lse, *args[3:5], args[11], args[13])
        ctx.kind, ctx.args = kind, args
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(s_dmask)
        return out, lse, s_dmask

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_s_dmask):
        *tensors, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state = ctx.saved_tensors
        (softmax_scale, causal, deterministic, _, _, max_seqlen_q, max_seqlen_k, _, softcap, left, right, _,
         dropout_p, _, _) = ctx.args
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = tuple(torch.empty_like(t) for t in tensors)
        _ops.bwd_into_call(
            grad_out, *_unpack(ctx.kind, tensors), out, lse, softmax_scale, causal, deterministic,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softcap, left, right, alibi_slopes,
            dropout_p, rng_state, *_unpack(ctx.kind, grads),
        )
        return (None, None, *grads)


_ATTENTION_ARGS_DOC = """
        dropout_p: float. Dropout probability on the attention probabilities, in [0, 1) (Philox
            random numbers from a seed drawn from torch's generator: torch.manual_seed
            reproduces a call, the backward pass draws the same mask). 0.0 outside training.
        softmax_scale: float. Defaults to 1 / sqrt(headdim).
        causal: bool. Causal mask aligned to the bottom-right corner of each sequence's attention
            matrix: query i sees key j iff j <= i + seqlen_k - seqlen_q. Rows that see no key
            return 0 (lse +inf).
        window_size: (left, right). If not (-1, -1), local attention: query i sees key j iff
            i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right, per sequence
            (-1: unbounded). (-1, 0) equals causal.
        softcap: float. 0.0 means off; else scores become softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch_size, nheads), float32. Adds the bias
            -slope * |i + seqlen_k - seqlen_q - j| to the score of query i and key j (after softcap).
        deterministic: bool. Affects the backward pass only: bitwise-reproducible dq.
        return_attn_probs: bool. Also return the log-sum-exp and, with dropout_p > 0, the
            attention-probability matrix S_dmask (an empty tensor when dropout_p == 0, as in the
            official package). For testing only."""


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Attention on q, k, v stacked in one tensor (self-attention with the three projections
    computed by one matmul). Faster for the backward than unpacking: the gradient is one tensor.

    Arguments:
        qkv: (batch_size, seqlen, 3, nheads, headdim).{args}
    Return:
        out: (batch_size, seqlen, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen), float32.
        S_dmask [optional, if return_attn_probs=True]: as in flash_attn_func.
    """
    return _attention(
        "qkv", (qkv,), None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Attention with k and v stacked in one tensor (cross-attention, or GQA/MQA when kv has
    fewer heads than q); the gradient of kv is one tensor.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim).
        kv: (batch_size, seqlen_k, 2, nheads_k, headdim); nheads must be a multiple of nheads_k.{args}
    Return:
        out: (batch_size, seqlen_q, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q), float32.
        S_dmask [optional, if return_attn_probs=True]: as in flash_attn_func.
    """
    return _attention(
        "kv", (q, kv), None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Attention over a batch of sequences of different lengths, concatenated without padding
    (see flash_cute.bert_padding to convert from padded batches).

    Arguments:
        q: (total_q, nheads, headdim), the query rows of all sequences one after another.
        k: (total_k, nheads_k, headdim); with block_table, a paged cache
            (num_pages, page_block_size, nheads_k, headdim). nheads must be a multiple of nheads_k.
        v: shaped like k.
        cu_seqlens_q: (batch_size + 1,), int32, on q's device: sequence b owns rows
            cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q. Sequences may be empty.
        cu_seqlens_k: (batch_size + 1,), int32: the same for k and v (with block_table: only the
            key lengths cu_seqlens_k[b + 1] - cu_seqlens_k[b] are used).
        max_seqlen_q: int. The longest query sequence: sizes the launch grid and nothing else.
            A value too small is still correct (the kernels loop), just slower; pass a bound you
            know on the host (e.g. the packing length) to avoid reading cu_seqlens back from the GPU.
        max_seqlen_k: int. The same for the keys.{args}
        block_table: (batch_size, max_num_pages_per_seq), int32, optional: paged K/V; key j of
            sequence b is row j % page_block_size of page block_table[b, j // page_block_size].
            Any page_block_size works; multiples of the kernel's key block (64) are read in place,
            others are gathered into contiguous rows first (a copy and one host sync). With
            gradients, the pages are gathered too and autograd adds dk, dv back into them.
        (The values of cu_seqlens_* and block_table are checked for CPU tensors, for CUDA tensors
        only with FLASH_CUTE_CHECK_INDICES=1: a host sync per call. Unchecked, a sequence whose
        values leave the tensors gets NaN rows, and nothing outside them is read or written;
        see docs/errors.md.)
    Return:
        out: (total_q, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (nheads, total_q), float32.
        S_dmask [optional, if return_attn_probs=True]: as in flash_attn_func.
    """
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    return _attention(
        "", (q, k, v), varlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_varlen_func with q, k, v stacked in one tensor; the gradient is one tensor.

    Arguments:
        qkv: (total, 3, nheads, headdim).
        cu_seqlens: (batch_size + 1,), int32: sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1].
        max_seqlen: int. The longest sequence (a launch-size hint; see flash_attn_varlen_func).{args}
    Return:
        out: (total, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (nheads, total), float32.
        S_dmask [optional, if return_attn_probs=True]: as in flash_attn_func.
    """
    varlen = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None)
    return _attention(
        "qkv", (qkv,), varlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_varlen_func with k and v stacked in one tensor; the gradient of kv is one tensor.

    Arguments:
        q: (total_q, nheads, headdim).
        kv: (total_k, 2, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,), int32.
        max_seqlen_q, max_seqlen_k: int, launch-size hints (see flash_attn_varlen_func).{args}
    Return:
        out: (total_q, nheads, headdim).
        softmax_lse [optional, if return_attn_probs=True]: (nheads, total_q), float32.
        S_dmask [optional, if return_attn_probs=True]: as in flash_attn_func.
    """
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None)
    return _attention(
        "kv", (q, kv), varlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def _index_vector(name: str, t, batch: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise FlashAttnTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise FlashAttnTypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.shape != (batch,):
        raise FlashAttnValueError(f"{name} must have shape (batch={batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"flash_cute: {name} is on {t.device}, expected q's device {device}")


def _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                   cache_leftpad, block_table, num_splits) -> int:
    """Validates the arguments of flash_attn_with_kvcache; returns each row's logical cache length."""
    _check_tensor("q", q, 4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, 4)
        _check_same(name, t, q)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise FlashAttnValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    batch, _, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise FlashAttnValueError(f"k_cache must have head dim {d} (q's), got shape {tuple(k_cache.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise FlashAttnValueError(f"head dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise FlashAttnValueError(
            f"the number of heads in q ({nheads}) must be a multiple of the number of heads in k_cache ({nheads_k})"
        )
    if q.is_cuda and (batch > _MAX_GRID_YZ or nheads > _MAX_GRID_YZ):
        raise FlashAttnValueError(f"batch ({batch}) and nheads ({nheads}) must each be at most {_MAX_GRID_YZ} on CUDA")
    if block_table is not None:
        _check_block_table(block_table, batch, q.device)
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise FlashAttnValueError("a paged cache (block_table) takes neither cache_batch_idx nor cache_leftpad")
        cache_len = block_table.shape[1] * k_cache.shape[1]
    else:
        cache_len = k_cache.shape[1]
    if (k is None) != (v is None):
        raise FlashAttnValueError("k and v must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, 4)
            _check_same(name, t, q)
            if t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:]:
                raise FlashAttnValueError(
                    f"{name} must have shape (batch={batch}, seqlen_new, nheads_k={nheads_k}, headdim={d}), got {tuple(t.shape)}"
                )
        if v.shape != k.shape:
            raise FlashAttnValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if cache_seqlens is None:
            raise FlashAttnValueError("appending k and v needs cache_seqlens (where to write them)")
    if isinstance(cache_seqlens, bool) or not (cache_seqlens is None or isinstance(cache_seqlens, (int, torch.Tensor))):
        raise FlashAttnTypeError(f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int) and not 0 <= cache_seqlens <= cache_len - (0 if k is None else k.shape[1]):
        raise FlashAttnValueError(
            f"cache_seqlens ({cache_seqlens}) plus the {0 if k is None else k.shape[1]} new rows must fit the "
            f"cache's {cache_len} rows"
        )
    if isinstance(cache_seqlens, torch.Tensor):
        _index_vector("cache_seqlens", cache_seqlens, batch, q.device)
    if cache_batch_idx is not None:
        _index_vector("cache_batch_idx", cache_batch_idx, batch, q.device)
    if cache_leftpad is not None:
        _index_vector("cache_leftpad", cache_leftpad, batch, q.device)
    if (rotary_cos is None) != (rotary_sin is None):
        raise FlashAttnValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise FlashAttnValueError("rotary embedding (rotary_cos, rotary_sin) needs the new k and v")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_tensor(name, t, 2)
            _check_same(name, t, q)
        if rotary_sin.shape != rotary_cos.shape:
            raise FlashAttnValueError(f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}")
        if 2 * rotary_cos.shape[1] > d:
            raise FlashAttnValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]}) must be <= headdim ({d})")
        if rotary_cos.shape[0] < cache_len:
            raise FlashAttnValueError(
                f"rotary_cos must have a row for every cache position ({cache_len}), got {rotary_cos.shape[0]}"
            )
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise FlashAttnValueError(f"num_splits must be a non-negative int, got {num_splits!r}")
    return cache_len


# Packed query rows (seqlen_q * nheads / nheads_k) up to which the split-KV kernel runs: its CTAs
# own 16 rows and each reads the whole cache, where the forward kernel's own 128.
_DECODE_MAX_PACKED_ROWS = 64


def _decode_kernel_applies(q, k_cache, block_table, cache_leftpad, causal: bool) -> bool:
    """Whether flash_attn_with_kvcache runs the split-KV kernel (else the varlen forward kernel)."""
    if not (q.is_cuda and q.dtype in _ops._KERNEL_DTYPES):
        return False
    _, seqlen_q, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    packed = seqlen_q * (nheads // nheads_k)
    if -(-packed // 16) * nheads_k > _MAX_GRID_YZ:
        return False
    if block_table is not None:
        page_size = k_cache.shape[1]
        if page_size % 16 != 0:
            return False  # gathered for the forward kernel
        if page_size % _ops._fwd_block_n(d, causal) != 0:
            return True  # in place here; the forward kernel would gather it
    return packed <= _DECODE_MAX_PACKED_ROWS or cache_leftpad is not None


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of x (batch, rows, heads, d) at positions (batch, rows)."""
    flat = reference._apply_rotary(x.reshape(-1, *x.shape[2:]), cos, sin, positions.reshape(-1), interleaved)
    return flat.view(x.shape)


@torch.no_grad()
def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q against a key/value cache, for decoding; k and v (if given) are first
    written into the cache in place, at positions cache_seqlens, and attended to in the same call.

    Batch row b reads cache row cache_batch_idx[b] (default b), or the pages of block_table[b].
    With s = cache_seqlens[b], n = the new rows and p = cache_leftpad[b] (default 0), it attends
    to cache positions p .. s + n - 1; causal is aligned to the bottom-right corner of them. With
    rotary_cos / rotary_sin the new k rows are rotated at positions s, s + 1, ... before they are
    stored, and q at positions s, s + 1, ... when causal, at s for every row when not (rotary_dim =
    2 * rotary_cos.shape[1] <= headdim; interleaved pairs dims (0, 1), (2, 3), ..., else
    (i, i + rotary_dim / 2) as GPT-NeoX). Multi-query and grouped-query attention as elsewhere.

    On the GPU, few query rows per KV head (seqlen_q * nheads / nheads_k <= 64: decoding,
    speculative decoding) run the split-KV (Flash-Decoding) kernel, which packs the query heads of
    a KV head into one tile and splits the keys over as many CTAs as fill the GPU, then merges the
    splits, and writes k and v into the cache in the same pass; longer queries run the forward
    kernel over the cache rows after an append kernel. The rotary embedding of q and k is torch ops
    ahead of the kernels. Page sizes: any multiple of 16 is read in place
    (others are gathered, with a host sync). Forward only, as in the official package.

    The values of cache_seqlens, cache_batch_idx, cache_leftpad and block_table must stay in
    their caches' bounds: CPU tensors are checked (FlashAttnValueError), CUDA tensors only with
    FLASH_CUTE_CHECK_INDICES=1, which costs a host sync per call. Unchecked, a batch row whose
    values leave the cache gets NaN output and lse and appends nothing; nothing outside the
    caches is written (docs/errors.md).

    Arguments:
        q: (batch_size, seqlen, nheads, headdim).
        k_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or with block_table
            (num_blocks, page_block_size, nheads_k, headdim).
        v_cache: shaped like k_cache.
        k [optional]: (batch_size, seqlen_new, nheads_k, headdim), written at cache_seqlens.
        v [optional]: shaped like k.
        rotary_cos [optional]: (seqlen_ro >= the cache length, rotary_dim / 2).
        rotary_sin [optional]: the same.
        cache_seqlens: int, or (batch_size,) int32: the rows already in each cache row (where the
            new ones go). None: the whole cache.
        cache_batch_idx [optional]: (batch_size,) int32: the cache row of each batch row.
        cache_leftpad [optional]: (batch_size,) int32: the first valid position of each cache row.
        block_table [optional]: (batch_size, max_num_blocks_per_seq) int32: paged cache.
        softmax_scale: float. Defaults to 1 / sqrt(headdim).
        causal: bool.
        window_size, softcap, alibi_slopes: as in flash_attn_func (with a window, rotary
            queries are positional, as with causal).
        rotary_interleaved: bool.
        num_splits: int. 0: a heuristic from the batch, heads, cache capacity and GPU (never the
            current lengths, so CUDA graphs stay valid as the cache grows); 1: no split; N > 1: N
            splits (at most 128). Only the split-KV kernel splits (see above).
        return_softmax_lse: bool.
    Return:
        out: (batch_size, seqlen, nheads, headdim).
        softmax_lse [optional, if return_softmax_lse=True]: (batch_size, nheads, seqlen), float32.
    """
    cache_len = _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                               cache_leftpad, block_table, num_splits)
    if _check_index_values(q):
        _check_kvcache_values(k_cache, 0 if k is None else k.shape[1], cache_len, cache_seqlens, cache_batch_idx,
                              cache_leftpad, block_table)
    batch, seqlen_q, nheads, d = q.shape
    softcap = _check_options(q, softcap, alibi_slopes, batch, nheads)
    causal, window = _normalize_window(window_size, bool(causal), cache_len)
    decode = _decode_kernel_applies(q, k_cache, block_table, cache_leftpad, causal)
    if q.is_cuda and q.dtype in _ops._KERNEL_DTYPES and not decode:
        # before the append: a refused call changes nothing (the decoding kernel takes every option)
        _ops._check_kernel_options(_ops._Options(softcap, window, alibi_slopes), q.dtype, d)
    # Rotary: query row i sits at position s + i when causal or local, else every row at s.
    positional_q = causal or window != (-1, -1)
    device = q.device
    seqlen_new = 0 if k is None else k.shape[1]
    if rotary_cos is not None and positional_q and rotary_cos.shape[0] < cache_len + seqlen_q - seqlen_new:
        # causal rotates query row i at cache_seqlens + i: up to seqlen_q - seqlen_new rows past
        # the last cache position
        raise FlashAttnValueError(
            f"rotary_cos must have a row for every cache position and, with causal, for the "
            f"{seqlen_q - seqlen_new} query rows past them ({cache_len + seqlen_q - seqlen_new}), "
            f"got {rotary_cos.shape[0]}"
        )
    softmax_scale = _check_softmax_scale(softmax_scale, d)
    # The split-KV kernel appends k and v itself where it can write the caches in place. A traced
    # call (torch.compile, torch.export) cannot read data pointers: the op checks the caches
    # when it runs, and appends into kernel-ready copies that it copies back if need be.
    tracing = torch.compiler.is_compiling()
    fused_append = (decode and k is not None and d % 8 == 0
                    and (tracing or (_ops.kernel_ready(k_cache) and _ops.kernel_ready(v_cache))))
    seqlens = rows = None
    if rotary_cos is not None or (k is not None and not fused_append) or not decode:
        if cache_seqlens is None:
            seqlens = torch.full((batch,), cache_len, dtype=torch.long, device=device)
        elif isinstance(cache_seqlens, int):
            seqlens = torch.full((batch,), cache_seqlens, dtype=torch.long, device=device)
        else:
            seqlens = cache_seqlens.long()
        rows = torch.arange(batch, device=device) if cache_batch_idx is None else cache_batch_idx.long()
    # Unchecked CUDA index values (see CHECK_INDEX_VALUES) are held to the tensors below: rotary
    # positions are clamped to the tables (a row whose values are out of range gets NaN anyway),
    # the append and the kernels skip what lies outside the caches.
    last_rotary = None if rotary_cos is None else rotary_cos.shape[0] - 1
    # 1. The new keys rotated at their positions s, s + 1, ..., and appended (here, or by the kernel).
    if k is not None:
        if rotary_cos is not None:
            positions = seqlens[:, None] + torch.arange(seqlen_new, device=device)
            k = _rotate(k, rotary_cos, rotary_sin, positions.clamp_(0, last_rotary), rotary_interleaved)
        if not fused_append:  # else the kernel writes them
            (_ops.append_kv if tracing else _ops.append_kv_eager)(k_cache, v_cache, k, v, seqlens, cache_batch_idx,
                                                                   cache_leftpad, block_table)
    # 2. q rotated at s + i (causal or local) or at s for every row.
    if rotary_cos is not None:
        offsets = (torch.arange(seqlen_q, device=device) if positional_q
                   else torch.zeros(seqlen_q, dtype=torch.long, device=device))
        q = _rotate(q, rotary_cos, rotary_sin, (seqlens[:, None] + offsets).clamp_(0, last_rotary), rotary_interleaved)
    # 3. Attention: the split-KV kernel, or the varlen forward kernel with cache rows read as pages
    # (a negative scale as in _attention: on -q).
    if softmax_scale < 0:
        q, softmax_scale = -q, -softmax_scale
    if decode:
        dense = [None if t is None else t.contiguous() for t in (cache_batch_idx, cache_leftpad, block_table)]
        out, lse = (_ops.decode if tracing else _ops.decode_eager)(
            _pad_head_dim(q), _pad_head_dim(k_cache), _pad_head_dim(v_cache),
            k if fused_append else None, v if fused_append else None, float(softmax_scale), causal,
            cache_len if cache_seqlens is None else (cache_seqlens if isinstance(cache_seqlens, int) else 0),
            seqlen_new, cache_seqlens.contiguous() if isinstance(cache_seqlens, torch.Tensor) else None,
            *dense, num_splits, softcap, *window, alibi_slopes,
        )
        if out.shape[-1] != d:
            out = out[..., :d]
        return (out, lse) if return_softmax_lse else out
    keys, values = k_cache, v_cache
    leftpad = 0 if cache_leftpad is None else cache_leftpad.long()
    # Index values the host has not checked (CUDA): a row whose values leave the cache attends to
    # no key here and gets NaN below.
    bad = (seqlens < 0) | (seqlens + seqlen_new > cache_len) | (leftpad < 0) | (leftpad > seqlens)
    if block_table is not None:
        bad |= _ops.unpaged_entries(block_table, seqlens + seqlen_new, k_cache.shape[1], k_cache.shape[0]).any(1)
        table = block_table
    else:
        bad |= (rows < 0) | (rows >= k_cache.shape[0])
        rows = rows.masked_fill(bad, 0)
        if cache_leftpad is None:
            table = rows[:, None].to(torch.int32)  # one page per cache row
        else:  # the visible rows start at the left padding: gathered to the front of each row
            index = (leftpad[:, None] + torch.arange(cache_len, device=device)).clamp_(0, cache_len - 1)
            keys, values = k_cache[rows[:, None], index], v_cache[rows[:, None], index]
            table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    visible = (seqlens + seqlen_new - leftpad).masked_fill_(bad, 0)
    cu_seqlens_k = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu_seqlens_k[1:] = visible.cumsum(0)
    cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    q = _pad_head_dim(q)
    out, lse, _ = _ops.fwd_call(
        q.reshape(batch * seqlen_q, nheads, q.shape[-1]), _pad_head_dim(keys), _pad_head_dim(values),
        float(softmax_scale), causal, False, cu_seqlens_q, cu_seqlens_k, seqlen_q, cache_len, table, softcap, *window,
        alibi_slopes,
    )
    out = out[..., :d].reshape(batch, seqlen_q, nheads, d).masked_fill_(bad[:, None, None, None], math.nan)
    if return_softmax_lse:
        lse = lse.view(nheads, batch, seqlen_q).transpose(0, 1).masked_fill(bad[:, None, None], math.nan)
        return out, lse.contiguous()
    return out


for _f in (flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_func,
           flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func):
    _f.__doc__ = _f.__doc__.replace("{args}", _ATTENTION_ARGS_DOC)
del _f
