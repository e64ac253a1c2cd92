"""Helpers shared by the tests: input makers, the oracle checks (the 2x rule, for outputs and for
gradients), output poisoning and the lists of kernels in the build."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import flash_cute
from flash_cute.reference import naive_attention

# Absolute slack of the 2x rule: covers the final rounding of the output when the PyTorch
# computation in the input dtype happens to be exact (e.g. seqlen_k == 1).
ROUNDING_TERM = 1e-4

# Slack of the gradients' 2x rule, relative to the largest oracle gradient (at least 1): where
# PyTorch's computation in the input dtype is exact (seqlen_k == 1: P == 1, dS == 0 exactly), its
# error is 0 and the bound would be 0, while the kernels still differ from the oracle by their
# fp32 rounding: the row sums D = rowsum(dO * O) and dP = dO V^T of d <= 256 products that cancel
# in dS = P * (dP - D), and fp32 sums over the sequence (relative error ~ sqrt(n) * 2^-24, a few
# 1e-6 for n of a few thousand). 1e-4 of the gradients' scale covers that with margin and stays
# far below one ulp of fp16 (2^-11) or bf16 (2^-8), so it hides no real error.
GRAD_ROUNDING_TERM = 1e-4

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# The GPU tests' parametrizations: the kernels' dtypes and the causal flag, with their ids.
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = [DTYPE_NAMES[t] for t in DTYPES]
CAUSAL_IDS = ["full", "causal"]


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, device="cpu"):
    """Fresh standard-normal q, k, v in flash_attn's (batch, seqlen, heads, head_dim) layout."""

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

    q = randn(batch, seqlen_q, nheads, head_dim)
    k = randn(batch, seqlen_k, nheads_k, head_dim)
    v = randn(batch, seqlen_k, nheads_k, head_dim)
    return q, k, v


def assert_2x_rule(out, q, k, v, softmax_scale=None, causal=False, oracle_dtype=torch.float32):
    """The accuracy rule: with ``ref`` the attention computed in ``oracle_dtype`` from the same
    inputs, and ``out_pt`` the same naive computation done by PyTorch in the input dtype,
    ``max|out - ref| <= 2 * max|out_pt - ref| + ROUNDING_TERM``. Returns the oracle's (out, lse)."""
    ref, ref_lse = naive_attention(q, k, v, softmax_scale, causal, dtype=oracle_dtype)
    out_pt, _ = naive_attention(q, k, v, softmax_scale, causal, dtype=q.dtype)
    assert out.shape == q.shape, f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}"
    assert out.dtype == q.dtype, f"output dtype {out.dtype}, expected {q.dtype}"
    assert out.device == q.device
    assert not out.isnan().any(), "output has NaN (an element left unwritten, or a NaN computed)"
    err = (out.to(oracle_dtype) - ref).abs().max().item()
    err_pt = (out_pt.to(oracle_dtype) - ref).abs().max().item()
    assert err <= 2 * err_pt + ROUNDING_TERM, (
        f"max error {err:.3e} exceeds 2 x PyTorch's error in {q.dtype} ({err_pt:.3e}) + {ROUNDING_TERM}"
    )
    return ref, ref_lse


def assert_lse_matches(lse, ref_lse, rtol=1e-3, atol=1e-3):
    """lse is float32 (batch, nheads, seqlen_q), +inf exactly where the oracle's is (rows that see
    no key), and close to the oracle elsewhere."""
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, expected torch.float32"
    assert lse.shape == ref_lse.shape, f"lse shape {tuple(lse.shape)}, expected {tuple(ref_lse.shape)}"
    assert not lse.isnan().any(), "lse has NaN"
    empty = torch.isposinf(ref_lse)
    assert torch.equal(torch.isposinf(lse), empty), "lse must be +inf exactly on the rows that see no key"
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), rtol=rtol, atol=atol)


def naive_grads(q, k, v, dout, softmax_scale=None, causal=False, dtype=torch.float32):
    """(dq, dk, dv) of the naive attention (the full score matrix, computed in ``dtype``) by
    torch.autograd, for the upstream gradient ``dout``. Rows that see no key get gradient 0."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, _ = naive_attention(*leaves, softmax_scale, causal, dtype=dtype)
    return torch.autograd.grad(out, leaves, dout.to(dtype))


def _assert_grads_within_2x(grads, ref, pt, inputs, oracle_dtype):
    """The 2x rule for each of dq, dk, dv given the oracle's (ref) and PyTorch's same-dtype (pt)."""
    for name, g, r, p, like in zip(("dq", "dk", "dv"), grads, ref, pt, inputs):
        assert g is not None, f"{name} is None"
        assert g.shape == like.shape, f"{name} shape {tuple(g.shape)}, expected {tuple(like.shape)}"
        assert g.dtype == like.dtype, f"{name} dtype {g.dtype}, expected {like.dtype}"
        assert g.device == like.device, f"{name} on {g.device}, expected {like.device}"
        assert not g.isnan().any(), f"{name} has NaN (an element left unwritten, or a NaN computed)"
        assert not (r.isnan().any() or p.isnan().any()), f"the naive {name} has NaN (a bug in the test)"
        if g.numel() == 0:
            continue
        err = (g.to(oracle_dtype) - r).abs().max().item()
        err_pt = (p.to(oracle_dtype) - r).abs().max().item()
        slack = GRAD_ROUNDING_TERM * max(1.0, r.abs().max().item())
        assert err <= 2 * err_pt + slack, (
            f"{name}: max error {err:.3e} exceeds 2 x PyTorch's error in {like.dtype} ({err_pt:.3e}) + {slack:.1e}"
        )


def assert_grads_2x_rule(grads, q, k, v, dout, softmax_scale=None, causal=False, oracle_dtype=torch.float32):
    """The accuracy rule for gradients: with ``ref`` the gradients of the naive attention computed
    in ``oracle_dtype`` by torch.autograd from the same inputs and ``pt`` the same done in the
    input dtype, each of dq, dk, dv satisfies
    ``max|g - ref| <= 2 * max|pt - ref| + GRAD_ROUNDING_TERM * max(1, max|ref|)``, and has q's, k's,
    v's shape, dtype and device and no NaN. Returns the oracle's (dq, dk, dv)."""
    ref = naive_grads(q, k, v, dout, softmax_scale, causal, oracle_dtype)
    pt = naive_grads(q, k, v, dout, softmax_scale, causal, q.dtype)
    _assert_grads_within_2x(grads, ref, pt, (q, k, v), oracle_dtype)
    return ref


def empty_rows(seqlen_q, seqlen_k, causal):
    """Number of leading query rows that see no key (bottom-right aligned causal mask)."""
    return max(0, seqlen_q - seqlen_k) if causal else 0


# --------------------------------------------------------------------------------------------
# GPU helpers

_SMALL_REQUEST = 1 << 20  # the caching allocator serves requests up to 1 MiB from its small pool


def _free_block_requests(device, stream):
    """Allocation sizes that take every free block the caching allocator holds for this device
    and stream (small-pool blocks are taken 1 MiB at a time; the rest goes next round)."""
    sizes = []
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] != device or seg["stream"] != stream or tuple(seg["segment_pool_id"]) != (0, 0):
            continue
        small = seg["segment_type"] == "small"
        for block in seg["blocks"]:
            if block["state"] != "inactive":
                continue
            if small:
                sizes.append(min(block["size"], _SMALL_REQUEST))
            elif block["size"] > _SMALL_REQUEST:  # a large block is reachable by large requests only
                sizes.append(block["size"])
    return sorted(sizes)


def poison_allocator(nbytes, byte=0xFF):
    """Fills the memory that the next CUDA allocations on the current stream will receive with
    NaN, so that an output element the kernel forgets to write reads as NaN (``byte=0``: zeros,
    so that a NaN in an output was written there).

    Takes every free block of PyTorch's caching allocator (exact sizes, smallest first: each
    request then lands on a block of its size) plus fresh reserves of ``nbytes`` in the large
    pool and a few MiB in the small pool, fills them with 0xFF bytes (a NaN in float16, bfloat16
    and float32 alike) and frees them again. ``nbytes`` must cover what the call allocates."""
    device = torch.cuda.current_device()
    stream = torch.cuda.current_stream().cuda_stream
    torch.cuda.synchronize()

    def alloc(n):
        return torch.empty(n, dtype=torch.uint8, device="cuda")

    held = [alloc(max(nbytes, 2 * _SMALL_REQUEST))]
    held += [alloc(_SMALL_REQUEST) for _ in range(min(nbytes // _SMALL_REQUEST, 8) + 2)]
    for _ in range(16):
        sizes = _free_block_requests(device, stream)
        if not sizes:
            break
        held += [alloc(n) for n in sizes]
    for t in held:
        t.fill_(byte)
    del held


def call_bytes(q, k, v):
    """A generous bound on what one flash_attn_func call allocates on the device (padded copies,
    alignment copies, the output and the lse)."""
    b, sq, h, _ = q.shape
    return 8 * (q.nbytes + k.nbytes + v.nbytes) + 8 * b * h * sq + _SMALL_REQUEST


def run_poisoned(q, k, v, **kwargs):
    """flash_attn_func(q, k, v, **kwargs) on NaN-poisoned memory. Returns (out, lse)."""
    poison_allocator(call_bytes(q, k, v))
    out, lse, s_dmask = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    assert s_dmask.numel() == 0
    return out, lse


def bwd_call_bytes(q, k, v):
    """A generous bound on what one backward pass allocates on the device: the gradients, the fp32
    dQ accumulator (rows padded to a whole tile of at most 128, columns to a head-dim bucket of
    at most 256), the nheads-sized dK/dV of the "expand" GQA reduction, padded and aligned
    copies, and the per-row vectors."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    d_pad = -(-d // 8) * 8
    per_q = b * sq * h * d_pad * q.element_size()
    per_kv_head = b * sk * h * d_pad * q.element_size()  # k-sized, but with nheads heads
    dq_accum = b * h * (sq + 128) * 256 * 4
    return 16 * (per_q + per_kv_head) + 2 * dq_accum + 16 * b * h * sq + _SMALL_REQUEST


def run_backward(q, k, v, dout, poison=True, **kwargs):
    """flash_attn_func(q, k, v, **kwargs) on leaves that share q's, k's, v's memory and layout,
    then torch.autograd.grad with upstream gradient ``dout``; with ``poison``, the memory the
    backward pass allocates is NaN-poisoned first. Returns (out, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _, _ = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    if poison:
        poison_allocator(bwd_call_bytes(q, k, v))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), dq, dk, dv


@functools.cache
def capture_cuda_graph(step, warmups=1):
    """(graph, result): step() captured in a CUDA graph after `warmups` calls on a side stream
    (lazy initialisation, allocator pools and autograd's first-call work stay out of the capture);
    result: the captured call's return value, whose tensors every replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


def built_kernels():
    """{(dtype name, head-dim bucket, causal)} of the forward kernels in this build."""
    from flash_cute import _C

    return frozenset(tuple(entry) for entry in _C.built_fwd_kernels())


def require_kernel(dtype, head_dim, causal):
    """Skips the test, naming the kernel, when this build lacks the kernel for the case
    (development builds restrict FLASH_CUTE_HEAD_DIMS / FLASH_CUTE_DTYPES on purpose)."""
    from flash_cute import _C

    bucket = _C.head_dim_bucket(-(-head_dim // 8) * 8)  # the API pads head dims to a multiple of 8
    kernel = (DTYPE_NAMES[dtype], bucket, bool(causal))
    if kernel not in built_kernels():
        pytest.skip(f"this build has no forward kernel {kernel} (dtype, head-dim bucket, causal)")


@functools.cache
def built_bwd_kernels():
    """{(dtype name, head-dim bucket)} of the backward kernels in this build (the backward kernel
    is not specialised on causal)."""
    from flash_cute import _C

    if not hasattr(_C, "built_bwd_kernels"):
        pytest.fail("flash_cute._C has no built_bwd_kernels: the extension predates the backward pass; rebuild it",
                    pytrace=False)
    return frozenset(tuple(entry) for entry in _C.built_bwd_kernels())


def require_small_smem_tiles():
    """Skips the test, naming the build option, in a build made without the tiles for GPUs with
    99 KB of shared memory per block (FLASH_CUTE_SMALL_SMEM_TILES=OFF)."""
    if flash_cute.build_info().get("small_smem_tiles", "ON") != "ON":
        pytest.skip("this build has no small-shared-memory tiles: FLASH_CUTE_SMALL_SMEM_TILES=OFF")


def require_bwd_kernel(dtype, head_dim, causal=None):
    """Skips the test, naming the kernel, when this build lacks the backward kernel for the case;
    with ``causal`` given, also the forward kernel that the test runs first (require_kernel)."""
    from flash_cute import _C

    if causal is not None:
        require_kernel(dtype, head_dim, causal)
    bucket = _C.head_dim_bucket(-(-head_dim // 8) * 8)
    kernel = (DTYPE_NAMES[dtype], bucket)
    if kernel not in built_bwd_kernels():
        pytest.skip(f"this build has no backward kernel {kernel} (dtype, head-dim bucket)")


# --------------------------------------------------------------------------------------------
# Variable-length batches (flash_attn_varlen_func's layout: sequences concatenated along the
# first dimension, delimited by int32 cumulative lengths)


def cu_seqlens_of(lengths, device="cpu"):
    """int32 (len(lengths) + 1) cumulative lengths, starting at 0."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if len(lengths):
        cu[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu.to(device)


def seq_slices(cu_seqlens):
    """[slice(start, end)] of each sequence of a cu_seqlens tensor."""
    cu = cu_seqlens.tolist()
    return [slice(a, b) for a, b in zip(cu[:-1], cu[1:])]


def make_varlen_qkv(lens_q, lens_k, nheads, nheads_k, head_dim, dtype, device="cpu"):
    """Fresh standard-normal q (total_q, nheads, d), k and v (total_k, nheads_k, d) for sequences
    of the given lengths, with their cu_seqlens_q and cu_seqlens_k (int32, on ``device``)."""

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

    q = randn(sum(lens_q), nheads, head_dim)
    k = randn(sum(lens_k), nheads_k, head_dim)
    v = randn(sum(lens_k), nheads_k, head_dim)
    return q, k, v, cu_seqlens_of(lens_q, device), cu_seqlens_of(lens_k, device)


def varlen_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False, dtype=torch.float32):
    """The naive attention of each sequence alone (computed in ``dtype``), concatenated: out
    (total_q, nheads, d) and lse (nheads, total_q). A sequence with no key gives out 0, lse +inf."""
    outs, lses = [], []
    for sq, sk in zip(seq_slices(cu_seqlens_q), seq_slices(cu_seqlens_k)):
        qs, ks, vs = q[sq].unsqueeze(0), k[sk].unsqueeze(0), v[sk].unsqueeze(0)
        if qs.shape[1] == 0 or ks.shape[1] == 0:
            outs.append(torch.zeros(qs.shape[1:], dtype=dtype, device=q.device))
            lses.append(torch.full((q.shape[1], qs.shape[1]), float("inf"), dtype=dtype, device=q.device))
            continue
        out, lse = naive_attention(qs, ks, vs, softmax_scale, causal, dtype=dtype)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def varlen_naive_grads(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                       dtype=torch.float32):
    """naive_grads of each sequence alone, concatenated: (dq, dk, dv) in ``dtype``, shaped like
    q, k, v. A sequence with no query or no key gets zero gradients."""
    dqs, dks, dvs = [], [], []
    for sq, sk in zip(seq_slices(cu_seqlens_q), seq_slices(cu_seqlens_k)):
        qs, ks, vs = q[sq].unsqueeze(0), k[sk].unsqueeze(0), v[sk].unsqueeze(0)
        if qs.shape[1] == 0 or ks.shape[1] == 0:
            grads = [torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (qs, ks, vs)]
        else:
            grads = naive_grads(qs, ks, vs, dout[sq].unsqueeze(0), softmax_scale, causal, dtype)
        for acc, g in zip((dqs, dks, dvs), grads):
            acc.append(g[0])
    return torch.cat(dqs, dim=0), torch.cat(dks, dim=0), torch.cat(dvs, dim=0)


def assert_varlen_2x_rule(out, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                          oracle_dtype=torch.float32):
    """assert_2x_rule for a variable-length batch: the oracle and PyTorch's same-dtype computation
    are done per sequence and concatenated; the maxima are over the whole batch. Returns the
    oracle's (out (total_q, nheads, d), lse (nheads, total_q))."""
    ref, ref_lse = varlen_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, oracle_dtype)
    out_pt, _ = varlen_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, q.dtype)
    assert out.shape == q.shape, f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}"
    assert out.dtype == q.dtype, f"output dtype {out.dtype}, expected {q.dtype}"
    assert out.device == q.device
    assert not out.isnan().any(), "output has NaN (an element left unwritten, or a NaN computed)"
    if out.numel() == 0:
        return ref, ref_lse
    err = (out.to(oracle_dtype) - ref).abs().max().item()
    err_pt = (out_pt.to(oracle_dtype) - ref).abs().max().item()
    assert err <= 2 * err_pt + ROUNDING_TERM, (
        f"max error {err:.3e} exceeds 2 x PyTorch's error in {q.dtype} ({err_pt:.3e}) + {ROUNDING_TERM}"
    )
    return ref, ref_lse


def assert_varlen_grads_2x_rule(grads, q, k, v, dout, cu_seqlens_q, cu_seqlens_k, softmax_scale=None,
                                causal=False, oracle_dtype=torch.float32):
    """assert_grads_2x_rule for a variable-length batch (per-sequence oracles, concatenated; the
    maxima are over the whole batch). Returns the oracle's (dq, dk, dv)."""
    ref = varlen_naive_grads(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, oracle_dtype)
    pt = varlen_naive_grads(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, q.dtype)
    _assert_grads_within_2x(grads, ref, pt, (q, k, v), oracle_dtype)
    return ref


def assert_close_to_rounding(got, want, name="tensor", scale_rtol=1e-5):
    """``got`` equals ``want`` up to the last rounding to their dtype: the same computation done in
    another order or tiling (float32 sums that differ in their last bits, then rounded to
    float16/bfloat16 on either side of a rounding boundary). Elementwise
    ``|got - want| <= eps(dtype) * |want| + scale_rtol * max(1, max|want|)`` (eps = 1e-5 for
    float32), the same shape and dtype, and NaN/inf exactly where ``want`` has them."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN where the expected value has none (or the reverse)"
    assert torch.equal(got.isinf(), want.isinf()), f"{name}: inf where the expected value has none (or the reverse)"
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()]), f"{name}: infinities differ"
    if not finite.any():
        return
    a, b = got[finite].double(), want[finite].double()
    eps = 1e-5 if want.dtype == torch.float32 else torch.finfo(want.dtype).eps
    tol = eps * b.abs() + scale_rtol * max(1.0, b.abs().max().item())
    bad = (a - b).abs() > tol
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ beyond rounding; "
        f"max difference {(a - b).abs().max().item():.3e}"
    )


def varlen_call_bytes(q, k, v, batch, max_seqlen_q):
    """A generous bound on what one varlen forward or backward call allocates on the device
    (padded and aligned copies, the output and gradients, an fp32 dQ accumulator padded per
    sequence or to (batch, max_seqlen_q), the per-row vectors)."""
    total_q, h, _ = q.shape
    padded_rows = total_q + 128 * batch + batch * (max_seqlen_q + 128)
    dq_accum = padded_rows * h * 256 * 4
    per_kv_head = k.nbytes // max(1, k.shape[-2]) * h  # k-sized (paged caches too), with nheads heads
    return 16 * (q.nbytes + k.nbytes + v.nbytes + per_kv_head) + 2 * dq_accum + 16 * h * padded_rows + _SMALL_REQUEST


# --------------------------------------------------------------------------------------------
# softcap, local windows and ALiBi


def options_oracle(q, k, v, scale, causal, softcap, window, alibi, keep=None, dropout_p=0.0):
    """Direct attention with flash_attn's option semantics, in q's dtype (float64 for an oracle);
    differentiable. Returns (out, lse) with lse +inf and out 0 on rows that see no key. keep:
    dropout's keep mask (batch, nheads, seqlen_q, seqlen_k), kept probabilities / (1 - dropout_p)."""
    batch, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    kk, vv = (t.repeat_interleave(h // hk, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device).unsqueeze(1)
    j = torch.arange(sk, device=q.device).unsqueeze(0)
    diag = sk - sq
    if alibi is not None:
        s = s - alibi.reshape(-1, h).to(s.dtype)[:, :, None, None] * (i + diag - j).abs()
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    left, right = window
    if causal:
        visible &= j <= i + diag
    if left >= 0:
        visible &= j >= i + diag - left
    if right >= 0:
        visible &= j <= i + diag + right
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    probs = p / l.clamp_min(1e-300)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vv)
    lse = torch.where(l.squeeze(-1) > 0, (m + l.clamp_min(1e-300).log()).squeeze(-1), torch.full_like(m.squeeze(-1), math.inf))
    return out, lse
