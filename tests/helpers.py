"""Helpers shared by the tests: input makers, the oracle checks (the 2x rule), output poisoning
and the list of kernels in the build."""

from __future__ import annotations

import functools

import pytest
import torch

import flash_cute
from flash_cute.reference import naive_attention

# Absolute slack of the 2x rule: covers the final rounding of the output when the PyTorch
# computation in the input dtype happens to be exact (e.g. seqlen_k == 1).
ROUNDING_TERM = 1e-4

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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


def poison_allocator(nbytes):
    """Fills the memory that the next CUDA allocations on the current stream will receive with
    NaN, so that an output element the kernel forgets to write reads as NaN.

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
        t.fill_(0xFF)
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


@functools.cache
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
