"""Attention in plain PyTorch, computed the way the CUDA kernels compute it.

This module is three things at once: the implementation behind CPU tensors (so models that use
flash_cute can be unit-tested and trained without a GPU) and behind float32 inputs, a test
oracle's sibling, and a readable statement of the FlashAttention-2 algorithm.

Forward (:func:`attention_forward`):

* the output is built one block of query rows at a time (FA2's outer loop; one CUDA thread block
  per query block);
* each query block walks the key/value blocks, keeping for every row the running maximum ``m``,
  the running sum ``l`` of ``exp(scale * s - m)``, and an unnormalised output ``acc``; a new block
  that raises the maximum rescales ``l`` and ``acc`` by ``exp(m_old - m_new)`` (online softmax);
* it saves the output and, per row, the log-sum-exp ``lse = m + log(l)`` of the scaled scores:
  all the backward pass needs to rebuild any tile of the softmax.

Loop order: :func:`attention_forward` follows FlashAttention-2 (outer loop over query blocks, so
``m``, ``l`` and ``acc`` of a block live in registers for its whole key loop and the output is
written once). :func:`attention_forward_fa1` computes the same result in FlashAttention-1's order
(outer loop over key/value blocks, with ``m``, ``l`` and ``acc`` of every query row read and
written back for each key block), for comparison; see docs/how-it-works.md.

Backward (:func:`attention_backward`), with ``P = softmax(scale * Q K^T)`` and ``O = P V``:

* a preprocessing pass computes ``D = rowsum(dO * O)`` for every query row (it equals
  ``rowsum(P * dP)``, the term the softmax gradient subtracts);
* the outer loop is over key/value blocks (one CUDA thread block per key block, which owns that
  block's dK and dV), the inner loop over query blocks; each tile recomputes
  ``P = exp(scale * S - lse)`` from the saved lse, then ``dV += P^T dO``, ``dP = dO V^T``,
  ``dS = P * (dP - D)``, ``dK += scale * dS^T Q`` and ``dQ += scale * dS K``; dQ is shared by all
  key blocks and accumulates in float32 (the kernel's float32 dQ accumulator).

Memory is linear in the sequence lengths: no (seqlen_q, seqlen_k) matrix is ever formed, only
(block_m, block_n) tiles.

Shapes follow flash_attn: q (batch, seqlen_q, nheads, d), k and v (batch, seqlen_k, nheads_k, d)
with ``nheads % nheads_k == 0`` (grouped-query and multi-query attention: K and V are shared
through broadcasting, never copied per query head; dK and dV sum over the query heads of each
KV head). Causal masking is aligned to the bottom-right corner: query i sees key j iff
``j <= i + seqlen_k - seqlen_q``. A query row that sees no key gets output 0, log-sum-exp +inf
and zero gradients.

The functions here also take an optional ``mask`` (the CUDA kernels do not): a boolean tensor
(True = attend) or an additive float tensor (added to the scaled scores; -inf masks), broadcastable
to (batch, nheads, seqlen_q, seqlen_k) and combined with ``causal``. It is for teaching and
testing; rows it masks completely behave like the causal-empty rows above.

:func:`kvcache_attention` states flash_attn_with_kvcache's semantics (append to a KV cache, rotary, paging).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_forward",
    "attention_forward_fa1",
    "attention_backward",
    "naive_attention",
    "blockwise_probs",
    "kvcache_attention",
    "split_kv_forward",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_heads(t: torch.Tensor, nheads_k: int) -> torch.Tensor:
    """(batch, seqlen, nheads, d) -> (batch, nheads_k, groups, seqlen, d), a view: query head
    ``h`` is group member ``h % groups`` of KV head ``h // groups``."""
    batch, seqlen, nheads, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(batch, nheads_k, nheads // nheads_k, seqlen, d)


def _ungroup_heads(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_group_heads`, as a contiguous (batch, seqlen, nheads, d) tensor."""
    batch, nheads_k, groups, seqlen, d = t.shape
    return t.reshape(batch, nheads_k * groups, seqlen, d).permute(0, 2, 1, 3).contiguous()


def _group_mask(mask, batch, nheads, nheads_k, seqlen_q, seqlen_k):
    """The optional mask as a (batch, nheads_k, groups, seqlen_q, seqlen_k) view (broadcast, not
    copied), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"mask must be boolean (True = attend) or floating point (additive), got {mask.dtype}")
    full = (batch, nheads, seqlen_q, seqlen_k)
    try:
        mask = torch.broadcast_to(mask, full)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {full}") from None
    return mask.unflatten(1, (nheads_k, nheads // nheads_k))


def _mask_tile(s, m0, n0, causal, diagonal, mask):
    """Masks a tile of scaled scores ``s`` (..., rows, cols) whose first row is query ``m0`` and
    first column key ``n0``: causally hidden entries and entries the boolean ``mask`` rejects
    become -inf; an additive ``mask`` is added."""
    rows, cols = s.shape[-2:]
    if causal:
        i = torch.arange(m0, m0 + rows, device=s.device).unsqueeze(1)
        j = torch.arange(n0, n0 + cols, device=s.device).unsqueeze(0)
        s = s.masked_fill(j > i + diagonal, -math.inf)
    if mask is not None:
        tile = mask[..., m0 : m0 + rows, n0 : n0 + cols]
        if tile.dtype == torch.bool:
            s = s.masked_fill(~tile, -math.inf)
        else:
            s = s + tile.to(s.dtype)
    return s


def _group_alibi(alibi_slopes, batch, nheads, nheads_k, dtype):
    """ALiBi slopes (nheads,) or (batch, nheads) as (batch or 1, nheads_k, groups, 1, 1), or None."""
    if alibi_slopes is None:
        return None
    slopes = alibi_slopes.reshape(-1, nheads).to(dtype)
    return slopes.reshape(slopes.shape[0], nheads_k, nheads // nheads_k, 1, 1)


def _group_keep(dropout_mask, nheads_k):
    """Dropout's keep mask (batch, nheads, seqlen_q, seqlen_k) as (batch, nheads_k, groups, seqlen_q,
    seqlen_k) floats, or None."""
    if dropout_mask is None:
        return None
    batch, nheads, seqlen_q, seqlen_k = dropout_mask.shape
    return dropout_mask.reshape(batch, nheads_k, nheads // nheads_k, seqlen_q, seqlen_k)


def _logits(s, m0, n0, causal, diagonal, mask, softcap=0.0, window=(-1, -1), alibi=None):
    """The logits of a tile of scaled scores ``s`` (first row query ``m0``, first column key
    ``n0``): softcapped (``softcap * tanh(s / softcap)``), plus the ALiBi bias
    ``-slope * |i + diagonal - j|``, then masked (causal, the local window ``(left, right)``: key j
    visible from query i iff ``i + diagonal - left <= j <= i + diagonal + right``, -1 = unbounded,
    and ``mask``). Returns ``(logits, t)`` with ``t = tanh(s / softcap)`` for the backward (or None).
    The ALiBi bias follows flash_attn's documented formula; whether the official kernels' lse
    carries the same per-row constant with causal is to be checked when the kernels take it."""
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    left, right = window
    if alibi is not None or left >= 0 or right >= 0:
        i = torch.arange(m0, m0 + s.shape[-2], device=s.device).unsqueeze(1)
        j = torch.arange(n0, n0 + s.shape[-1], device=s.device).unsqueeze(0)
        if alibi is not None:
            s = s - alibi * (i + diagonal - j).abs().to(s.dtype)
        if left >= 0:
            s = s.masked_fill(j < i + diagonal - left, -math.inf)
        if right >= 0:
            s = s.masked_fill(j > i + diagonal + right, -math.inf)
    return _mask_tile(s, m0, n0, causal, diagonal, mask), t


def _online_softmax_step(row_max, row_sum, acc, s, v_blk, keep=None, dropout_p=0.0):
    """One key block of the online softmax for the rows of ``s`` (their logits against the
    block): the running maximum, the running sum of ``exp(s - max)`` and the unnormalised output,
    rescaled by ``exp(max_old - max_new)`` where the block raises the maximum. ``keep``: dropout's
    keep mask of the tile; the output sums the kept probabilities / (1 - dropout_p), the row sum
    all of them. Returns the new ``(row_max, row_sum, acc)``."""
    new_max = torch.maximum(row_max, s.amax(dim=-1))
    # Rows that have seen no key yet keep max -inf; exponentiate against 0 instead so they
    # produce zeros, not NaN.
    safe_max = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
    correction = torch.exp(row_max - safe_max)
    p = torch.exp(s - safe_max.unsqueeze(-1))
    p_out = p if keep is None else p * keep / (1.0 - dropout_p)
    return new_max, row_sum * correction + p.sum(dim=-1), acc * correction.unsqueeze(-1) + torch.matmul(p_out, v_blk)


def _finalize_rows(row_max, row_sum, acc, dtype):
    """``(out, lse)`` of rows from their online-softmax state: ``acc / sum`` in ``dtype`` and
    ``max + log(sum)`` in float32; rows that saw no key get output 0 and lse +inf."""
    empty = row_sum == 0
    out = (acc / torch.where(empty, torch.ones_like(row_sum), row_sum).unsqueeze(-1)).to(dtype)
    lse = torch.where(empty, torch.full_like(row_sum, math.inf), row_max + torch.log(row_sum))
    return out, lse.to(torch.float32)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 128,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward, tiled. Returns ``(out, lse)``.

    ``out`` has q's shape and dtype; ``lse`` is float32 (batch, nheads, seqlen_q), the natural
    log of the softmax denominator of each row (including the scale), +inf for rows with no key.
    Accumulates in float32 (float64 for float64 inputs). ``mask``: see the module docstring.
    ``softcap``, ``window_size`` and ``alibi_slopes`` ((nheads,) or (batch, nheads)) as in
    flash_attn (see :func:`_logits`). Dropout: ``dropout_mask`` (batch, nheads, seqlen_q, seqlen_k)
    bool, True where a probability is kept (kept ones are scaled by 1 / (1 - dropout_p)).
    """
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    acc_dtype = _compute_dtype(q.dtype)
    diagonal = seqlen_k - seqlen_q  # causal: key j visible from query i iff j <= i + diagonal

    # The query heads of one KV head share its K and V through broadcasting (a size-1 group
    # dimension), so K and V are never copied per query head.
    qg = _group_heads(q, nheads_k)  # (batch, nheads_k, groups, seqlen_q, d)
    kg = _group_heads(k, nheads_k)  # (batch, nheads_k, 1, seqlen_k, d)
    vg = _group_heads(v, nheads_k)
    maskg = _group_mask(mask, batch, nheads, nheads_k, seqlen_q, seqlen_k)
    alibi = _group_alibi(alibi_slopes, batch, nheads, nheads_k, acc_dtype)
    keepg = _group_keep(dropout_mask, nheads_k)

    out = torch.empty(qg.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)

    for m0 in range(0, seqlen_q, block_m):  # FA2's outer loop: one query block
        m1 = min(m0 + block_m, seqlen_q)
        q_blk = qg[..., m0:m1, :].to(acc_dtype)
        row_max = torch.full(q_blk.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(q_blk.shape, dtype=acc_dtype, device=q.device)

        # Key blocks right of the causal diagonal of the block's last row are skipped entirely.
        n_end = seqlen_k if not causal else max(0, min(seqlen_k, m1 + diagonal))
        for n0 in range(0, n_end, block_n):  # inner loop: one key/value block
            n1 = min(n0 + block_n, seqlen_k)
            s = torch.matmul(q_blk, kg[..., n0:n1, :].to(acc_dtype).transpose(-1, -2)) * softmax_scale
            s, _ = _logits(s, m0, n0, causal, diagonal, maskg, softcap, window_size, alibi)
            keep = None if keepg is None else keepg[..., m0:m1, n0:n1]
            row_max, row_sum, acc = _online_softmax_step(row_max, row_sum, acc, s, vg[..., n0:n1, :].to(acc_dtype),
                                                         keep, dropout_p)

        out[..., m0:m1, :], lse[..., m0:m1] = _finalize_rows(row_max, row_sum, acc, q.dtype)

    return _ungroup_heads(out), lse.reshape(batch, nheads, seqlen_q)


def blockwise_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    block_n: int,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The probabilities as a forward kernel holds them when it applies dropout, the values of
    flash_attn's ``return_attn_probs`` matrix: ``exp(logit - m)`` with ``m`` the running row maximum
    the kernel has after key block n of ``block_n`` keys, walking the blocks from the last to the
    first (so ``m`` is the maximum over blocks n, n + 1, ...). (batch, nheads, seqlen_q, seqlen_k),
    float32 (float64 for float64 inputs); 0 where masked."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    acc_dtype = _compute_dtype(q.dtype)
    qg, kg = _group_heads(q, nheads_k).to(acc_dtype), _group_heads(k, nheads_k).to(acc_dtype)
    alibi = _group_alibi(alibi_slopes, batch, nheads, nheads_k, acc_dtype)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * softmax_scale
    s, _ = _logits(s, 0, 0, causal, seqlen_k - seqlen_q, None, softcap, window_size, alibi)
    blocks = s.split(block_n, dim=-1)
    block_max = torch.stack([b.amax(dim=-1) for b in blocks], dim=-1)
    running = torch.cummax(block_max.flip(-1), dim=-1).values.flip(-1)  # max over blocks n, n + 1, ...
    running = torch.where(running == -math.inf, torch.zeros_like(running), running)
    probs = torch.cat([torch.exp(b - running[..., n : n + 1]) for n, b in enumerate(blocks)], dim=-1)
    return _ungroup_heads_scores(probs)


def _ungroup_heads_scores(t: torch.Tensor) -> torch.Tensor:
    """(batch, nheads_k, groups, seqlen_q, seqlen_k) -> (batch, nheads, seqlen_q, seqlen_k)."""
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])


def attention_forward_fa1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    block_m: int = 128,
    block_n: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass in FlashAttention-1's loop order. Returns ``(out, lse)`` exactly as
    :func:`attention_forward` does (same shapes, dtypes and conventions; no ``mask``).

    FA1 swaps the loops: the outer loop walks the key/value blocks (each loaded into on-chip
    memory once), the inner loop walks the query blocks. A query row's softmax therefore spans
    all outer iterations, so its running max ``m``, running sum ``l`` and output accumulator
    must survive between them: in FA1 they live in HBM and every tile reads them and writes them
    back. Here they are full-size tensors updated in place, one slice per tile.

    Why FA2's order (:func:`attention_forward`) wins on a GPU:

    * FA2 keeps one query block's ``m``, ``l`` and accumulator in registers for its whole key
      loop and writes the output once; FA1 moves them through HBM once per key block, i.e.
      ``seqlen_k / block_n`` times more accumulator traffic (reads and writes of a
      (seqlen_q, d) tensor per key block).
    * FA2's query blocks are independent (no shared state), so they run in parallel: one CTA per
      (query block, head, batch). FA1's iterations of the outer loop all update the same rows
      and parallelise only over (batch, head), which leaves the GPU idle for small batches.
    """
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    acc_dtype = _compute_dtype(q.dtype)
    diagonal = seqlen_k - seqlen_q  # causal: key j visible from query i iff j <= i + diagonal

    qg = _group_heads(q, nheads_k)  # (batch, nheads_k, groups, seqlen_q, d)
    kg = _group_heads(k, nheads_k)  # (batch, nheads_k, 1, seqlen_k, d)
    vg = _group_heads(v, nheads_k)

    # The state FA1 keeps in HBM: m, l and the unnormalised output of every query row. (The FA1
    # paper stores the output normalised and rescales it by l_old / l_new each time; the traffic
    # is the same, and normalising once at the end gives exactly FA2's arithmetic.)
    row_max = torch.full(qg.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(qg.shape, dtype=acc_dtype, device=q.device)

    for n0 in range(0, seqlen_k, block_n):  # FA1's outer loop: one key/value block
        n1 = min(n0 + block_n, seqlen_k)
        k_blk = kg[..., n0:n1, :].to(acc_dtype)
        v_blk = vg[..., n0:n1, :].to(acc_dtype)
        # Causal: query blocks whose last row sees no key of this block are skipped (the same
        # tiles attention_forward skips). Query i sees key n0 iff i >= n0 - diagonal.
        m_begin = 0 if not causal else max(0, n0 - diagonal) // block_m * block_m
        for m0 in range(m_begin, seqlen_q, block_m):  # inner loop: one query block
            m1 = min(m0 + block_m, seqlen_q)
            s = torch.matmul(qg[..., m0:m1, :].to(acc_dtype), k_blk.transpose(-1, -2)) * softmax_scale
            s = _mask_tile(s, m0, n0, causal, diagonal, None)
            # Read this block's state back "from HBM", update it, and write it back: FA1's extra
            # HBM traffic, once per (key block, query block).
            state = (row_max[..., m0:m1], row_sum[..., m0:m1], acc[..., m0:m1, :])
            row_max[..., m0:m1], row_sum[..., m0:m1], acc[..., m0:m1, :] = _online_softmax_step(*state, s, v_blk)

    out, lse = _finalize_rows(row_max, row_sum, acc, q.dtype)  # rows that saw no key: 0, +inf
    return _ungroup_heads(out), lse.reshape(batch, nheads, seqlen_q)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 128,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward, tiled. Returns ``(dq, dk, dv)``, typed and shaped like q, k, v.

    ``dout`` is the gradient of ``out``; ``out`` and ``lse`` are what :func:`attention_forward`
    returned for the same arguments (lse float32, as saved by the kernels; a float64 lse, such as
    :func:`naive_attention`'s, is used at full precision). Computes in float32 (float64 for
    float64 inputs). The gradient of the lse output itself is not part of this function (the
    lse is an auxiliary output, as in flash_attn). Dropout as in :func:`attention_forward`: with
    ``M = keep / (1 - p)``, ``O = (P * M) V``, so ``dV = (P * M)^T dO`` and ``dS = P * (dP * M - D)``.
    """
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    acc_dtype = _compute_dtype(q.dtype)
    diagonal = seqlen_k - seqlen_q  # causal: key j visible from query i iff j <= i + diagonal

    qg = _group_heads(q, nheads_k)  # (batch, nheads_k, groups, seqlen_q, d)
    dog = _group_heads(dout, nheads_k)
    kg = _group_heads(k, nheads_k)  # (batch, nheads_k, 1, seqlen_k, d)
    vg = _group_heads(v, nheads_k)
    maskg = _group_mask(mask, batch, nheads, nheads_k, seqlen_q, seqlen_k)
    alibi = _group_alibi(alibi_slopes, batch, nheads, nheads_k, acc_dtype)
    keepg = _group_keep(dropout_mask, nheads_k)
    lseg = lse.reshape(qg.shape[:-1]).to(acc_dtype)  # (batch, nheads_k, groups, seqlen_q)

    # Preprocessing (its own small kernel on the GPU): D = rowsum(dO * O), one value per query
    # row. It equals rowsum(P * dP), so dS = P * (dP - D) needs no full row of P.
    delta = (dog.to(acc_dtype) * _group_heads(out, nheads_k).to(acc_dtype)).sum(dim=-1)

    dq_accum = torch.zeros(qg.shape, dtype=acc_dtype, device=q.device)  # shared by all key blocks
    dk = torch.empty(kg.shape[:2] + kg.shape[3:], dtype=k.dtype, device=k.device)  # (b, hk, sk, d)
    dv = torch.empty(vg.shape[:2] + vg.shape[3:], dtype=v.dtype, device=v.device)

    for n0 in range(0, seqlen_k, block_n):  # outer loop: one key/value block (one CUDA CTA)
        n1 = min(n0 + block_n, seqlen_k)
        k_blk = kg[..., n0:n1, :].to(acc_dtype)  # (batch, nheads_k, 1, n, d)
        v_blk = vg[..., n0:n1, :].to(acc_dtype)
        # dK and dV of this block: registers of the CTA, summed over every query head of the
        # group and every query block.
        dk_acc = torch.zeros(k_blk.shape[:2] + k_blk.shape[3:], dtype=acc_dtype, device=k.device)
        dv_acc = torch.zeros_like(dk_acc)

        # Causal: query blocks whose last row sees no key of this block are skipped (the tiles
        # the forward skips). Query i sees key n0 iff i >= n0 - diagonal.
        m_begin = 0 if not causal else max(0, n0 - diagonal) // block_m * block_m
        for m0 in range(m_begin, seqlen_q, block_m):  # inner loop: one query block
            m1 = min(m0 + block_m, seqlen_q)
            q_blk = qg[..., m0:m1, :].to(acc_dtype)  # (batch, nheads_k, groups, m, d)
            do_blk = dog[..., m0:m1, :].to(acc_dtype)

            # Recompute the probabilities from the saved lse. Masked scores are -inf and rows
            # that see no key have lse = +inf: exp(-inf) = 0 in both cases, never NaN.
            s = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * softmax_scale
            s, t = _logits(s, m0, n0, causal, diagonal, maskg, softcap, window_size, alibi)
            p = torch.exp(s - lseg[..., m0:m1].unsqueeze(-1))  # (batch, nheads_k, groups, m, n)

            dp = torch.matmul(do_blk, v_blk.transpose(-1, -2))  # dP = dO V^T
            p_out = p
            if keepg is not None:  # dropout: O = (P * M) V with M = keep / (1 - p)
                scale_keep = keepg[..., m0:m1, n0:n1] / (1.0 - dropout_p)
                p_out, dp = p * scale_keep, dp * scale_keep
            dv_acc += torch.einsum("bhgmn,bhgmd->bhnd", p_out, do_blk)  # dV += P^T dO
            ds = p * (dp - delta[..., m0:m1].unsqueeze(-1))  # dS = P * (dP - D)
            if t is not None:  # through the softcap: d(softcap * tanh(x / softcap)) = 1 - tanh^2
                ds = ds * (1 - t * t)
            dk_acc += softmax_scale * torch.einsum("bhgmn,bhgmd->bhnd", ds, q_blk)  # dK += scale dS^T Q
            # dQ += scale dS K: on the GPU an atomic add into the float32 accumulator, because
            # every key block contributes to the same rows of dQ.
            dq_accum[..., m0:m1, :] += softmax_scale * torch.matmul(ds, k_blk)

        dk[..., n0:n1, :] = dk_acc.to(k.dtype)
        dv[..., n0:n1, :] = dv_acc.to(v.dtype)

    # A final pass (another small kernel) converts the float32 dQ accumulator to q's dtype.
    dq = _ungroup_heads(dq_accum.to(q.dtype))
    return dq, dk.permute(0, 2, 1, 3).contiguous(), dv.permute(0, 2, 1, 3).contiguous()


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention from its definition, materialising the full score matrix: the test oracle.

    Computes in ``dtype`` (default float64 on CPU, float32 elsewhere) and returns
    ``(out, lse)`` in that dtype, with the same conventions as :func:`attention_forward`
    (``mask`` included). Differentiable with torch.autograd: rows that see no key get zero
    gradients, not NaN.
    """
    if dtype is None:
        dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    groups = nheads // nheads_k
    kx = k.to(dtype).repeat_interleave(groups, dim=2)
    vx = v.to(dtype).repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), kx) * softmax_scale
    # One boolean "visible" matrix gathers every way of masking; masked scores are set with
    # masked_fill, whose gradient is 0 there (this keeps empty rows' gradients free of NaN).
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(seqlen_k - seqlen_q)
    if mask is not None:
        mask = _group_mask(mask, batch, nheads, nheads_k, seqlen_q, seqlen_k).flatten(1, 2)
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            bias = mask.to(dtype)
            visible = visible & (bias != -math.inf)
            s = s + bias.masked_fill(bias == -math.inf, 0)
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no key
    p = torch.exp(s - torch.where(lse == -math.inf, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vx)
    return out, torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  interleaved: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` (seqlen, heads, d): row ``i`` is rotated by the angles of row
    ``positions[i]`` of the (seqlen_ro, rotary_dim / 2) tables ``cos`` and ``sin``. Only the first
    rotary_dim dims rotate; the rest pass through. Pair ``p`` is dims (2p, 2p + 1) when
    ``interleaved`` (GPT-J), dims (p, p + rotary_dim / 2) otherwise (GPT-NeoX). Computed in
    float32 (float64 for float64 inputs) and rounded once to x's dtype, as the kernel does."""
    half = cos.shape[-1]
    dtype = _compute_dtype(x.dtype)
    c = cos[positions].to(dtype).unsqueeze(1)  # (seqlen, 1, half): the same angle for every head
    s = sin[positions].to(dtype).unsqueeze(1)
    rot, rest = x[..., : 2 * half].to(dtype), x[..., 2 * half :].to(dtype)
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., :half], rot[..., half:]
    a, b = a * c - b * s, a * s + b * c  # each pair (a, b) turns by its angle
    rot = torch.stack((a, b), dim=-1).flatten(-2) if interleaved else torch.cat((a, b), dim=-1)
    return torch.cat((rot, rest), dim=-1).to(x.dtype)


def kvcache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    rotary_interleaved: bool = True,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_with_kvcache's semantics, one batch row at a time. Returns ``(out, lse)``:
    ``out`` like q, ``lse`` float32 (batch, nheads, seqlen_q). Updates k_cache and v_cache in place.

    Each batch row ``b`` owns a logical key sequence (its "cache row"): row ``cache_batch_idx[b]``
    (default ``b``) of a (batch_cache, seqlen_cache, nheads_k, d) cache, or with ``block_table``
    the pages of a (num_pages, page_size, nheads_k, d) cache, logical position ``j`` living at
    page ``block_table[b, j // page_size]``, row ``j % page_size`` (logical length: pages per row
    x page_size). With ``s = cache_seqlens[b]`` (an int means the same for every row; None means
    the whole logical length), ``n = k.shape[1]`` (0 without k) and ``p = cache_leftpad[b]``
    (default 0), all in absolute logical positions:

    1. the new keys and values go to positions ``s .. s + n - 1``: ``k[b, i]`` rotated at rotary
       position ``s + i`` (when rotary_cos / rotary_sin are given), ``v[b, i]`` as is; nothing
       else in the caches is written;
    2. batch row ``b`` attends to positions ``p .. s + n - 1`` (old entries and the new ones),
       and to nothing else (positions before p or from s + n on are never read);
    3. with rotary, query row ``i`` is rotated at position ``s + i`` when causal or local
       (``window_size`` not (-1, -1)), and every query row at position ``s`` when not; q itself is
       not modified;
    4. causal masking is aligned to the bottom-right corner of those ``s + n - p`` visible keys,
       as in :func:`attention_forward` (which computes each row, grouped-query heads included).

    As in flash_attn, rotary needs k and v, k needs cache_seqlens, and a paged cache takes neither
    cache_batch_idx nor cache_leftpad. The kernels' limits (rotary_dim a multiple of 16, pages a
    multiple of 256 rows, int32 index tensors) are not checked here.
    """
    batch, seqlen_q, nheads, d = q.shape
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None and cache_seqlens is None:
        raise ValueError("appending k and v needs cache_seqlens")
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary and (rotary_cos is None or rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary and k is None:
        raise ValueError("rotary embedding needs the new k and v")
    if rotary and 2 * rotary_cos.shape[-1] > d:
        raise ValueError(f"rotary_dim ({2 * rotary_cos.shape[-1]}) must be <= headdim ({d})")
    paged = block_table is not None
    if paged and cache_batch_idx is not None:
        raise ValueError("a paged cache (block_table) does not take cache_batch_idx")
    if paged and cache_leftpad is not None:
        raise ValueError("a paged cache (block_table) does not take cache_leftpad")

    page_size = k_cache.shape[1]
    cache_len = block_table.shape[1] * page_size if paged else k_cache.shape[1]  # logical length
    seqlen_new = 0 if k is None else k.shape[1]

    def per_row(x, default):
        """An int, a (batch,) tensor or None (-> default) as a list of batch Python ints."""
        if x is None:
            return [default] * batch
        if isinstance(x, int):
            return [x] * batch
        return [int(i) for i in x.tolist()]

    seqlens = per_row(cache_seqlens, cache_len)
    leftpad = per_row(cache_leftpad, 0)
    for b in range(batch):
        if not (0 <= leftpad[b] <= seqlens[b] and seqlens[b] + seqlen_new <= cache_len):
            raise ValueError(
                f"batch row {b}: need 0 <= cache_leftpad ({leftpad[b]}) <= cache_seqlens ({seqlens[b]}) and "
                f"cache_seqlens + seqlen_new ({seqlen_new}) <= the cache length ({cache_len})"
            )

    def slots(b: int, positions: torch.Tensor):
        """Where logical positions of batch row b live: indices into dims 0 and 1 of the caches."""
        if paged:
            pages = block_table[b].long()[positions // page_size]
            return pages, positions % page_size
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        return torch.full_like(positions, row), positions

    def arange(start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=k_cache.device)

    # 1. Append: the kernel writes the new rows (k rotated first) before any attention reads them.
    for b in range(batch if k is not None else 0):
        positions = arange(seqlens[b], seqlens[b] + seqlen_new)
        k_new = k[b]
        if rotary:
            k_new = _apply_rotary(k_new, rotary_cos, rotary_sin, positions, rotary_interleaved)
        rows, cols = slots(b, positions)
        k_cache[rows, cols] = k_new.to(k_cache.dtype)
        v_cache[rows, cols] = v[b].to(v_cache.dtype)

    # 2. Attention of each batch row over its visible keys p .. s + n - 1.
    out = torch.empty_like(q)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    for b in range(batch):
        rows, cols = slots(b, arange(leftpad[b], seqlens[b] + seqlen_new))
        k_b, v_b = k_cache[rows, cols], v_cache[rows, cols]  # (visible keys, nheads_k, d)
        q_b = q[b]
        if rotary:
            # Causal: query i is the token at position s + i. Not causal: all queries at s.
            positional = causal or tuple(window_size) != (-1, -1)
            offsets = arange(0, seqlen_q) if positional else torch.zeros(seqlen_q, dtype=torch.long, device=q.device)
            q_b = _apply_rotary(q_b, rotary_cos, rotary_sin, seqlens[b] + offsets, rotary_interleaved)
        alibi_b = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out_b, lse_b = attention_forward(q_b[None], k_b[None], v_b[None], softmax_scale, causal, softcap=softcap,
                                         window_size=tuple(window_size), alibi_slopes=alibi_b)
        out[b], lse[b] = out_b[0], lse_b[0]
    return out, lse


def split_kv_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    num_splits: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV (Flash-Decoding) forward: the same ``(out, lse)`` as :func:`attention_forward`,
    computed the way the decoding kernels do when a few query rows face many keys.

    The keys are cut into ``num_splits`` contiguous ranges; each range is an ordinary attention
    over its keys (a separate thread block on the GPU, so a batch of one still fills the GPU),
    giving a partial output ``out_s``, normalised over its own keys, and its ``lse_s``. A combine
    step then weighs each partial by its share of the row's softmax mass:
    ``lse = log(sum_s exp(lse_s))`` and ``out = sum_s exp(lse_s - lse) * out_s``. A split in
    which a row sees no key (causal) has weight 0; a row that sees no key at all gets out 0, lse
    +inf. The partials are kept in float32, as the kernels keep them.
    """
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k = k.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    bounds = [seqlen_k * s // num_splits for s in range(num_splits + 1)]
    rows = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
    outs, lses = [], []
    for k0, k1 in zip(bounds[:-1], bounds[1:]):
        if k1 == k0:
            continue
        mask = None
        if causal:  # the global bottom-right rule, on this range's keys
            keys = torch.arange(k0, k1, device=q.device).unsqueeze(0)
            mask = keys <= rows + (seqlen_k - seqlen_q)
        out_s, lse_s = attention_forward(q.float(), k[:, k0:k1].float(), v[:, k0:k1].float(), softmax_scale,
                                         mask=mask)
        outs.append(out_s)
        lses.append(torch.where(torch.isposinf(lse_s), torch.full_like(lse_s, -math.inf), lse_s))
    if not outs:  # no keys at all
        return torch.zeros_like(q), torch.full((batch, nheads, seqlen_q), math.inf, device=q.device)
    lse_all = torch.stack(lses)                      # (splits, batch, nheads, seqlen_q)
    lse = torch.logsumexp(lse_all, dim=0)            # -inf where no split saw a key
    empty = torch.isneginf(lse)
    weights = torch.exp(lse_all - torch.where(empty, torch.zeros_like(lse), lse))  # 0 for empty splits
    out = sum(w.transpose(1, 2).unsqueeze(-1) * o for w, o in zip(weights, outs))
    return out.to(q.dtype), torch.where(empty, torch.full_like(lse, math.inf), lse)

