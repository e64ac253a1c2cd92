"""flash_attn_varlen_func: sequences of different lengths concatenated along the first dimension
(delimited by cu_seqlens_q / cu_seqlens_k), and the paged KV cache (block_table).

* CPU (no marker): the result, the lse and the gradients equal those of flash_attn_func run on
  each sequence alone (a batch of one with its own lengths); empty and length-1 sequences, causal
  with len_q != len_k in both directions, GQA, launch-size hints (max_seqlen_*) that are too
  small, paged caches whose unused slots hold NaN.
* GPU (``cuda``): the kernels against per-sequence float32 oracles with the 2x rule
  (helpers.assert_varlen_2x_rule / assert_varlen_grads_2x_rule), on NaN-poisoned memory so that
  an element left unwritten shows up; the deterministic mode bitwise; the paged kernel path
  (page size a multiple of the key block) and the gather path against the contiguous layout.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_cute
import flash_cute.flash_attn_interface
from helpers import (
    CAUSAL_IDS,
    DTYPES,
    DTYPE_IDS,
    assert_close_to_rounding,
    assert_lse_matches,
    assert_varlen_2x_rule,
    assert_varlen_grads_2x_rule,
    make_varlen_qkv,
    poison_allocator,
    require_bwd_kernel,
    require_kernel,
    seq_slices,
    varlen_call_bytes,
)

CPU_DTYPES = [torch.float32, torch.bfloat16]
CPU_DTYPE_IDS = ["fp32", "bf16"]


# --------------------------------------------------------------------------------------------
# Shared machinery


def _lengths(cu):
    return [s.stop - s.start for s in seq_slices(cu)]


def _max(lengths):
    return max(lengths, default=0)


def varlen(q, k, v, cu_q, cu_k, max_q=None, max_k=None, dout=None, **kwargs):
    """flash_attn_varlen_func on fresh leaves (sharing q's, k's, v's memory) with
    return_attn_probs=True; then, with ``dout``, the gradients by torch.autograd.
    Returns (out, lse, grads or None). max_q / max_k default to the true maxima (of
    cu_seqlens; for a paged k, pass them)."""
    if max_q is None:
        max_q = _max(_lengths(cu_q))
    if max_k is None:
        max_k = _max(_lengths(cu_k))
    q, k, v = (t.detach().requires_grad_(dout is not None) for t in (q, k, v))
    res = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kwargs)
    assert isinstance(res, tuple) and len(res) == 3, "return_attn_probs=True returns (out, softmax_lse, S_dmask)"
    out, lse, s_dmask = res
    assert s_dmask.numel() == 0, "S_dmask is an empty tensor without dropout"
    assert lse.shape == (q.shape[1], q.shape[0]), f"lse shape {tuple(lse.shape)}, expected (nheads, total_q)"
    assert lse.dtype == torch.float32
    grads = None
    if dout is not None:
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), grads


def per_sequence(q, k, v, cu_q, cu_k, dout=None, **kwargs):
    """flash_attn_func on each sequence alone (a batch of one with its own lengths), the results
    concatenated: (out (total_q, h, d), lse (h, total_q), (dq, dk, dv) or None)."""
    outs, lses, grads = [], [], ([], [], [])
    for sq, sk in zip(seq_slices(cu_q), seq_slices(cu_k)):
        need_grad = dout is not None
        qs, ks, vs = (t.detach()[s].unsqueeze(0).requires_grad_(need_grad) for t, s in ((q, sq), (k, sk), (v, sk)))
        out, lse, _ = flash_cute.flash_attn_func(qs, ks, vs, return_attn_probs=True, **kwargs)
        outs.append(out.detach()[0])
        lses.append(lse.detach()[0])
        if dout is not None:
            for acc, g in zip(grads, torch.autograd.grad(out, (qs, ks, vs), dout[sq].unsqueeze(0))):
                acc.append(g[0])
    cat_grads = tuple(torch.cat(g, dim=0) for g in grads) if dout is not None else None
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1), cat_grads


def assert_empty_rows(out, lse, dq=None):
    """Where the lse is +inf (a (row, head) that sees no key), the output (and dq) is exactly 0."""
    empty = torch.isposinf(lse).transpose(0, 1)  # (total_q, nheads)
    assert torch.all(out[empty] == 0), "rows that see no key must give output 0"
    if dq is not None:
        assert torch.all(dq[empty] == 0), "dq of rows that see no key must be exactly 0"


def assert_matches(got, want, grads_got=None, grads_want=None):
    """(out, lse[, grads]) equal up to rounding."""
    out, lse = got
    ref_out, ref_lse = want
    assert_close_to_rounding(out, ref_out, "out")
    assert_close_to_rounding(lse, ref_lse, "lse")
    if grads_want is not None:
        for name, g, r in zip(("dq", "dk", "dv"), grads_got, grads_want):
            assert_close_to_rounding(g, r, name)


# (lens_q, lens_k, head_dim): empty sequences on either side and both, length 1, causal with
# len_q > len_k (leading rows see no key) and len_q < len_k, lengths past one 128-row tile,
# head dims that are not multiples of 8 (the padded route).
CPU_CASES = {
    "same": ([7, 1, 0, 150, 13], [7, 1, 0, 150, 13], 16),
    "q_ne_k": ([7, 20, 1, 0, 5, 130, 3, 2], [20, 7, 1, 4, 0, 200, 1, 0], 20),
    "single": ([37], [50], 32),
    "no_keys": ([3, 2], [0, 0], 16),
}
GROUPS = {"mha": (4, 4), "gqa2": (4, 2), "mqa": (4, 1)}


# --------------------------------------------------------------------------------------------
# CPU: the reference path against flash_attn_func per sequence


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("case", sorted(CPU_CASES))
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_varlen_matches_per_sequence_cpu(dtype, causal, case, group):
    """out, lse (nheads, total_q) and dq, dk, dv equal flash_attn_func's on each sequence alone."""
    lens_q, lens_k, head_dim = CPU_CASES[case]
    nheads, nheads_k = GROUPS[group]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, nheads, nheads_k, head_dim, dtype)
    dout = torch.randn(q.shape).to(dtype)
    out, lse, grads = varlen(q, k, v, cu_q, cu_k, dout=dout, causal=causal)
    ref_out, ref_lse, ref_grads = per_sequence(q, k, v, cu_q, cu_k, dout, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert_matches((out, lse), (ref_out, ref_lse), grads, ref_grads)
    assert_empty_rows(out, lse, grads[0])
    # And against the definition (per-sequence naive attention), independently of flash_attn_func.
    oracle = torch.float64 if dtype == torch.float32 else torch.float32
    _, naive_lse = assert_varlen_2x_rule(out, q, k, v, cu_q, cu_k, causal=causal, oracle_dtype=oracle)
    assert_lse_matches(lse, naive_lse, rtol=1e-5, atol=1e-5)
    assert_varlen_grads_2x_rule(grads, q, k, v, dout, cu_q, cu_k, causal=causal, oracle_dtype=oracle)
    if case == "no_keys" or (causal and case == "q_ne_k"):
        assert torch.isposinf(lse).any(), "the case has rows that see no key (a bug in the test)"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_varlen_return_values_cpu(dtype):
    """Without return_attn_probs: the output tensor alone; with it: (out, lse, empty S_dmask)."""
    q, k, v, cu_q, cu_k = make_varlen_qkv([5, 9], [3, 12], 4, 2, 16, dtype)
    out = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 12)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    res = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 12, return_attn_probs=True)
    assert len(res) == 3 and torch.equal(res[0], out)
    assert res[1].shape == (4, 14) and res[1].dtype == torch.float32 and res[2].numel() == 0


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_varlen_scale_and_window_cpu(dtype):
    """softmax_scale is applied per sequence; window_size=(-1, 0) is causal (bottom-right)."""
    lens_q, lens_k, head_dim = CPU_CASES["q_ne_k"]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 2, head_dim, dtype)
    dout = torch.randn(q.shape).to(dtype)
    out, lse, grads = varlen(q, k, v, cu_q, cu_k, dout=dout, softmax_scale=0.3, window_size=(-1, 0))
    ref_out, ref_lse, ref_grads = per_sequence(q, k, v, cu_q, cu_k, dout, softmax_scale=0.3, causal=True)
    assert_matches((out, lse), (ref_out, ref_lse), grads, ref_grads)


HINTS = ["exact", "half", "one", "zero", "large"]


def _hint(kind, true_max):
    return {"exact": true_max, "half": max(1, true_max // 2), "one": 1, "zero": 0, "large": 2 * true_max + 7}[kind]


def _zero_hint_rejected_or(hint, check):
    """Runs ``check``; a hint of 0 may instead be rejected up front with FlashAttnValueError
    (either is fine: what is not fine is a wrong or unwritten result)."""
    if hint != "zero":
        return check()
    try:
        return check()
    except flash_cute.FlashAttnValueError:
        return None


def test_varlen_window_judged_on_true_lengths_cpu():
    """A window is compared with the true key lengths, not with the launch-size hint: window
    (5, 0) over sequences of 40 and 30 keys is a real window even when max_seqlen_k says 4 (a hint
    that may be too small), so the call must do what flash_attn_func does per sequence (today:
    raise FlashAttnNotImplementedError), not silently compute plain causal attention."""
    lens = [40, 30]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens, lens, 4, 2, 16, torch.float32)
    window = (5, 0)
    try:
        ref_out, ref_lse, _ = per_sequence(q, k, v, cu_q, cu_k, window_size=window)
    except flash_cute.FlashAttnNotImplementedError:
        with pytest.raises(flash_cute.FlashAttnNotImplementedError):
            varlen(q, k, v, cu_q, cu_k, 4, 4, window_size=window)
        return
    out, lse, _ = varlen(q, k, v, cu_q, cu_k, 4, 4, window_size=window)
    assert_matches((out, lse), (ref_out, ref_lse))


@pytest.mark.parametrize("hint", HINTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_varlen_max_seqlen_hints_cpu(dtype, hint):
    """max_seqlen_q / max_seqlen_k are launch-size hints: smaller (or larger) than the true
    maxima, the results are still exact (a hint of 0 may be rejected instead)."""
    lens_q, lens_k = [130, 1, 0, 300, 9], [200, 3, 2, 150, 260]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 2, 16, dtype)
    dout = torch.randn(q.shape).to(dtype)
    max_q, max_k = _hint(hint, max(lens_q)), _hint(hint, max(lens_k))
    ref_out, ref_lse, ref_grads = per_sequence(q, k, v, cu_q, cu_k, dout, causal=True)

    def check():
        out, lse, grads = varlen(q, k, v, cu_q, cu_k, max_q, max_k, dout=dout, causal=True)
        assert_matches((out, lse), (ref_out, ref_lse), grads, ref_grads)

    _zero_hint_rejected_or(hint, check)


# --------------------------------------------------------------------------------------------
# Paged KV cache


def make_paged(k, v, cu_k, page_block_size, spare_pages=3):
    """k, v (total_k, nheads_k, d) scattered into caches (num_blocks, page_block_size, nheads_k, d)
    over a random permutation of the pages. Every slot that holds no key (spare pages, the tail
    of each sequence's last page) is NaN, and the block table's unused entries point at spare
    pages: a read of anything but a sequence's own keys gives NaN.

    Returns (k_cache, v_cache, block_table int32 (batch, max_blocks_per_seq), slots): ``slots``
    (total_k,) are the flat (block * page_block_size + offset) cache slots of the contiguous keys."""
    lens = _lengths(cu_k)
    pages = [-(-n // page_block_size) for n in lens]
    used = sum(pages)
    num_blocks = used + spare_pages
    perm = torch.randperm(num_blocks).tolist()
    width = max(pages, default=0) + 1  # one unused entry per row at least
    spare = perm[used:]
    table = torch.empty(len(lens), width, dtype=torch.int32)
    slots = []
    nxt = 0
    for b, (n, p) in enumerate(zip(lens, pages)):
        for j in range(width):
            if j < p:
                blk = perm[nxt]
                nxt += 1
                table[b, j] = blk
                rows = min(page_block_size, n - j * page_block_size)
                slots += [blk * page_block_size + r for r in range(rows)]
            else:
                table[b, j] = spare[(b + j) % len(spare)]
    slots = torch.tensor(slots, dtype=torch.int64, device=k.device)
    shape = (num_blocks, page_block_size) + tuple(k.shape[1:])
    caches = []
    for t in (k, v):
        cache = torch.full(shape, math.nan, dtype=t.dtype, device=t.device)
        cache.view(-1, *t.shape[1:])[slots] = t
        caches.append(cache)
    return caches[0], caches[1], table.to(k.device), slots


def _from_cache(cache, slots):
    """The contiguous (total_k, nheads_k, d) rows of a cache (or of its gradient)."""
    return cache.reshape(-1, *cache.shape[2:])[slots]


def _unused_slots(cache, slots):
    mask = torch.ones(cache.shape[0] * cache.shape[1], dtype=torch.bool, device=cache.device)
    mask[slots] = False
    return mask


def check_paged(q, k, v, cu_q, cu_k, page_block_size, causal, **kwargs):
    """The paged forward (and, with gradients, backward) equals the contiguous varlen one: out and
    lse up to rounding; the caches' gradients hold the contiguous dk, dv at the keys' slots and 0
    in every other slot (no NaN from the NaN-filled slots)."""
    lens_k = _lengths(cu_k)
    max_q, max_k = _max(_lengths(cu_q)), _max(lens_k)
    dout = torch.randn(q.shape, device=q.device).to(q.dtype)
    k_cache, v_cache, table, slots = make_paged(k, v, cu_k, page_block_size)
    assert torch.equal(_from_cache(k_cache, slots), k)
    ref_out, ref_lse, ref_grads = varlen(q, k, v, cu_q, cu_k, max_q, max_k, dout=dout, causal=causal, **kwargs)
    # Without gradients (inference: the paged kernel path where the page size allows), then with.
    for with_grads in (False, True):
        out, lse, grads = varlen(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, dout=dout if with_grads else None,
                                 causal=causal, block_table=table, **kwargs)
        assert out.shape == q.shape
        assert not out.isnan().any(), "paged output has NaN: a slot that holds no key was read"
        assert_close_to_rounding(out, ref_out, "out")
        assert_close_to_rounding(lse, ref_lse, "lse")
    dq, dk_cache, dv_cache = grads
    assert_close_to_rounding(dq, ref_grads[0], "dq")
    unused = _unused_slots(k_cache, slots)
    for name, g, cache, r in (("dk", dk_cache, k_cache, ref_grads[1]), ("dv", dv_cache, v_cache, ref_grads[2])):
        assert g.shape == cache.shape and g.dtype == cache.dtype, f"{name}: gradient shaped like the cache"
        assert not g.isnan().any(), f"{name} of the cache has NaN"
        assert_close_to_rounding(_from_cache(g, slots), r, name)
        assert torch.all(g.reshape(-1, *g.shape[2:])[unused] == 0), f"{name}: nonzero gradient in a slot without key"
    return out, lse


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("page_block_size", [16, 64])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_paged_matches_contiguous_cpu(dtype, page_block_size, causal):
    """block_table: k, v as paged caches (random page order, NaN in every slot without a key)
    give the contiguous varlen result, forward and gradients w.r.t. the caches; lengths of
    0, 1, whole pages, a page and a bit; causal rows that see no key."""
    lens_q = [3, 16, 20, 100, 1, 50, 64]
    lens_k = [0, 16, 64, 100, 1, 37, 65]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 2, 16, dtype)
    check_paged(q, k, v, cu_q, cu_k, page_block_size, causal)


def test_paged_matches_per_sequence_cpu():
    """The paged result also equals flash_attn_func per sequence (not only the contiguous varlen
    path, which could share a bug)."""
    lens_q, lens_k = [5, 40, 1], [33, 40, 17]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 1, 24, torch.float32)
    k_cache, v_cache, table, _ = make_paged(k, v, cu_k, 16)
    out, lse, _ = varlen(q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, block_table=table)
    ref_out, ref_lse, _ = per_sequence(q, k, v, cu_q, cu_k, causal=True)
    assert_matches((out, lse), (ref_out, ref_lse))


# --------------------------------------------------------------------------------------------
# GPU: the kernels against per-sequence float32 oracles, on poisoned memory


def run_varlen_poisoned(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    """flash_attn_varlen_func on NaN-poisoned memory. Returns (out, lse)."""
    poison_allocator(varlen_call_bytes(q, k, v, cu_q.numel() - 1, max(max_q, max_k)))
    out, lse, _ = varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    return out, lse


def run_varlen_backward(q, k, v, dout, cu_q, cu_k, max_q, max_k, poison=True, **kwargs):
    """The forward pass, then the gradients with the memory the backward pass allocates
    NaN-poisoned first. Returns (dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    if poison:
        poison_allocator(varlen_call_bytes(q, k, v, cu_q.numel() - 1, max(max_q, max_k)))
    return torch.autograd.grad(out, (q, k, v), dout)


def check_gpu(q, k, v, cu_q, cu_k, max_q=None, max_k=None, causal=False, **kwargs):
    """Forward (out, lse) and backward (dq, dk, dv) on poisoned memory, each against the
    per-sequence float32 oracle with the 2x rule; rows that see no key exactly 0."""
    max_q = _max(_lengths(cu_q)) if max_q is None else max_q
    max_k = _max(_lengths(cu_k)) if max_k is None else max_k
    out, lse = run_varlen_poisoned(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, **kwargs)
    _, ref_lse = assert_varlen_2x_rule(out, q, k, v, cu_q, cu_k, causal=causal)
    assert_lse_matches(lse, ref_lse)
    dout = torch.randn(q.shape, device=q.device).to(q.dtype)
    grads = run_varlen_backward(q, k, v, dout, cu_q, cu_k, max_q, max_k, causal=causal, **kwargs)
    assert_varlen_grads_2x_rule(grads, q, k, v, dout, cu_q, cu_k, causal=causal)
    assert_empty_rows(out, lse, grads[0])
    return out, lse, grads


def _long_and_short():
    """30 sequences of 1..200 tokens and one of 3000 among them."""
    lens = torch.randint(1, 201, (30,)).tolist()
    return lens[:13] + [3000] + lens[13:]


# (lens_q, lens_k): 0 on either side and both, 1, len_q != len_k both ways (causal rows without
# keys), lengths that end inside a tile and exactly on one.
GPU_EDGES = ([0, 1, 5, 130, 1, 0, 77, 300, 64, 3], [3, 1, 0, 200, 1, 0, 77, 129, 64, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["edges", "long"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("head_dim", [64, 128, 224])  # 224: two Q buffers beside one dO
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_gpu(dtype, head_dim, causal, case):
    """out, lse and gradients against the float32 oracle per sequence (2x rule)."""
    require_bwd_kernel(dtype, head_dim, causal)
    if case == "edges":
        lens_q, lens_k = GPU_EDGES
    else:
        lens_q = lens_k = _long_and_short()
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 4, head_dim, dtype, "cuda")
    _, lse, _ = check_gpu(q, k, v, cu_q, cu_k, causal=causal)
    if case == "edges":
        assert torch.isposinf(lse).any(), "the case has rows that see no key (a bug in the test)"


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_matches_per_sequence_gpu(dtype, causal):
    """The varlen kernels give flash_attn_func's result on each sequence alone (the padded-batch
    kernels), up to rounding: out, lse, dq, dk, dv; GQA, empty and length-1 sequences."""
    require_bwd_kernel(dtype, 64, causal)
    lens_q, lens_k = [100, 1, 0, 257, 31, 9], [300, 1, 7, 129, 31, 0]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 2, 64, dtype, "cuda")
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, 257, 300, causal=causal,
                                                   return_attn_probs=True)
    grads = torch.autograd.grad(out, leaves, dout)
    want_out, want_lse, want_grads = per_sequence(q, k, v, cu_q, cu_k, dout, causal=causal)
    assert_matches((out.detach(), lse), (want_out, want_lse), grads, want_grads)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("nheads_k", [8, 2, 1], ids=["group1", "group4", "group8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_gqa_gpu(dtype, nheads_k, causal):
    """8 query heads over 8, 2 or 1 KV heads; dk, dv summed over each group."""
    require_bwd_kernel(dtype, 128, causal)
    lens_q, lens_k = [100, 1, 0, 257, 31, 9], [300, 1, 7, 129, 31, 0]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 8, nheads_k, 128, dtype, "cuda")
    check_gpu(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("hint", ["half", "one", "zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_max_seqlen_too_small_gpu(dtype, hint):
    """max_seqlen_q / max_seqlen_k smaller than the true maxima: the kernels loop over the
    remaining blocks; every row is still written and right, forward and backward (a hint of 0
    may be rejected with FlashAttnValueError instead)."""
    require_bwd_kernel(dtype, 64, True)
    lens_q, lens_k = [700, 1, 0, 300, 129], [500, 3, 2, 300, 1000]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 4, 2, 64, dtype, "cuda")
    max_q, max_k = _hint(hint, max(lens_q)), _hint(hint, max(lens_k))
    _zero_hint_rejected_or(hint, lambda: check_gpu(q, k, v, cu_q, cu_k, max_q, max_k, causal=True))


@pytest.mark.cuda
def test_deterministic_with_small_hint_and_wide_grid_gpu():
    """deterministic=True with a max_seqlen_k hint too small while the grid row is still wider
    than the GPU holds at once (133 key-block CTAs per head for 34k keys at a hint of 17k): the
    ordered dQ adds must not wait for a CTA that is not resident (a hang), and the result is
    bitwise reproducible and equals the unordered one up to rounding."""
    dtype = torch.bfloat16
    require_bwd_kernel(dtype, 64, False)
    block_n = flash_cute._C.bwd_tile(64)[1]
    lens_q, lens_k = [256, 64], [266 * block_n, 100]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 2, 1, 64, dtype, "cuda")
    dout = torch.randn_like(q)
    hint_k = 133 * block_n

    def grads(deterministic):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, 256, hint_k, deterministic=deterministic)
        return torch.autograd.grad(out, leaves, dout)

    first, second, unordered = grads(True), grads(True), grads(False)
    for name, a, b, c in zip(("dq", "dk", "dv"), first, second, unordered):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        assert_close_to_rounding(a, c, name)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_deterministic_bitwise_gpu(dtype, causal):
    """deterministic=True: two backward passes give bitwise equal dq, dk, dv, with many key
    blocks adding into each dq row."""
    require_bwd_kernel(dtype, 128, causal)
    lens_q, lens_k = [1500, 1, 700, 2048], [2048, 5, 700, 1500]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 8, 2, 128, dtype, "cuda")
    dout = torch.randn(q.shape, device="cuda").to(dtype)
    args = (q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k))
    first = run_varlen_backward(*args, causal=causal, deterministic=True)
    second = run_varlen_backward(*args, causal=causal, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert not a.isnan().any(), f"{name} has NaN"
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("page_block_size", [256, 16], ids=["page256-kernel", "page16-gather"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_paged_gpu(dtype, page_block_size, causal):
    """Paged caches (random page order, NaN in every slot without a key) give the contiguous
    varlen result (forward on poisoned memory, and gradients w.r.t. the caches); page 256 is a
    multiple of the key block (the kernel path), 16 is not (the gather path)."""
    require_bwd_kernel(dtype, 128, causal)
    lens_q = [5, 256, 100, 1, 40, 301]
    lens_k = [0, 256, 600, 1, 17, 300]
    q, k, v, cu_q, cu_k = make_varlen_qkv(lens_q, lens_k, 8, 2, 128, dtype, "cuda")
    k_cache, v_cache, table, _ = make_paged(k, v, cu_k, page_block_size)
    poison_allocator(varlen_call_bytes(q, k_cache, v_cache, len(lens_q), max(lens_k)))
    out, lse, _ = varlen(q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, block_table=table)
    _, ref_lse = assert_varlen_2x_rule(out, q, k, v, cu_q, cu_k, causal=causal)
    assert_lse_matches(lse, ref_lse)
    check_paged(q, k, v, cu_q, cu_k, page_block_size, causal, deterministic=True)


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
def test_opcheck_varlen_cpu(causal):
    """torch.library.opcheck of the varlen forms of flash_cute::fwd and flash_cute::bwd and of
    flash_cute::bwd_into (the packed functions' backward): schemas, fake tensors, autograd."""
    q, k, v, cu_q, cu_k = make_varlen_qkv([3, 0, 7], [5, 2, 0], 4, 2, 16, torch.float32)
    varlen = (cu_q, cu_k, 7, 5)
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, k, v, 0.25, causal, False, *varlen))
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.25, causal, False, *varlen)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.flash_cute.bwd.default, (dout, q, k, v, out, lse, 0.25, causal, False, *varlen))
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    torch.library.opcheck(torch.ops.flash_cute.bwd_into.default,
                          (dout, q, k, v, out, lse, 0.25, causal, False, *varlen, 0.0, -1, -1, None, 0.0, None, *grads))
    # softcap, a window, (batch, nheads) ALiBi slopes and dropout through all three
    options = (2.0, 2, 1, torch.rand(3, 4), 0.25, torch.randint(0, 2**62, (2,)))
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, k, v, 0.25, False, False, *varlen, None, *options))
    torch.library.opcheck(torch.ops.flash_cute.fwd.default,
                          (q, k, v, 0.25, False, False, *varlen, None, *options, True))  # with S_dmask
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.25, False, False, *varlen, None, *options)
    torch.library.opcheck(torch.ops.flash_cute.bwd.default, (dout, q, k, v, out, lse, 0.25, False, False, *varlen, *options))
    torch.library.opcheck(torch.ops.flash_cute.bwd_into.default,
                          (dout, q, k, v, out, lse, 0.25, False, False, *varlen, *options, *grads))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_strided_cu_seqlens_and_block_table(device):
    """cu_seqlens and block_table that are strided views give the same result as dense ones."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cuda":
        require_kernel(dtype, 64, True)
        require_kernel(dtype, 64, False)
    q, k, v, cu_q, cu_k = make_varlen_qkv([3, 0, 70], [5, 2, 128], 4, 2, 64, dtype, device)
    want = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 70, 128, causal=True)
    cu_q2, cu_k2 = (torch.stack([c, c + 100], 1)[:, 0] for c in (cu_q, cu_k))
    assert not cu_q2.is_contiguous()
    got = flash_cute.flash_attn_varlen_func(q, k, v, cu_q2, cu_k2, 70, 128, causal=True)
    assert torch.equal(got, want)
    pages = torch.randn(8, 64, 2, 64, device=device).to(dtype)
    table = torch.randperm(8, device=device)[:6].view(3, 2).to(torch.int32)
    table_t = table.t().contiguous().t()  # same values, column-major
    assert not table_t.is_contiguous()
    a = flash_cute.flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 70, 128, block_table=table)
    b = flash_cute.flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 70, 128, block_table=table_t)
    assert torch.equal(a, b) and not a.isnan().any()
