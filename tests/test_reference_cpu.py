"""The PyTorch reference (flash_cute.reference: forward, backward, the optional mask) and
flash_attn_func on CPU tensors, which runs it, gradients included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flash_cute
from flash_cute.reference import attention_backward, attention_forward, attention_forward_fa1, naive_attention
from helpers import assert_2x_rule, assert_grads_2x_rule, assert_lse_matches, empty_rows, make_qkv, options_oracle

SEQLENS = [(1, 1), (97, 113), (113, 97), (1025, 97)]
# GQA group size -> (nheads, nheads_k)
GROUPS = {1: (2, 2), 4: (8, 2), 8: (8, 1)}


def _causal_ids(causal):
    return "causal" if causal else "full"


def _masked_scores(q, k, softmax_scale, causal):
    """Scores q k^T * scale, (batch, nheads, seqlen_q, seqlen_k), -inf where causally masked."""
    groups = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(groups, dim=2)) * softmax_scale
    if causal:
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
        s = s.masked_fill(~visible, -math.inf)
    return s


# --------------------------------------------------------------------------------------------
# flash_cute.reference


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", [8, 40, 59, 111])
def test_tiled_matches_naive(head_dim, seqlen_q, seqlen_k, group, causal):
    """Online softmax over 16 x 32 tiles equals the full-matrix definition (float64)."""
    nheads, nheads_k = GROUPS[group]
    batch = 1 if seqlen_q > 1000 else 2
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, torch.float64)
    out, lse = attention_forward(q, k, v, causal=causal, block_m=16, block_n=32)
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    assert out.dtype == torch.float64 and ref.dtype == torch.float64
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_lse_matches(lse, ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_m,block_n", [(1, 1), (7, 5), (64, 16), (128, 128), (4096, 4096)])
def test_tiled_block_sizes(block_m, block_n):
    """Any tiling gives the same attention, including tiles that do not divide the sequence."""
    q, k, v = make_qkv(1, 37, 45, 4, 2, 24, torch.float64)
    for causal in (False, True):
        out, lse = attention_forward(q, k, v, causal=causal, block_m=block_m, block_n=block_n)
        ref, ref_lse = naive_attention(q, k, v, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        assert_lse_matches(lse, ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 97), (1025, 97), (5, 1)])
def test_fully_masked_rows(seqlen_q, seqlen_k):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key; their
    output is exactly 0 and their lse +inf; every other row is finite."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 40, torch.float64)
    n = empty_rows(seqlen_q, seqlen_k, causal=True)
    for out, lse in (
        attention_forward(q, k, v, causal=True, block_m=16, block_n=32),
        naive_attention(q, k, v, causal=True),
    ):
        assert torch.all(out[:, :n] == 0)
        assert torch.all(torch.isposinf(lse[:, :, :n]))
        assert torch.all(torch.isfinite(lse[:, :, n:]))
        assert torch.all(out[:, n:].abs().sum(dim=-1) > 0)


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_lse_is_logsumexp_of_scores(group, causal):
    """lse is torch.logsumexp of the scaled (and masked) scores, +inf for rows with no key."""
    nheads, nheads_k = GROUPS[group]
    q, k, v = make_qkv(2, 113, 97, nheads, nheads_k, 40, torch.float64)
    scale = 0.37
    expected = torch.logsumexp(_masked_scores(q, k, scale, causal), dim=-1)
    expected = expected.masked_fill(torch.isneginf(expected), math.inf)
    _, lse = attention_forward(q, k, v, scale, causal, block_m=16, block_n=32)
    _, naive_lse = naive_attention(q, k, v, scale, causal)
    assert_lse_matches(lse, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(naive_lse, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(97, 113), (113, 97), (64, 64)])
def test_naive_matches_sdpa(seqlen_q, seqlen_k, causal):
    """The oracle itself agrees with torch's scaled_dot_product_attention (float64, GQA expanded,
    bottom-right causal mask as an explicit boolean mask) on every row that sees a key."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 8, 2, 40, torch.float64)
    ref, _ = naive_attention(q, k, v, causal=causal)
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if causal:
        mask = mask.tril(seqlen_k - seqlen_q)
    expand = lambda t: t.repeat_interleave(4, dim=2).transpose(1, 2)  # noqa: E731
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), expand(k), expand(v), attn_mask=mask).transpose(1, 2)
    n = empty_rows(seqlen_q, seqlen_k, causal)
    torch.testing.assert_close(ref[:, n:], sdpa[:, n:], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# flash_cute.reference: the backward pass

BWD_SEQLENS = [(1, 1), (97, 113), (113, 97), (130, 1)]
# (head_dim, nheads, nheads_k): every head dim meets one GQA group size (1, 2, 4).
BWD_HEADS = [(16, 2, 2), (40, 4, 2), (59, 8, 2)]


def _heads_id(case):
    head_dim, nheads, nheads_k = case
    return f"d{head_dim}-g{nheads // nheads_k}"


def _strided_randn(like):
    """Standard-normal values shaped like ``like`` (batch, seqlen, heads, d), stored as the
    transpose of a (batch, heads, seqlen, d) tensor: a non-contiguous upstream gradient."""
    b, s, h, d = like.shape
    return torch.randn(b, h, s, d, dtype=like.dtype).transpose(1, 2)


def _autograd(q, k, v, dout, softmax_scale=None, causal=False, mask=None):
    """naive_attention in float64 and its gradients by torch.autograd: (out, lse, dq, dk, dv)."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    out, lse = naive_attention(*leaves, softmax_scale, causal, mask=mask, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout.to(torch.float64))
    return out.detach(), lse.detach(), dq, dk, dv


def _assert_grads_close(grads, ref, like, rtol, atol):
    for name, g, r, t in zip(("dq", "dk", "dv"), grads, ref, like):
        assert g.shape == t.shape, f"{name} shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        assert g.dtype == t.dtype, f"{name} dtype {g.dtype}, expected {t.dtype}"
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("head_dim,nheads,nheads_k", BWD_HEADS, ids=[_heads_id(c) for c in BWD_HEADS])
@pytest.mark.parametrize("seqlen_q,seqlen_k", BWD_SEQLENS)
def test_backward_matches_autograd(seqlen_q, seqlen_k, head_dim, nheads, nheads_k, causal):
    """The tiled backward (32 x 16 tiles, outer loop over key blocks) equals torch.autograd
    through the full-matrix definition (float64, non-contiguous dout). Query rows that see no
    key get dq = 0 exactly."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, torch.float64)
    dout = _strided_randn(q)
    _, ref_lse, *ref = _autograd(q, k, v, dout, causal=causal)
    out, lse = attention_forward(q, k, v, causal=causal, block_m=32, block_n=16)
    n = empty_rows(seqlen_q, seqlen_k, causal)

    # With the oracle's float64 lse, the tiling is the only difference: agreement to rounding.
    grads = attention_backward(dout, q, k, v, out, ref_lse, causal=causal, block_m=32, block_n=16)
    _assert_grads_close(grads, ref, (q, k, v), rtol=1e-9, atol=1e-10)
    assert torch.all(grads[0][:, :n] == 0)

    # With the float32 lse the forward saves (what flash_attn_func's backward gets), P carries
    # the lse's float32 rounding: relative errors of a few 1e-7.
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, block_m=32, block_n=16)
    _assert_grads_close(grads, ref, (q, k, v), rtol=1e-5, atol=2e-6)
    assert torch.all(grads[0][:, :n] == 0)


@pytest.mark.parametrize("block_m,block_n", [(1, 1), (7, 5), (16, 64), (128, 128), (4096, 4096)])
def test_backward_block_sizes(block_m, block_n):
    """Any tiling gives the same gradients, including tiles that do not divide the sequence
    and causal tiles on the diagonal (seqlen_q > seqlen_k and seqlen_q < seqlen_k)."""
    for seqlen_q, seqlen_k in ((37, 23), (23, 37)):
        q, k, v = make_qkv(1, seqlen_q, seqlen_k, 4, 2, 24, torch.float64)
        dout = torch.randn_like(q)
        for causal in (False, True):
            _, ref_lse, *ref = _autograd(q, k, v, dout, causal=causal)
            out, _ = attention_forward(q, k, v, causal=causal)
            grads = attention_backward(dout, q, k, v, out, ref_lse, None, causal, block_m=block_m, block_n=block_n)
            _assert_grads_close(grads, ref, (q, k, v), rtol=1e-9, atol=1e-10)


def test_backward_gqa_sums_over_query_heads():
    """GQA: dq is that of multi-head attention with K and V copied per query head, and dk, dv
    are that attention's per-query-head gradients summed over each KV head's group."""
    q, k, v = make_qkv(2, 45, 37, 8, 2, 24, torch.float64)
    dout = torch.randn_like(q)
    kx, vx = k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2)
    for causal in (False, True):
        out, lse = attention_forward(q, k, v, causal=causal, block_m=16, block_n=16)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=causal, block_m=16, block_n=16)
        dqx, dkx, dvx = attention_backward(dout, q, kx, vx, out, lse, causal=causal, block_m=16, block_n=16)
        assert dk.shape == k.shape and dv.shape == v.shape
        torch.testing.assert_close(dq, dqx, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(dk, dkx.unflatten(2, (2, 4)).sum(dim=3), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(dv, dvx.unflatten(2, (2, 4)).sum(dim=3), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_backward_dtypes(dtype):
    """Gradients come back in the inputs' dtypes, contiguous, computed in float32: the 2x rule
    of the gradients against float64 autograd."""
    q, k, v = make_qkv(2, 57, 41, 4, 1, 40, dtype)
    dout = _strided_randn(q)
    out, lse = attention_forward(q, k, v, causal=True, block_m=16, block_n=16)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, block_m=16, block_n=16)
    assert all(g.is_contiguous() for g in grads)
    assert_grads_2x_rule(grads, q, k, v, dout, causal=True, oracle_dtype=torch.float64)


def test_backward_empty_inputs():
    """No key (every row empty: zero dq, empty dk and dv) and no query (zero dk and dv)."""
    for seqlen_q, seqlen_k in ((5, 0), (0, 7)):
        q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 16, torch.float32)
        dout = torch.randn_like(q)
        out, lse = attention_forward(q, k, v)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


class _ReferenceAttention(torch.autograd.Function):
    """attention_forward with attention_backward as its derivative, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, causal, mask, block_m, block_n):
        out, lse = attention_forward(q, k, v, None, causal, mask, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, mask, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        causal, mask, block_m, block_n = ctx.options
        dq, dk, dv = attention_backward(dout, *ctx.saved_tensors, None, causal, mask, block_m, block_n)
        return dq, dk, dv, None, None, None, None


def _random_mask(kind, shape, empty_row=None, keep_fraction=0.7):
    """A random mask of ``shape``: boolean (True = attend) or additive (float32 normal biases,
    -inf where the boolean would be False); row ``empty_row`` fully masked."""
    keep = torch.rand(shape) < keep_fraction
    if empty_row is not None:
        keep[..., empty_row, :] = False
    if kind == "bool":
        return keep
    return torch.randn(shape).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 7), (7, 3)])
def test_gradcheck_reference(seqlen_q, seqlen_k, causal, mask_kind):
    """torch.autograd.gradcheck: attention_backward is the derivative of attention_forward
    (float64, 2 x 3 tiles, GQA, causal-empty rows for (7, 3), mask-empty rows with a mask)."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, seqlen_q, seqlen_k, 4, 2, 3, torch.float64))
    mask = None if mask_kind is None else _random_mask(mask_kind, (4, seqlen_q, seqlen_k), empty_row=1)
    # atol: the backward reads the forward's float32 lse (relative rounding ~1e-7 on P).
    assert torch.autograd.gradcheck(
        lambda q, k, v: _ReferenceAttention.apply(q, k, v, causal, mask, 2, 3), (q, k, v), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
def test_gradcheck_operator(causal):
    """torch.autograd.gradcheck of the flash_cute::fwd operator on CPU float64 (the operator takes
    float64; flash_attn_func does not): its registered autograd formula (flash_cute::bwd) is
    its derivative. seqlen_q > seqlen_k: causal-empty rows included."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 6, 4, 4, 1, 5, torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.flash_cute.fwd(q, k, v, 0.6, causal, False)[0], (q, k, v), atol=1e-6, rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# flash_cute.reference: the optional mask

# name -> mask shape for batch 2, nheads 4, seqlen_q 45, seqlen_k 37 (and the row left empty)
MASK_SHAPES = {"2d": ((45, 37), 3), "keys": ((2, 1, 1, 37), None), "heads": ((2, 4, 45, 37), 3)}


def _visible(mask, causal, shape):
    """Which (batch, head, query, key) entries a mask (with causal) lets through."""
    seqlen_q, seqlen_k = shape[-2:]
    keep = mask if mask.dtype == torch.bool else mask > -math.inf
    visible = torch.broadcast_to(keep, shape)
    if causal:
        visible = visible & torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
    return visible


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("shape_name", sorted(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_mask_forward_backward(kind, shape_name, causal):
    """Tiled forward and backward with a mask (combined with causal, GQA) equal the naive
    attention and its autograd gradients; rows the mask and causal leave without a key get
    output 0, lse +inf and dq 0."""
    shape, empty_row = MASK_SHAPES[shape_name]
    q, k, v = make_qkv(2, 45, 37, 4, 2, 24, torch.float64)
    mask = _random_mask(kind, shape, empty_row)
    dout = _strided_randn(q)
    ref_out, ref_lse, *ref = _autograd(q, k, v, dout, causal=causal, mask=mask)
    out, lse = attention_forward(q, k, v, causal=causal, mask=mask, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert_lse_matches(lse, ref_lse, rtol=1e-6, atol=1e-6)
    grads = attention_backward(dout, q, k, v, out, ref_lse, causal=causal, mask=mask, block_m=16, block_n=16)
    _assert_grads_close(grads, ref, (q, k, v), rtol=1e-9, atol=1e-10)

    empty = ~_visible(mask, causal, (2, 4, 45, 37)).any(dim=-1)  # (batch, nheads, seqlen_q)
    assert empty.any() == (empty_row is not None or causal)
    assert torch.equal(torch.isposinf(lse), empty)
    assert torch.all(out.transpose(1, 2)[empty] == 0)
    assert torch.all(grads[0].transpose(1, 2)[empty] == 0)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_mask_naive_matches_sdpa(kind):
    """The oracle's mask means what torch's scaled_dot_product_attention's attn_mask means (a
    per-head mask, GQA expanded, causal added to the mask), on every row that sees a key."""
    q, k, v = make_qkv(2, 45, 37, 8, 2, 24, torch.float64)
    mask = _random_mask(kind, (2, 8, 45, 37), empty_row=3)
    ref, _ = naive_attention(q, k, v, causal=True, mask=mask)
    causal = torch.ones(45, 37, dtype=torch.bool).tril(37 - 45)
    sdpa_mask = mask & causal if kind == "bool" else mask.double().masked_fill(~causal, -math.inf)
    expand = lambda t: t.repeat_interleave(4, dim=2).transpose(1, 2)  # noqa: E731
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), expand(k), expand(v), attn_mask=sdpa_mask)
    seen = _visible(mask, True, (2, 8, 45, 37)).any(dim=-1)
    torch.testing.assert_close(ref.transpose(1, 2)[seen], sdpa[seen], rtol=1e-10, atol=1e-12)


def test_mask_causal_equivalence():
    """A boolean mask equal to the bottom-right causal mask gives causal's results exactly (the
    tiles causal skips contribute exact zeros)."""
    q, k, v = make_qkv(2, 45, 37, 4, 2, 24, torch.float64)
    dout = torch.randn_like(q)
    mask = torch.ones(45, 37, dtype=torch.bool).tril(37 - 45)
    results = []
    for kwargs in ({"causal": True}, {"mask": mask}, {"mask": torch.zeros(45, 37).masked_fill(~mask, -math.inf)}):
        out, lse = attention_forward(q, k, v, block_m=16, block_n=16, **kwargs)
        grads = attention_backward(dout, q, k, v, out, lse, block_m=16, block_n=16, **kwargs)
        results.append((out, lse, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_mask_rejects_bad_masks():
    """Masks that do not broadcast to (batch, nheads, seqlen_q, seqlen_k), and integer masks."""
    q, k, v = make_qkv(2, 5, 7, 4, 2, 8, torch.float32)
    out, lse = attention_forward(q, k, v)
    bad_masks = [
        (torch.ones(5, 6, dtype=torch.bool), ValueError),
        (torch.ones(3, 5, 7, dtype=torch.bool), ValueError),
        (torch.ones(5, 7, dtype=torch.int32), TypeError),
    ]
    for bad, exc in bad_masks:
        with pytest.raises(exc, match="mask"):
            attention_forward(q, k, v, mask=bad)
        with pytest.raises(exc, match="mask"):
            attention_backward(q, q, k, v, out, lse, mask=bad)
        with pytest.raises(exc, match="mask"):
            naive_attention(q, k, v, mask=bad)


# --------------------------------------------------------------------------------------------
# flash_attn_func on CPU tensors


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(97, 113), (113, 97)])
@pytest.mark.parametrize("head_dim", [40, 59])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_api_cpu_2x_rule(dtype, head_dim, seqlen_q, seqlen_k, causal):
    """The CPU path meets the 2x rule against a float64 oracle, lse included."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype)
    out, lse, _ = flash_cute.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    _, ref_lse = assert_2x_rule(out, q, k, v, causal=causal, oracle_dtype=torch.float64)
    assert_lse_matches(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_api_cpu_transposed_inputs():
    """q, k, v as transposes of (batch, heads, seqlen, head_dim) tensors."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(2, 97, 113, 4, 2, 40, torch.float16))
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = flash_cute.flash_attn_func(q, k, v, causal=True)
    assert_2x_rule(out, q, k, v, causal=True, oracle_dtype=torch.float64)


def test_api_cpu_packed_qkv():
    """q, k, v as slices of one packed (batch, seqlen, 3, heads, head_dim) tensor."""
    qkv = torch.randn(2, 97, 3, 4, 59).to(torch.bfloat16)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    out = flash_cute.flash_attn_func(q, k, v)
    assert_2x_rule(out, q, k, v, oracle_dtype=torch.float64)


def test_api_cpu_return_attn_probs():
    """return_attn_probs=True returns (out, lse, empty tensor), out equal to the plain call's."""
    q, k, v = make_qkv(2, 33, 47, 4, 4, 40, torch.float16)
    result = flash_cute.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3
    out, lse, s_dmask = result
    assert torch.equal(out, flash_cute.flash_attn_func(q, k, v, causal=True))
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 33)
    assert isinstance(s_dmask, torch.Tensor) and s_dmask.numel() == 0
    _, ref_lse = naive_attention(q, k, v, causal=True)
    assert_lse_matches(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_api_cpu_softmax_scale():
    """A custom softmax_scale is used for the output and the lse."""
    q, k, v = make_qkv(2, 65, 80, 4, 1, 40, torch.float32)
    scale = 0.9  # far from the default 1/sqrt(40) ~ 0.158
    out, lse, _ = flash_cute.flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    _, ref_lse = assert_2x_rule(out, q, k, v, softmax_scale=scale, oracle_dtype=torch.float64)
    assert_lse_matches(lse, ref_lse, rtol=1e-5, atol=1e-5)
    default = flash_cute.flash_attn_func(q, k, v)
    assert (out - default).abs().max() > 1e-2  # the scale changes the result


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(40, 40), (57, 31), (31, 57)])
def test_api_cpu_window_equivalences(seqlen_q, seqlen_k):
    """window_size=(-1, 0) is causal; windows covering every key are no window."""
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 2, 16, torch.float32)
    full = flash_cute.flash_attn_func(q, k, v)
    causal = flash_cute.flash_attn_func(q, k, v, causal=True)
    assert (full - causal).abs().max() > 1e-3  # the equalities below are not vacuous
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, window_size=(-1, 0)), causal)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)), causal)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, window_size=(seqlen_k, seqlen_k)), full)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, window_size=(seqlen_k + 100, 10**6)), full)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, causal=True, window_size=(seqlen_k, -1)), causal)


def test_api_cpu_deterministic_flag():
    """deterministic only concerns the backward pass: the forward result is the same."""
    q, k, v = make_qkv(1, 20, 30, 2, 1, 32, torch.bfloat16)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, deterministic=True), flash_cute.flash_attn_func(q, k, v))


def test_api_cpu_no_keys():
    """seqlen_k == 0: every row is empty (output 0, lse +inf); seqlen_q == 0: empty outputs."""
    q, k, v = make_qkv(2, 5, 0, 2, 2, 16, torch.float16)
    out, lse, _ = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and torch.all(out == 0)
    assert torch.all(torch.isposinf(lse)) and lse.shape == (2, 2, 5)
    q, k, v = make_qkv(2, 0, 7, 2, 2, 16, torch.float16)
    out, lse, _ = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)


# --------------------------------------------------------------------------------------------
# flash_attn_func on CPU tensors: gradients


def _api_grads(q, k, v, dout, **kwargs):
    """flash_attn_func(q, k, v, **kwargs).backward(dout) on leaf copies: (dq, dk, dv)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_cute.flash_attn_func(*leaves, **kwargs)
    out.backward(dout)
    return tuple(t.grad for t in leaves)


def _assert_fp32_grads(grads, ref):
    """float32 gradients within 1e-5 of the float64 ones, relative to the largest of them
    (float32 accumulation over the sequence and the head dim gives ~1e-6)."""
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        err, scale = (g.double() - r).abs().max().item(), r.abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max error {err:.3e} > 1e-5 x max|grad| ({scale:.3e})"


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(97, 113), (113, 97)])
@pytest.mark.parametrize("head_dim", [40, 59])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_api_cpu_backward(dtype, head_dim, seqlen_q, seqlen_k, causal):
    """flash_attn_func(...).backward() on CPU (GQA; head dim 59 padded to 64 and back): the
    gradients' 2x rule against float64 autograd (and float32 within 1e-5 of the gradients'
    scale); rows that see no key get dq = 0."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype)
    dout = _strided_randn(q)
    grads = _api_grads(q, k, v, dout, causal=causal)
    ref = assert_grads_2x_rule(grads, q, k, v, dout, causal=causal, oracle_dtype=torch.float64)
    if dtype == torch.float32:
        _assert_fp32_grads(grads, ref)
    assert torch.all(grads[0][:, : empty_rows(seqlen_q, seqlen_k, causal)] == 0)


@pytest.mark.parametrize("nheads,nheads_k,head_dim", [(8, 1, 20), (3, 3, 1), (2, 1, 256)])
def test_api_cpu_backward_heads(nheads, nheads_k, head_dim):
    """MQA, MHA and the extreme head dims (1 is padded to 8), causal with empty rows."""
    q, k, v = make_qkv(2, 47, 33, nheads, nheads_k, head_dim, torch.float32)
    dout = torch.randn_like(q)
    grads = _api_grads(q, k, v, dout, causal=True, softmax_scale=0.3)
    ref = assert_grads_2x_rule(grads, q, k, v, dout, softmax_scale=0.3, causal=True, oracle_dtype=torch.float64)
    _assert_fp32_grads(grads, ref)


def test_api_cpu_backward_strided_inputs():
    """q, k, v as transposes of (batch, heads, seqlen, head_dim) tensors (head dim 32: no padding
    copy, the operator sees the strided tensors)."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(2, 45, 37, 4, 2, 32, torch.float32))
    assert not q.is_contiguous()
    dout = _strided_randn(q)
    grads = _api_grads(q, k, v, dout, causal=True)
    assert_grads_2x_rule(grads, q, k, v, dout, causal=True, oracle_dtype=torch.float64)


def test_api_cpu_backward_deterministic():
    """deterministic=True is accepted; on CPU every backward pass is deterministic: the same
    gradients, bit for bit, with or without it and from run to run."""
    q, k, v = make_qkv(2, 45, 37, 4, 2, 40, torch.float32)
    dout = torch.randn_like(q)
    first = _api_grads(q, k, v, dout, causal=True, deterministic=True)
    for kwargs in ({"deterministic": True}, {"deterministic": False}):
        for a, b in zip(first, _api_grads(q, k, v, dout, causal=True, **kwargs)):
            assert torch.equal(a, b)


def test_api_cpu_backward_ignores_lse_gradient():
    """The lse is an auxiliary output (as in flash_attn): a loss that uses it gets the
    gradients of the output alone."""
    q, k, v = make_qkv(1, 20, 30, 2, 1, 16, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_cute.flash_attn_func(*leaves, return_attn_probs=True)
    (out.sum() + lse.sum()).backward()
    expected = _api_grads(q, k, v, torch.ones_like(q))
    for leaf, g in zip(leaves, expected):
        assert torch.equal(leaf.grad, g)


# --------------------------------------------------------------------------------------------
# The torch.library operators on CPU: flash_cute::bwd and fwd's autograd registration


@pytest.mark.parametrize(
    "causal,deterministic,layout",
    [(False, False, "contiguous"), (True, True, "contiguous"), (True, False, "transposed")],
)
def test_opcheck_bwd(causal, deterministic, layout):
    """torch.library.opcheck of flash_cute::bwd (schema, fake tensor incl. strides, AOT
    dispatch) on CPU float32, seqlen_q > seqlen_k (causal-empty rows), GQA."""
    q, k, v = make_qkv(2, 24, 16, 4, 2, 16, torch.float32)
    if layout == "transposed":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.25, causal)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.flash_cute.bwd.default, (dout, q, k, v, out, lse, 0.25, causal, deterministic))


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
def test_opcheck_fwd_autograd(causal):
    """torch.library.opcheck of flash_cute::fwd on inputs that require grad: the autograd
    registration is checked, with and without the deterministic argument."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 24, 16, 4, 2, 16, torch.float32))
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, k, v, 0.25, causal))
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, k, v, 0.25, causal, True))


# --------------------------------------------------------------------------------------------
# flash_cute.reference: the forward pass in FlashAttention-1's loop order

FA1_SEQLENS = [(1, 1), (37, 129), (129, 37), (64, 64), (5, 0)]


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", FA1_SEQLENS)
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fa1_order_matches_fa2_order(dtype, block_m, block_n, seqlen_q, seqlen_k, group, causal):
    """Outer loop over key blocks (FA1) gives FA2's out and lse on the same tiles: GQA, tiles that
    do not divide the sequences, causal-empty rows (seqlen_q > seqlen_k) and no keys at all."""
    nheads, nheads_k = GROUPS[group]
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, 24, dtype)
    out, lse = attention_forward_fa1(q, k, v, causal=causal, block_m=block_m, block_n=block_n)
    ref, ref_lse = attention_forward(q, k, v, causal=causal, block_m=block_m, block_n=block_n)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out, ref, **tol)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(37, 129), (129, 37), (113, 97)])
def test_fa1_order_matches_naive(seqlen_q, seqlen_k, causal):
    """FA1's order equals the full-matrix definition (float64, GQA 4); causal rows that see no
    key get output exactly 0 and lse +inf, every other row a finite lse."""
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 8, 2, 40, torch.float64)
    out, lse = attention_forward_fa1(q, k, v, causal=causal, block_m=16, block_n=32)
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_lse_matches(lse, ref_lse, rtol=1e-6, atol=1e-6)
    n = empty_rows(seqlen_q, seqlen_k, causal)
    assert torch.all(out[:, :n] == 0)
    assert torch.all(torch.isposinf(lse[:, :, :n]))
    assert torch.all(torch.isfinite(lse[:, :, n:]))


@pytest.mark.parametrize("block_m,block_n", [(1, 1), (7, 5), (128, 128), (4096, 4096)])
def test_fa1_order_block_sizes(block_m, block_n):
    """Any tiling of FA1's order gives the same attention (custom scale, both causal modes)."""
    q, k, v = make_qkv(1, 37, 45, 4, 2, 24, torch.float64)
    for causal in (False, True):
        out, lse = attention_forward_fa1(q, k, v, 0.3, causal, block_m=block_m, block_n=block_n)
        ref, ref_lse = naive_attention(q, k, v, 0.3, causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        assert_lse_matches(lse, ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fa1_order_half_inputs(dtype):
    """Half-precision inputs: output in the input dtype, computed in float32 like FA2's order."""
    q, k, v = make_qkv(2, 57, 41, 4, 1, 40, dtype)
    out, lse = attention_forward_fa1(q, k, v, causal=True, block_m=16, block_n=16)
    ref, ref_lse = attention_forward(q, k, v, causal=True, block_m=16, block_n=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref)
    assert_lse_matches(lse, ref_lse, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Split-KV (Flash-Decoding) forward


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 300])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 257), (4, 100), (9, 5), (3, 0)])
def test_split_kv_forward_equals_attention_forward(seqlen_q, seqlen_k, causal, num_splits):
    """Partial outputs over key ranges, combined by their lse weights, give the unsplit result:
    more splits than keys, rows that see no key (causal, seqlen_q > seqlen_k), GQA."""
    from flash_cute.reference import split_kv_forward

    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 8, 2, 16, torch.float32)
    out, lse = split_kv_forward(q, k, v, 0.3, causal, num_splits)
    ref_out, ref_lse = attention_forward(q, k, v, 0.3, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert torch.all(out.transpose(1, 2)[torch.isposinf(ref_lse)] == 0)


# --------------------------------------------------------------------------------------------
# softcap, local windows and ALiBi in the reference (the oracle for the kernels to come)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 17), (17, 9)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alibi", [None, "heads", "batch_heads"])
@pytest.mark.parametrize("window", [(-1, -1), (3, 2), (0, -1), (7, 0)], ids=["nowin", "w3-2", "w0-inf", "w7-0"])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "cap5"])
def test_reference_options_forward_backward(softcap, window, alibi, causal, seqlen_q, seqlen_k):
    """attention_forward / attention_backward with softcap, a local window and ALiBi (alone and
    combined, with causal and GQA) against a direct float64 computation and its autograd."""
    q, k, v = (t.double() for t in make_qkv(2, seqlen_q, seqlen_k, 4, 2, 8, torch.float32))
    slopes = None if alibi is None else torch.rand((4,) if alibi == "heads" else (2, 4), dtype=torch.float32)
    scale = 0.7
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = options_oracle(*leaves, scale, causal, softcap, window, slopes)
    dout = torch.randn_like(want_out)
    want_grads = torch.autograd.grad(want_out, leaves, dout)
    options = dict(softcap=softcap, window_size=window, alibi_slopes=slopes, block_m=4, block_n=8)
    out, lse = attention_forward(q, k, v, scale, causal, **options)
    torch.testing.assert_close(out, want_out.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse.detach()[finite], rtol=1e-5, atol=1e-5)
    grads = attention_backward(dout, q, k, v, out, lse.double(), scale, causal, **options)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
