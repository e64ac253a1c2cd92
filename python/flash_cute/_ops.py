"""The torch.library operators behind the public functions.

``flash_cute::fwd`` is the forward pass on tensors whose head dim is a multiple of 8 (the public
functions pad other head dims first). Its CUDA implementation hands device pointers, strides and
the current stream to the compiled module ``flash_cute._C``; every other device and float32 run
:mod:`flash_cute.reference`. The fake implementation gives torch.compile the output shapes.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import NamedTuple, Optional

import torch

from . import reference
from .errors import FlashAttnNotImplementedError

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_warned_slow_path = False


@functools.cache
def _C():
    """The compiled module, imported on first use so that CPU-only code never needs it."""
    from . import _C as module

    return module


def kernel_ready(t: torch.Tensor) -> bool:
    """Whether the kernels read (and write) t in place: a 16-byte aligned base, strides that are
    multiples of 8 elements, the last dimension contiguous."""
    strides = t.stride()
    return strides[-1] == 1 and t.data_ptr() % 16 == 0 and math.gcd(*strides[:-1]) % 8 == 0


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels load 16-byte vectors: a base address aligned to 16 bytes, strides that are
    multiples of 8 elements. Anything else (offset views, odd strides) is copied once."""
    return t if kernel_ready(t) else t.clone(memory_format=torch.contiguous_format)


def _stream(device_index: int) -> int:
    """The handle of the current CUDA stream of the device: where the kernels are launched."""
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # skips building a Stream object
    if get_raw is not None:
        return get_raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def _dtype_code(dtype: torch.dtype) -> int:
    return _C().kDTypeFloat16 if dtype == torch.float16 else _C().kDTypeBFloat16


class _Varlen(NamedTuple):
    """A variable-length batch: sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q
    (total_q, nheads, d) and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k, v (total_k, nheads_k, d);
    with a block table, k and v are pages (num_pages, page_size, nheads_k, d) instead."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int  # size hints for the launch grid only: the kernels loop past them
    max_seqlen_k: int
    block_table: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


class _Options(NamedTuple):
    """softcap, the local window (left, right) (-1: unbounded), ALiBi slopes ((nheads,) or
    (batch, nheads) float32), with flash_attn's semantics (see reference._logits), and dropout:
    dropout_p with rng_state, int64 (seed, offset) drawn from torch's generator by the caller (the
    forward and the backward pass draw the same mask from it)."""

    softcap: float = 0.0
    window: tuple[int, int] = (-1, -1)
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    rng_state: torch.Tensor | None = None

    def kernel_option_names(self) -> list[str]:
        """The options that need the kernels with options (every kernel takes local windows)."""
        return [n for n, on in (("softcap", self.softcap != 0.0), ("alibi_slopes", self.alibi_slopes is not None),
                                ("dropout_p", self.dropout_p != 0.0)) if on]

    def kernel_args(self) -> tuple:
        """The options as _C.fwd / _C.bwd take them."""
        alibi = self.alibi_slopes
        return (self.softcap, *self.window, _ptr(alibi), 0 if alibi is None or alibi.dim() == 1 else alibi.stride(0),
                self.dropout_p, _ptr(self.rng_state))

    def dropout_mask(self, shape, device) -> torch.Tensor | None:
        """The reference path's keep mask: a generator seeded from rng_state (a host read)."""
        if self.dropout_p == 0.0:
            return None
        seed, offset = (int(x) for x in self.rng_state.tolist())
        generator = torch.Generator(device=device).manual_seed((seed ^ (offset << 1)) & ((1 << 63) - 1))
        return torch.rand(shape, generator=generator, device=device) >= self.dropout_p

    def reference_kwargs(self, sequence: int | None = None) -> dict:
        """The reference functions' keyword arguments (but the dropout mask); ``sequence``: those
        of one sequence of a variable-length batch (its row of (batch, nheads) slopes)."""
        alibi = self.alibi_slopes
        if alibi is not None and alibi.dim() == 2 and sequence is not None:
            alibi = alibi[sequence]
        return dict(softcap=self.softcap, window_size=self.window, alibi_slopes=alibi, dropout_p=self.dropout_p)


@functools.cache
def _option_kernels() -> frozenset:
    return frozenset(_C().built_option_kernels())


@functools.cache
def _has_option_kernels_cached(dtype_name: str, head_dim: int) -> bool:
    return (dtype_name, _C().head_dim_bucket(head_dim)) in _option_kernels()


# Facts about the build, asked of the compiled module: torch.compile and torch.export take their
# values at trace time (Dynamo cannot trace into the extension; they never change). The marker
# sits on a plain function: Dynamo looks through functools.cache wrappers and would miss it.
@torch.compiler.assume_constant_result
def _has_option_kernels(dtype_name: str, head_dim: int) -> bool:
    return _has_option_kernels_cached(dtype_name, head_dim)


def _check_kernel_options(options: _Options, dtype: torch.dtype, head_dim: int) -> None:
    """The kernels with options exist in this build for (dtype, head dim), else a clear error."""
    names = options.kernel_option_names()
    if not names:
        return
    key = ("fp16" if dtype == torch.float16 else "bf16", head_dim)
    if not _has_option_kernels(*key):
        raise FlashAttnNotImplementedError(
            f"flash_cute: {', '.join(names)} needs the kernels with options, which this build "
            f"does not have for {key[0]}, head dim {head_dim} (build_config: {dict(_C().build_config)}); "
            "rebuild with FLASH_CUTE_OPTION_KERNELS=ON"
        )


def round_up_128(n: int) -> int:
    return -(-n // 128) * 128


def _make_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=None):
    """The kernels index cu_seqlens and the block table's rows as dense arrays: views with other
    strides are copied (they are tiny)."""
    if cu_seqlens_q is None:
        return None
    if block_table is not None and block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    return _Varlen(cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k, block_table)


def _dims(q: torch.Tensor, k: torch.Tensor, varlen: _Varlen | None):
    """(batch, seqlen_q, seqlen_k) as the kernels see them (varlen: the size hints)."""
    if varlen is None:
        return q.shape[0], q.shape[1], k.shape[1]
    return varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k


def _strides(t: torch.Tensor, varlen: _Varlen | None = None) -> tuple[int, int, int]:
    """(batch, row, head) strides in elements; concatenated varlen rows have batch stride 0."""
    if varlen is None or t.dim() == 4:  # padded batch, or pages (the page stride)
        return t.stride()[:3]
    return (0, t.stride(0), t.stride(1))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _lse_strides(lse: torch.Tensor, varlen: _Varlen | None) -> tuple[int, int]:
    """(batch, head) strides of lse: (batch, nheads, seqlen_q), or (nheads, total_q) for varlen."""
    return (lse.stride(0), lse.stride(1)) if varlen is None else (0, lse.stride(0))


def _varlen_args(varlen: _Varlen | None, q: torch.Tensor, k: torch.Tensor, block_table=None) -> tuple:
    """cu_seqlens_q, cu_seqlens_k as pointers and the bounds the kernels hold their values to
    (rows of q, rows or pages of k, block-table columns): the host never reads them."""
    if varlen is None:
        return 0, 0, (0, 0, 0)
    return (varlen.cu_seqlens_q.data_ptr(), varlen.cu_seqlens_k.data_ptr(),
            (q.shape[0], k.shape[0], 0 if block_table is None else block_table.shape[1]))


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """The rows of a paged K or V cache (num_pages, page_size, nheads_k, d) as the concatenated
    varlen rows (total_k, nheads_k, d): key j of sequence b is row j % page_size of page
    block_table[b, j // page_size]. Differentiable in ``cache``; one host sync (total_k). The
    values must be in range: checked ones, or those checked_pages returns."""
    page_size = cache.shape[1]
    cu = cu_seqlens_k.long()
    rows = torch.arange(int(cu[-1]), device=cache.device)
    seq = torch.searchsorted(cu, rows, right=True) - 1
    j = rows - cu[seq]
    return cache[block_table.long()[seq, j // page_size], j % page_size]


def unpaged_entries(block_table: torch.Tensor, keys: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    """(batch, width) bool: the block-table entries that batch row b uses (its first
    ceil(keys[b] / page_size)) and that are not pages of the cache (outside [0, num_pages)).
    Unused entries may hold anything."""
    in_use = torch.arange(block_table.shape[1], device=block_table.device) * page_size < keys[:, None]
    return in_use & ((block_table < 0) | (block_table >= num_pages))


def checked_pages(block_table: torch.Tensor, cu_seqlens_k: torch.Tensor, num_pages: int,
                  page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged K/V about to be gathered, with index values the host has not checked (CUDA): the
    sequences whose cu_seqlens_k or used block-table entries are out of range (bad, (batch,)
    bool), and cu_seqlens_k with their lengths set to 0, safe for gather_pages. Their rows get NaN
    afterwards (nan_rows), as the kernels do for the pages they read in place. No host sync."""
    lens = cu_seqlens_k[1:].long() - cu_seqlens_k[:-1].long()
    width = block_table.shape[1]
    bad = (cu_seqlens_k[:-1] < 0) | (lens < 0) | (lens > width * page_size)
    bad |= unpaged_entries(block_table, lens, page_size, num_pages).any(1)
    safe = torch.zeros_like(cu_seqlens_k)
    safe[1:] = lens.masked_fill(bad, 0).cumsum(0)
    return bad, safe


def nan_rows(out: torch.Tensor, lse: torch.Tensor, bad: torch.Tensor, cu_seqlens_q: torch.Tensor):
    """out (total_q, nheads, d) and lse (nheads, total_q) of a varlen call with NaN in the rows of
    the sequences marked bad (see checked_pages). Out of place: autograd may hold out."""
    rows = torch.arange(out.shape[0], device=out.device)
    seq = (torch.searchsorted(cu_seqlens_q, rows.to(cu_seqlens_q.dtype), right=True) - 1).clamp_(0, bad.numel() - 1)
    mask = bad[seq]
    return out.masked_fill(mask[:, None, None], math.nan), lse.masked_fill(mask[None, :], math.nan)


@functools.cache
def _fwd_block_n_cached(head_dim: int, causal: bool) -> int:
    return _C().fwd_tile(head_dim, causal)[1]


@torch.compiler.assume_constant_result  # see _has_option_kernels
def _fwd_block_n(head_dim: int, causal: bool) -> int:
    return _fwd_block_n_cached(head_dim, causal)


def _s_dmask(q, k, varlen: _Varlen | None, options: _Options, return_softmax: bool) -> torch.Tensor:
    """return_attn_probs' matrix (batch, nheads, seqlen_q and seqlen_k rounded up to 128) in q's
    dtype, zeros, for the forward to fill; an empty tensor without dropout or when not asked for."""
    if not (return_softmax and options.dropout_p > 0):
        return q.new_empty((0,))
    batch, seqlen_q, seqlen_k = _dims(q, k, varlen)
    return q.new_zeros((batch, q.shape[-2], round_up_128(seqlen_q), round_up_128(seqlen_k)))


def _cuda_fwd(q, k, v, softmax_scale: float, causal: bool, varlen: _Varlen | None, options: _Options,
              s_dmask: torch.Tensor):
    batch, seqlen_q, seqlen_k = _dims(q, k, varlen)
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (batch, nheads, seqlen_q) if varlen is None else (nheads, q.shape[0])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if k.numel() == 0 or batch == 0:  # no key at all: every row is empty
        return out.zero_(), lse.fill_(math.inf)
    _check_kernel_options(options, q.dtype, d)
    block_table, page_size = (None, 0) if varlen is None else (varlen.block_table, k.shape[1])
    bad = None
    if block_table is not None and page_size % _fwd_block_n(d, causal) != 0:
        # The kernel reads whole key blocks from one page; other page sizes are gathered first.
        bad, cu_k = checked_pages(block_table, varlen.cu_seqlens_k, k.shape[0], page_size)
        k, v = gather_pages(k, block_table, cu_k), gather_pages(v, block_table, cu_k)
        varlen, block_table = varlen._replace(cu_seqlens_k=cu_k, block_table=None), None
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    s_dmask_layout = (*s_dmask.stride()[:3], *s_dmask.shape[2:]) if s_dmask.numel() else (0, 0, 0, 0, 0)
    _C().fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        batch, seqlen_q, seqlen_k, nheads, nheads_k, d,
        _strides(q, varlen), _strides(k, varlen), _strides(v, varlen), _strides(out, varlen),
        _lse_strides(lse, varlen), softmax_scale, causal, options.kernel_args(),
        _ptr(s_dmask) if s_dmask.numel() else 0, s_dmask_layout, *_varlen_args(varlen, q, k, block_table),
        _ptr(block_table), 0 if block_table is None else block_table.stride(0), page_size,
        _dtype_code(q.dtype), q.device.index,
        _stream(q.device.index),
    )
    if bad is not None:
        out, lse = nan_rows(out, lse, bad, varlen.cu_seqlens_q)
    return out, lse


def _reference_s_dmask(dst, q, k, softmax_scale, causal, options: _Options, keep, sequence=None):
    """Fills return_attn_probs' matrix on the reference path (dst: (batch, nheads, rows, cols), or
    one sequence's (1, nheads, rows, cols)): the kernels' blockwise probabilities
    (reference.blockwise_probs), negated where dropped, cut to what dst holds."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return
    kwargs = options.reference_kwargs(sequence)
    probs = reference.blockwise_probs(q, k, softmax_scale, causal, _fwd_block_n(q.shape[-1], False),
                                      kwargs["softcap"], kwargs["window_size"], kwargs["alibi_slopes"])
    rows, cols = min(q.shape[1], dst.shape[2]), min(k.shape[1], dst.shape[3])
    dst[:, :, :rows, :cols] = torch.where(keep, probs, -probs)[:, :, :rows, :cols].to(dst.dtype)


def _reference_fwd(q, k, v, softmax_scale: float, causal: bool, options: _Options, s_dmask):
    batch, seqlen_q, nheads = q.shape[:3]
    keep = options.dropout_mask((batch, nheads, seqlen_q, k.shape[1]), q.device)
    out, lse = reference.attention_forward(q, k, v, softmax_scale, causal, dropout_mask=keep, **options.reference_kwargs())
    if keep is not None and s_dmask.numel():
        _reference_s_dmask(s_dmask, q, k, softmax_scale, causal, options, keep)
    return out, lse


def _reference_varlen_fwd(q, k, v, softmax_scale: float, causal: bool, varlen: _Varlen, options: _Options, s_dmask):
    """The reference path of a variable-length batch: one sequence at a time."""
    if varlen.block_table is not None:
        k = gather_pages(k, varlen.block_table, varlen.cu_seqlens_k)
        v = gather_pages(v, varlen.block_table, varlen.cu_seqlens_k)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), math.inf, dtype=torch.float32, device=q.device)
    masks = _varlen_dropout_masks(varlen, q.shape[1], options, q.device)
    for b, ((q0, q1), (k0, k1)) in enumerate(_sequences(varlen)):
        qb, kb = q[None, q0:q1], k[None, k0:k1]
        o, l = reference.attention_forward(qb, kb, v[None, k0:k1], softmax_scale, causal, dropout_mask=masks[b],
                                           **options.reference_kwargs(b))
        out[q0:q1], lse[:, q0:q1] = o[0], l[0]
        if masks[b] is not None and s_dmask.numel():
            _reference_s_dmask(s_dmask[b : b + 1], qb, kb, softmax_scale, causal, options, masks[b], b)
    return out, lse


def _sequences(varlen: _Varlen):
    """((q0, q1), (k0, k1)) row ranges of each sequence (a host sync, for the reference path)."""
    cu_q, cu_k = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    return [((cu_q[b], cu_q[b + 1]), (cu_k[b], cu_k[b + 1])) for b in range(varlen.batch)]


def _attention_fwd(q, k, v, softmax_scale, causal, varlen, options: _Options, return_softmax: bool):
    s_dmask = _s_dmask(q, k, varlen, options, return_softmax)
    if q.is_cuda and q.dtype in _KERNEL_DTYPES:
        return (*_cuda_fwd(q, k, v, softmax_scale, causal, varlen, options, s_dmask), s_dmask)
    if q.is_cuda:
        _warn_slow_path(q.dtype)
    if varlen is not None:
        return (*_reference_varlen_fwd(q, k, v, softmax_scale, causal, varlen, options, s_dmask), s_dmask)
    return (*_reference_fwd(q, k, v, softmax_scale, causal, options, s_dmask), s_dmask)


def _varlen_dropout_masks(varlen: _Varlen, nheads: int, options: _Options, device) -> list:
    """Each sequence's keep mask (1, nheads, len_q, len_k), from one draw in sequence order."""
    spans = _sequences(varlen)
    if options.dropout_p == 0.0:
        return [None] * len(spans)
    sizes = [(q1 - q0) * (k1 - k0) * nheads for (q0, q1), (k0, k1) in spans]
    flat = options.dropout_mask((sum(sizes),), device)
    pieces = flat.split(sizes)
    return [m.view(1, nheads, q1 - q0, k1 - k0) for m, ((q0, q1), (k0, k1)) in zip(pieces, spans)]


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool = False,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    block_table: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, softmax_lse, S_dmask): out like q; lse float32 (batch, nheads, seqlen_q), or
    for a variable-length batch (cu_seqlens_q given; q (total_q, nheads, d)) (nheads, total_q);
    S_dmask: with return_softmax and dropout, the probabilities (negated where dropped) as
    flash_attn returns them, (batch, nheads, seqlen_q and seqlen_k rounded up to 128), else empty.
    ``deterministic`` is not used by the forward pass; it is carried to the backward pass.
    softcap, window_left/right, alibi_slopes, dropout_p, rng_state: see _Options."""
    varlen = _make_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    options = _Options(softcap, (window_left, window_right), alibi_slopes, dropout_p, rng_state)
    return _attention_fwd(q, k, v, softmax_scale, causal, varlen, options, return_softmax)


fwd = torch.library.custom_op("flash_cute::fwd", _fwd_impl, mutates_args=())


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
def _(q, k, v, softmax_scale, causal, deterministic=False, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0, block_table=None, softcap=0.0, window_left=-1, window_right=-1,
      alibi_slopes=None, dropout_p=0.0, rng_state=None, return_softmax=False):
    varlen = None if cu_seqlens_q is None else _Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    s_dmask = _s_dmask(q, k, varlen, _Options(dropout_p=dropout_p), return_softmax)
    if varlen is not None:
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32), s_dmask
    batch, seqlen_q, nheads, d = q.shape
    return (q.new_empty((batch, seqlen_q, nheads, d)), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32),
            s_dmask)


# How the backward kernel reduces dK and dV over the query heads that share a KV head (GQA/MQA):
# "in_kernel": one CTA per KV head walks all its query heads and accumulates in registers (no
# extra memory); "expand": one CTA per query head writes nheads-sized dK/dV that are summed
# afterwards (what the official package does). Kept switchable so benchmark/run.py can compare.
GQA_BWD_REDUCTION = "in_kernel"


def _cuda_bwd(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, deterministic: bool,
              varlen: _Varlen | None, options: _Options, dq, dk, dv):
    """Writes the gradients into dq, dk, dv (shaped like q, k, v; any strides the kernels take)."""
    batch, seqlen_q, seqlen_k = _dims(q, k, varlen)
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if dq.numel() == 0 or dk.numel() == 0 or batch == 0:  # nothing to attend: every gradient is zero
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    _check_kernel_options(options, q.dtype, d)
    expand = nheads != nheads_k and GQA_BWD_REDUCTION == "expand"
    if expand:
        dk_buf = torch.empty((*k.shape[:-2], nheads, d), dtype=q.dtype, device=q.device)
        dv_buf = torch.empty_like(dk_buf)
    else:
        dk_buf, dv_buf = dk, dv
    dout, q, k, v, out = (_kernel_ready(t) for t in (dout, q, k, v, out))
    dq_k, dk_k, dv_k = (_kernel_ready(t) for t in (dq, dk_buf, dv_buf))  # copies only for odd strides
    lse = lse.contiguous()
    # Workspace with every sequence padded to whole tiles of the kernel (block_m rows, the
    # kernel's head dim; see workspace_row0 in include/flash_cute/seqlen.h), filled by the kernels:
    # the fp32 dQ accumulator, rowsum(dout * out) and lse * log2(e). Padding spares the main loop
    # every bounds check on them.
    block_m, cols = _bwd_tile_rows_cols(d, q.device.index, os.environ.get("FLASH_CUTE_FORCE_SMALL_SMEM_TILE"))
    if varlen is None:
        ws_rows = batch * (-(-seqlen_q // block_m) * block_m)
    else:
        ws_rows = -(-(q.shape[0] + batch * block_m) // block_m) * block_m
    dq_accum = torch.empty((nheads, ws_rows, cols), dtype=torch.float32, device=q.device)
    row_stats = torch.empty((2, nheads, ws_rows), dtype=torch.float32, device=q.device)  # D, lse*log2(e)
    semaphore = (
        torch.zeros((nheads * ws_rows // block_m,), dtype=torch.int32, device=q.device) if deterministic else None
    )
    _C().bwd(
        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        dq_k.data_ptr(), dk_k.data_ptr(), dv_k.data_ptr(), dq_accum.data_ptr(), row_stats[0].data_ptr(),
        row_stats[1].data_ptr(), _ptr(semaphore), ws_rows,
        batch, seqlen_q, seqlen_k, nheads, nheads_k, d, expand,
        _strides(q, varlen), _strides(k, varlen), _strides(v, varlen), _strides(out, varlen),
        _strides(dout, varlen), _strides(dq_k, varlen), _strides(dk_k, varlen), _strides(dv_k, varlen),
        _lse_strides(lse, varlen), softmax_scale, causal, options.kernel_args(), *_varlen_args(varlen, q, k),
        _dtype_code(q.dtype), q.device.index,
        _stream(q.device.index),
    )
    if expand:
        groups = nheads // nheads_k
        torch.sum(dk_k.unflatten(-2, (nheads_k, groups)), dim=-2, out=dk)
        torch.sum(dv_k.unflatten(-2, (nheads_k, groups)), dim=-2, out=dv)
        dk_k, dv_k = dk, dv
    for dst, src in ((dq, dq_k), (dk, dk_k), (dv, dv_k)):
        if dst is not src:
            dst.copy_(src)


def _reference_bwd(dout, q, k, v, out, lse, softmax_scale, causal, varlen, options: _Options):
    if varlen is None:
        keep = options.dropout_mask((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), q.device)
        return reference.attention_backward(dout, q, k, v, out, lse, softmax_scale, causal, dropout_mask=keep,
                                            **options.reference_kwargs())
    if varlen.block_table is not None:
        raise FlashAttnNotImplementedError(
            "flash_cute: the backward pass of paged K/V (block_table) runs on the gathered rows; "
            "call flash_attn_varlen_func, which gathers the pages when gradients are needed"
        )
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    masks = _varlen_dropout_masks(varlen, q.shape[1], options, q.device)
    for b, ((q0, q1), (k0, k1)) in enumerate(_sequences(varlen)):
        grads = reference.attention_backward(
            dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
            lse[None, :, q0:q1], softmax_scale, causal, dropout_mask=masks[b], **options.reference_kwargs(b),
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv


def _attention_bwd_into(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, varlen, options: _Options,
                        dq, dk, dv):
    if q.is_cuda and q.dtype in _KERNEL_DTYPES:
        return _cuda_bwd(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, varlen, options, dq, dk, dv)
    if q.is_cuda:
        _warn_slow_path(q.dtype)
    for dst, src in zip((dq, dk, dv), _reference_bwd(dout, q, k, v, out, lse, softmax_scale, causal, varlen, options)):
        dst.copy_(src)


@functools.cache
def _bwd_tile_rows_cols(head_dim: int, device: int, _force_small_tile: str | None) -> tuple[int, int]:
    """(block_m, kernel head dim) of the backward kernel that runs on `device`: the padding of its
    workspace (the head dim is the bucket's, or 256 where d224 runs d256's small tile). The
    small-shared-memory tile's testing hook (the environment variable) picks the tile too, so it
    is part of the cache's key."""
    tile = _C().bwd_tile(head_dim, device)
    return tile[0], tile[3]


def _bwd_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash_cute::fwd, shaped and typed like q, k, v (contiguous)."""
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    varlen = _make_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = _Options(softcap, (window_left, window_right), alibi_slopes, dropout_p, rng_state)
    _attention_bwd_into(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, varlen, options, dq, dk, dv)
    return dq, dk, dv


bwd = torch.library.custom_op("flash_cute::bwd", _bwd_impl, mutates_args=())


@bwd.register_fake
def _(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, cu_seqlens_q=None,
      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, softcap=0.0, window_left=-1, window_right=-1,
      alibi_slopes=None, dropout_p=0.0, rng_state=None):
    # Contiguous, like both implementations' results (empty_like would copy q's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bwd_into_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softcap: float,
    window_left: int,
    window_right: int,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    rng_state: Optional[torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """flash_cute::bwd writing into given tensors (the packed functions pass views of one
    gradient buffer, so the packed gradient needs no copy)."""
    varlen = _make_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = _Options(softcap, (window_left, window_right), alibi_slopes, dropout_p, rng_state)
    _attention_bwd_into(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, varlen, options, dq, dk, dv)


bwd_into = torch.library.custom_op("flash_cute::bwd_into", _bwd_into_impl, mutates_args=("dq", "dk", "dv"))


@bwd_into.register_fake
def _(dout, q, k, v, out, softmax_lse, softmax_scale, causal, deterministic, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, softcap, window_left, window_right, alibi_slopes, dropout_p, rng_state, dq, dk, dv):
    return None


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, *rest = inputs
    rest += [False, None, None, 0, 0, None, 0.0, -1, -1, None, 0.0, None, False][len(rest):]
    (deterministic, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, softcap, window_left,
     window_right, alibi_slopes, dropout_p, rng_state, _) = rest
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state)
    # The lse's gradient is never used: do not have autograd fill a zero tensor for it.
    ctx.set_materialize_grads(False)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.deterministic = bool(deterministic)
    ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
    ctx.paged = block_table is not None
    ctx.options = (softcap, window_left, window_right)
    ctx.dropout_p = dropout_p


def _fwd_backward(ctx, grad_out, grad_lse, grad_s_dmask, bwd_fn=None):
    # The log-sum-exp and S_dmask are auxiliary outputs (as in the official package): their
    # gradients are ignored. bwd_fn: the op (traced calls) or its implementation (eager calls).
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state = ctx.saved_tensors
    if ctx.paged:
        raise FlashAttnNotImplementedError(
            "flash_cute::fwd with a block_table has no backward; flash_attn_varlen_func gathers "
            "the pages first when the caches need gradients"
        )
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = (bwd_fn or bwd)(grad_out, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic,
                     cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlen, *ctx.options, alibi_slopes, ctx.dropout_p, rng_state)
    return (dq, dk, dv) + (None,) * 15


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------------
# Eager calls. torch.library's dispatch of a custom op costs host time that a tiny call notices:
# ~60 us per forward and ~1 ms per forward + backward (the autograd wrapper fills in the
# defaults of the 19-argument backward schema on every call) on an H200 host, against ~20 us and
# ~300 us for PyTorch's own flash attention (tools/overhead.py, tools/host_profile.py). Calls that
# nothing traces (no torch.compile / torch.export, no FakeTensor or other tensor subclass, no
# dispatch mode) run the same implementations directly, with autograd through _FwdFunction;
# traced calls go through the ops, whose schemas, fake implementations and registered autograd
# the compiler needs.
# ------------------------------------------------------------------------------------------------

def _eager(q: torch.Tensor) -> bool:
    return type(q) is torch.Tensor and not torch.compiler.is_compiling() and _dispatch_modes() == 0


def _dispatch_modes() -> int:
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return 1 if length is None else length()


class _FwdFunction(torch.autograd.Function):
    """flash_cute::fwd's implementation and backward, for eager calls (see _eager)."""

    @staticmethod
    def forward(q, k, v, *args):
        return _fwd_impl(q, k, v, *args)

    setup_context = staticmethod(_fwd_setup_context)

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_s_dmask):
        return _fwd_backward(ctx, grad_out, grad_lse, grad_s_dmask, bwd_fn=_bwd_impl)


def fwd_call(q, k, v, *args):
    """flash_cute::fwd(q, k, v, *args) as the public functions call it: eager calls skip the
    dispatch (and, without gradients, autograd), traced ones call the op."""
    if not _eager(q):
        return fwd(q, k, v, *args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FwdFunction.apply(q, k, v, *args)
    return _fwd_impl(q, k, v, *args)


def bwd_into_call(dout, *args):
    """flash_cute::bwd_into(dout, *args), the same way as fwd_call."""
    return (_bwd_into_impl if _eager(dout) else bwd_into)(dout, *args)


# ------------------------------------------------------------------------------------------------
# Decoding against a K/V cache (flash_attn_with_kvcache): the split-KV kernel
# ------------------------------------------------------------------------------------------------

MAX_DECODE_SPLITS = 128
_MAX_GRID_X = 2**31 - 1  # CUDA's limit on the grid's x dimension


def _cache_layout(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> tuple[int, int]:
    """(page_size, capacity) of a K/V cache: (0, its length) for contiguous cache rows; paged, the
    page size and the positions a block-table row holds."""
    if block_table is None:
        return 0, k_cache.shape[1]
    return k_cache.shape[1], block_table.shape[1] * k_cache.shape[1]


def _cache_bounds(k_cache: torch.Tensor, capacity: int) -> tuple[int, int]:
    """What the kernels hold the cache index values to (DecodeParams::cache_batch, capacity): the
    cache rows or pages, and the positions of one batch row (capped to int32)."""
    return k_cache.shape[0], min(capacity, 2**31 - 1)


@functools.lru_cache(maxsize=256)
def decode_splits(batch: int, nheads_k: int, packed_rows: int, capacity: int, head_dim: int, device: int) -> int:
    """The split count of num_splits=0: a function of shapes that stay fixed while a model decodes
    (never of the current lengths), so a CUDA graph captured for one step is right for the next."""
    return _C().decode_splits(batch, nheads_k, packed_rows, capacity, head_dim, device)


def decode_eager(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: Optional[torch.Tensor],
    v_new: Optional[torch.Tensor],
    softmax_scale: float,
    causal: bool,
    seqlen_k: int,
    seqlen_new: int,
    cache_seqlens: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    num_splits: int,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (batch, seqlen_q, nheads, d) against a cache, with the split-KV kernel:
    returns out like q and lse (batch, nheads, seqlen_q) float32. Batch row b sees the keys at
    cache positions leftpad[b] .. cached + seqlen_new - 1, cached = cache_seqlens[b] (or seqlen_k
    when cache_seqlens is None), of cache row cache_batch_idx[b] (or b), or of the pages of
    block_table[b] (page size a multiple of 16). k_new, v_new (batch, seqlen_new, nheads_k, d):
    the rows to append, written into the caches (which must be kernel_ready) at positions
    cached .. and attended to; None: they are in the caches already. num_splits 0: the
    heuristic; 1: no split. The int32 vectors and block_table must be contiguous. softcap, the
    window (causal sets its right side to 0) and ALiBi slopes as in flash_cute::fwd.

    Host time matters here (a decoding step of a small batch is ~100 us of GPU time): each
    tensor is asked for its strides once."""
    batch, seqlen_q, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    device = q.device
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    packed_rows = seqlen_q * (nheads // nheads_k)
    page_size, capacity = _cache_layout(k_cache, block_table)
    if num_splits == 0:
        num_splits = decode_splits(batch, nheads_k, packed_rows, capacity, d, device.index)
    num_splits = max(1, min(num_splits, MAX_DECODE_SPLITS))
    rows = batch * nheads * seqlen_q
    if rows > _MAX_GRID_X:  # the combine pass runs one CTA per row on the grid's x dimension
        num_splits = 1
    o_accum = lse_accum = None
    if num_splits > 1:
        o_accum = torch.empty((num_splits, rows, d), dtype=torch.float32, device=device)
        lse_accum = torch.empty((num_splits, rows), dtype=torch.float32, device=device)
    if k_new is None:
        k_cache, v_cache = _kernel_ready(k_cache), _kernel_ready(v_cache)
    else:  # written in place: the caller checked kernel_ready(k_cache) and kernel_ready(v_cache)
        k_new, v_new = _kernel_ready(k_new), _kernel_ready(v_new)
    q = _kernel_ready(q)
    no_strides = (0, 0, 0)
    _C().decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_new), _ptr(v_new), out.data_ptr(), lse.data_ptr(),
        _ptr(o_accum), _ptr(lse_accum), batch, seqlen_q, nheads, nheads_k, d, seqlen_k, seqlen_new,
        q.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3],
        no_strides if k_new is None else k_new.stride()[:3], no_strides if v_new is None else v_new.stride()[:3],
        out.stride()[:3], lse.stride()[:2],
        _ptr(cache_seqlens), _ptr(cache_batch_idx), _ptr(cache_leftpad),
        _ptr(block_table), 0 if block_table is None else block_table.stride(0), page_size,
        _cache_bounds(k_cache, capacity), softmax_scale, causal, softcap, window_left, window_right, _ptr(alibi_slopes),
        0 if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes.stride(0),
        num_splits, _dtype_code(q.dtype), device.index, _stream(device.index),
    )
    return out, lse


def _reference_decode(q, k_cache, v_cache, k_new, v_new, softmax_scale, causal, seqlen_k, seqlen_new, cache_seqlens,
                      cache_batch_idx, cache_leftpad, block_table, softcap, window, alibi_slopes):
    """flash_cute::decode on the reference path (CPU tensors, float32): reference.kvcache_attention
    with the same arguments. Without k_new, the seqlen_new rows are in the caches already."""
    cached = seqlen_k if cache_seqlens is None else cache_seqlens
    if k_new is None and seqlen_new:
        cached = cached + seqlen_new
    out, lse = reference.kvcache_attention(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=cached, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
        softcap=softcap, window_size=window, alibi_slopes=alibi_slopes,
    )
    # Contiguous, as the kernel's results and the fake implementation (empty_like keeps q's strides).
    return torch.empty(q.shape, dtype=q.dtype, device=q.device).copy_(out), lse.contiguous()


@torch.library.custom_op("flash_cute::decode", mutates_args=("k_cache", "v_cache"))
def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: Optional[torch.Tensor],
    v_new: Optional[torch.Tensor],
    softmax_scale: float,
    causal: bool,
    seqlen_k: int,
    seqlen_new: int,
    cache_seqlens: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    num_splits: int,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The operator that torch.compile and torch.export see (eager calls of flash_attn_with_kvcache
    take decode_eager directly: the dispatcher's own cost per call is of the order of a small
    decoding step). Arguments as decode_eager. Float16/bfloat16 CUDA tensors run the split-KV
    kernel; anything else the reference (flash_cute.reference.kvcache_attention).

    A traced caller cannot read data pointers, so it cannot tell whether the kernel may append
    into the caches in place (decode_eager's contract): a cache the kernel cannot write (an
    unaligned base, odd strides) is appended to in a kernel-ready copy that is copied back."""
    if not (q.is_cuda and q.dtype in _KERNEL_DTYPES):
        return _reference_decode(q, k_cache, v_cache, k_new, v_new, softmax_scale, causal, seqlen_k, seqlen_new,
                                 cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softcap,
                                 (window_left, window_right), alibi_slopes)
    args = (softmax_scale, causal, seqlen_k, seqlen_new, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
            num_splits, softcap, window_left, window_right, alibi_slopes)
    if k_new is None or (kernel_ready(k_cache) and kernel_ready(v_cache)):
        return decode_eager(q, k_cache, v_cache, k_new, v_new, *args)
    k_ready, v_ready = _kernel_ready(k_cache), _kernel_ready(v_cache)
    out, lse = decode_eager(q, k_ready, v_ready, k_new, v_new, *args)
    for dst, src in ((k_cache, k_ready), (v_cache, v_ready)):
        if dst is not src:
            dst.copy_(src)
    return out, lse


@decode.register_fake
def _(q, k_cache, v_cache, k_new, v_new, softmax_scale, causal, seqlen_k, seqlen_new, cache_seqlens, cache_batch_idx,
      cache_leftpad, block_table, num_splits, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# The kvcache append where the split-KV kernel does not do it
# ------------------------------------------------------------------------------------------------

def _append_kv_torch(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table) -> None:
    """The append as torch indexing: for index values checked beforehand (an out-of-range one
    would make CUDA's indexing kernels fail the whole context)."""
    batch, seqlen_new = k_new.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=k_new.device)
    if block_table is not None:
        page_size = k_cache.shape[1]
        rows, positions = block_table.long().gather(1, positions // page_size), positions % page_size
    else:
        rows = torch.arange(batch, device=k_new.device) if cache_batch_idx is None else cache_batch_idx.long()
        rows = rows[:, None]
    k_cache[rows, positions] = k_new
    v_cache[rows, positions] = v_new


def append_kv_eager(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
                    cache_leftpad: Optional[torch.Tensor], block_table: Optional[torch.Tensor]) -> None:
    """Writes k_new, v_new (batch, seqlen_new, nheads_k, d) into the caches at positions
    cache_seqlens[b] (int32 (batch,)) .. of cache row cache_batch_idx[b] (or b), or of the pages of
    block_table[b]. On CUDA (float16, bfloat16, caches with a contiguous last dimension) a kernel
    does it and holds the index values, which the host never reads, to the caches: a batch row
    whose values leave them (cache_leftpad is only checked) appends nothing, and a table entry
    that is not a page takes no row. Elsewhere torch indexing, after the caller's value checks."""
    if not (k_cache.is_cuda and k_cache.dtype in _KERNEL_DTYPES and k_cache.stride(-1) == 1
            and v_cache.stride(-1) == 1):
        _append_kv_torch(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table)
        return
    batch, seqlen_new, nheads_k, d = k_new.shape
    k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_new, v_new))
    index = [None if t is None else t.to(torch.int32).contiguous()
             for t in (cache_seqlens, cache_batch_idx, cache_leftpad, block_table)]
    page_size, capacity = _cache_layout(k_cache, block_table)
    device = k_cache.device.index
    _C().append_kv(
        k_cache.data_ptr(), v_cache.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), batch, nheads_k, d, 0, seqlen_new,
        k_cache.stride()[:3], v_cache.stride()[:3], k_new.stride()[:3], v_new.stride()[:3], *map(_ptr, index),
        0 if block_table is None else index[3].stride(0), page_size, _cache_bounds(k_cache, capacity),
        device, _stream(device),
    )


@torch.library.custom_op("flash_cute::append_kv", mutates_args=("k_cache", "v_cache"))
def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
              cache_leftpad: Optional[torch.Tensor], block_table: Optional[torch.Tensor]) -> None:
    """The operator that torch.compile and torch.export see; eager calls take append_kv_eager."""
    append_kv_eager(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)


@append_kv.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
    return None
