"""Attention in plain PyTorch, computed the way the CUDA kernels compute it.

This module is three things at once: the implementation behind CPU tensors (so models that use
flash_cute can be unit-tested without a GPU) and behind float32 inputs, a test oracle's sibling,
and a readable statement of the FlashAttention-2 algorithm:

* the output is built one block of query rows at a time (FA2's outer loop; one CUDA thread block
  per query block);
* each query block walks the key/value blocks, keeping for every row the running maximum ``m``,
  the running sum ``l`` of ``exp(scale * s - m)``, and an unnormalised output ``acc``; a new block
  that raises the maximum rescales ``l`` and ``acc`` by ``exp(m_old - m_new)`` (online softmax);
* memory is linear in the sequence length: no (seqlen_q, seqlen_k) matrix is ever formed, only
  (block_m, block_n) tiles.

Shapes follow flash_attn: q (batch, seqlen_q, nheads, d), k and v (batch, seqlen_k, nheads_k, d)
with ``nheads % nheads_k == 0``. Causal masking is aligned to the bottom-right corner: query i
sees key j iff ``j <= i + seqlen_k - seqlen_q``. A query row that sees no key gets output 0 and
log-sum-exp +inf.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_forward", "naive_attention"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    block_m: int = 128,
    block_n: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward, tiled. Returns ``(out, lse)``.

    ``out`` has q's shape and dtype; ``lse`` is float32 (batch, nheads, seqlen_q), the natural
    log of the softmax denominator of each row (including the scale), +inf for rows with no key.
    Accumulates in float32 (float64 for float64 inputs).
    """
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    groups = nheads // nheads_k
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    acc_dtype = _compute_dtype(q.dtype)
    diagonal = seqlen_k - seqlen_q  # causal: key j visible from query i iff j <= i + diagonal

    # (batch, nheads_k, groups, seqlen, d): the query heads of one KV head share its K and V
    # through broadcasting, so K and V are never copied per query head.
    qg = q.permute(0, 2, 1, 3).reshape(batch, nheads_k, groups, seqlen_q, d)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)  # (batch, nheads_k, 1, seqlen_k, d)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)

    out = torch.empty(batch, nheads_k, groups, seqlen_q, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, nheads_k, groups, seqlen_q, dtype=torch.float32, device=q.device)

    for m0 in range(0, seqlen_q, block_m):  # FA2's outer loop: one query block
        m1 = min(m0 + block_m, seqlen_q)
        q_blk = qg[..., m0:m1, :].to(acc_dtype)
        rows = torch.arange(m0, m1, device=q.device).unsqueeze(1)
        row_max = torch.full(q_blk.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(q_blk.shape, dtype=acc_dtype, device=q.device)

        # Key blocks right of the causal diagonal of the block's last row are skipped entirely.
        n_end = seqlen_k if not causal else max(0, min(seqlen_k, m1 + diagonal))
        for n0 in range(0, n_end, block_n):  # inner loop: one key/value block
            n1 = min(n0 + block_n, seqlen_k)
            s = torch.matmul(q_blk, kg[..., n0:n1, :].to(acc_dtype).transpose(-1, -2)) * softmax_scale
            if causal:
                cols = torch.arange(n0, n1, device=q.device).unsqueeze(0)
                s = s.masked_fill(cols > rows + diagonal, -math.inf)
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            # Rows that have seen no key yet keep max -inf; exponentiate against 0 instead so
            # they produce zeros, not NaN.
            safe_max = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
            correction = torch.exp(row_max - safe_max)
            p = torch.exp(s - safe_max.unsqueeze(-1))
            row_sum = row_sum * correction + p.sum(dim=-1)
            acc = acc * correction.unsqueeze(-1) + torch.matmul(p, vg[..., n0:n1, :].to(acc_dtype))
            row_max = new_max

        empty = row_sum == 0
        out[..., m0:m1, :] = (acc / torch.where(empty, torch.ones_like(row_sum), row_sum).unsqueeze(-1)).to(q.dtype)
        lse_blk = torch.where(empty, torch.full_like(row_sum, math.inf), row_max + torch.log(row_sum))
        lse[..., m0:m1] = lse_blk.to(torch.float32)

    out = out.reshape(batch, nheads, seqlen_q, d).permute(0, 2, 1, 3).contiguous()
    return out, lse.reshape(batch, nheads, seqlen_q)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention from its definition, materialising the full score matrix: the test oracle.

    Computes in ``dtype`` (default float64 on CPU, float32 elsewhere) and returns
    ``(out, lse)`` in that dtype, with the same conventions as :func:`attention_forward`.
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
    if causal:
        i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + seqlen_k - seqlen_q, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no key
    p = torch.exp(s - torch.where(lse == -math.inf, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vx)
    return out, torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)
