"""The PyTorch reference (flash_cute.reference) and flash_attn_func on CPU tensors, which runs it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flash_cute
from flash_cute.reference import attention_forward, naive_attention
from helpers import assert_2x_rule, assert_lse_matches, empty_rows, make_qkv

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
