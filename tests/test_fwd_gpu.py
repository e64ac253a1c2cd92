"""The CUDA forward kernels against a float32 oracle (the 2x rule), on NaN-poisoned outputs.

Cases whose kernel is not in the build (development builds restrict FLASH_CUTE_HEAD_DIMS and
FLASH_CUTE_DTYPES on purpose) are skipped with the missing kernel named.
"""

from __future__ import annotations

import pytest
import torch

import flash_cute
from helpers import (
    CAUSAL_IDS,
    DTYPES,
    DTYPE_IDS,
    DTYPE_NAMES,
    assert_2x_rule,
    assert_lse_matches,
    built_kernels,
    empty_rows,
    make_qkv,
    poison_allocator,
    require_kernel,
    require_small_smem_tiles,
    run_poisoned,
)

pytestmark = pytest.mark.cuda

HEAD_DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
SEQLENS = [(1, 1), (113, 203), (1025, 97), (2048, 2048)]
BUCKETS = [32, 64, 96, 128, 160, 192, 224, 256]


def _batch(seqlen_q, seqlen_k):
    """Batch 2, except 1 for the long (2048, 2048) case to keep memory and time small."""
    return 1 if seqlen_q * seqlen_k > 10**6 else 2


def _check(q, k, v, softmax_scale=None, causal=False):
    """Runs the kernel on poisoned memory and checks out and lse against the oracle."""
    out, lse = run_poisoned(q, k, v, softmax_scale=softmax_scale, causal=causal)
    _, ref_lse = assert_2x_rule(out, q, k, v, softmax_scale, causal)
    assert_lse_matches(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward(dtype, head_dim, seqlen_q, seqlen_k, causal):
    """Every head dim (padded routes included), both dtypes, both masks, seqlen_q != seqlen_k."""
    require_kernel(dtype, head_dim, causal)
    q, k, v = make_qkv(_batch(seqlen_q, seqlen_k), seqlen_q, seqlen_k, 4, 4, head_dim, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("nheads_k", [8, 2, 1])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", [59, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_gqa(dtype, head_dim, seqlen_q, seqlen_k, causal, nheads_k):
    """Grouped-query and multi-query attention: 8 query heads over 8, 2 or 1 KV heads."""
    require_kernel(dtype, head_dim, causal)
    q, k, v = make_qkv(_batch(seqlen_q, seqlen_k), seqlen_q, seqlen_k, 8, nheads_k, head_dim, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (1025, 97), (300, 300)])
@pytest.mark.parametrize("head_dim", [200, 224, 256])
def test_forward_small_smem_tile(monkeypatch, head_dim, seqlen_q, seqlen_k, causal):
    """The tile that GPUs with 99 KB of shared memory per block (sm_86, sm_89) run for head dims
    above 192, forced on this GPU through the kernels' testing hook."""
    require_kernel(torch.bfloat16, head_dim, causal)
    require_small_smem_tiles()
    monkeypatch.setenv("FLASH_CUTE_FORCE_SMALL_SMEM_TILE", "1")
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, head_dim, torch.bfloat16, "cuda")
    _check(q, k, v, causal=causal)


def test_small_smem_tile_hook_selects_that_kernel(monkeypatch):
    """The hook above really launches the other kernel: the profiler sees its template name."""
    require_kernel(torch.bfloat16, 256, False)
    require_small_smem_tiles()
    q, k, v = make_qkv(1, 128, 128, 2, 2, 256, torch.bfloat16, "cuda")

    def launched_kernels():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            flash_cute.flash_attn_func(q, k, v)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if "fwd_kernel" in e.name]

    default = launched_kernels()
    monkeypatch.setenv("FLASH_CUTE_FORCE_SMALL_SMEM_TILE", "1")
    small = launched_kernels()
    assert default and small, (default, small)
    assert all("256, false, false>" in name for name in default), default
    assert all("256, false, true>" in name for name in small), small


@pytest.mark.parametrize("nheads_k", [3, 1])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_batch_17_heads_3(dtype, causal, nheads_k):
    """A batch and a head count that are not powers of two (nor multiples of 8)."""
    require_kernel(dtype, 64, causal)
    q, k, v = make_qkv(17, 97, 113, 3, nheads_k, 64, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_softmax_scale(dtype):
    require_kernel(dtype, 64, False)
    q, k, v = make_qkv(2, 113, 203, 4, 2, 64, dtype, "cuda")
    _check(q, k, v, softmax_scale=0.5)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(203, 113), (1025, 97), (130, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_without_keys(dtype, head_dim, seqlen_q, seqlen_k):
    """Causal with seqlen_q > seqlen_k: rows that see no key give output 0 and lse +inf."""
    require_kernel(dtype, head_dim, True)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype, "cuda")
    out, lse = _check(q, k, v, causal=True)
    n = empty_rows(seqlen_q, seqlen_k, causal=True)
    assert torch.all(out[:, :n] == 0)
    assert torch.all(torch.isposinf(lse[:, :, :n]))
    assert torch.all(torch.isfinite(lse[:, :, n:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_no_keys(dtype):
    """seqlen_k == 0: every row is empty."""
    q, k, v = make_qkv(2, 5, 0, 4, 4, 64, dtype, "cuda")
    out, lse = run_poisoned(q, k, v)
    assert out.shape == q.shape and torch.all(out == 0)
    assert lse.shape == (2, 4, 5) and torch.all(torch.isposinf(lse))


# --------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("head_dim", [40, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_qkv(dtype, head_dim, causal):
    """q, k, v as slices of one packed (batch, seqlen, 3, heads, head_dim) tensor."""
    require_kernel(dtype, head_dim, causal)
    qkv = torch.randn(2, 203, 3, 4, head_dim, device="cuda").to(dtype)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("head_dim", [59, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_transposed_layout(dtype, head_dim, causal):
    """q, k, v stored as (batch, heads, seqlen, head_dim) and viewed as (batch, seqlen, heads, head_dim)."""
    require_kernel(dtype, head_dim, causal)
    q, k, v = (
        t.transpose(1, 2).contiguous().transpose(1, 2)
        for t in make_qkv(2, 113, 203, 4, 2, head_dim, dtype, "cuda")
    )
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_base_address(dtype):
    """Views that start one element into a buffer (not 16-byte aligned)."""
    require_kernel(dtype, 64, True)
    shapes = [(2, 113, 4, 64), (2, 203, 2, 64), (2, 203, 2, 64)]
    q, k, v = (torch.randn(s.numel() + 1, device="cuda").to(dtype)[1:].view(s) for s in map(torch.Size, shapes))
    assert q.data_ptr() % 16 != 0
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_odd_row_stride(dtype):
    """Head dim 64 sliced out of rows of 68 elements: strides that are not multiples of 8."""
    require_kernel(dtype, 64, False)
    q, k, v = (t[..., :64] for t in make_qkv(2, 113, 203, 4, 2, 68, dtype, "cuda"))
    assert q.stride(2) == 68
    _check(q, k, v)


# --------------------------------------------------------------------------------------------
# Execution


def test_poison_allocator():
    """The poisoning helper works: after it, new allocations of any size read as NaN, even with
    a cache fragmented by live tensors."""
    keep = [torch.randn(n, device="cuda") for n in (100, 70_000, 600_000, 3_000_000, 5)]
    del keep[1], keep[2]
    poison_allocator(32 << 20)
    fresh = [
        torch.empty(n, dtype=dtype, device="cuda")
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
        for n in (1, 1000, 300_000, 2_000_000)
    ]
    for t in fresh:
        assert t.isnan().all(), f"{t.dtype} allocation of {t.numel()} elements not poisoned"


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic(dtype, causal):
    """Two runs on the same input are bitwise equal."""
    require_kernel(dtype, 128, causal)
    q, k, v = make_qkv(2, 1025, 203, 4, 2, 128, dtype, "cuda")
    out1, lse1 = run_poisoned(q, k, v, causal=causal)
    out2, lse2 = run_poisoned(q, k, v, causal=causal)
    assert torch.equal(out1, out2)
    assert torch.equal(lse1, lse2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_current_stream(dtype):
    """The kernel runs on the caller's current stream: it sees inputs that a side stream
    produces after a delay, and its result is complete once that stream is synchronized."""
    require_kernel(dtype, 64, False)
    q0, k0, v0 = make_qkv(2, 113, 203, 4, 2, 64, dtype, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        poison_allocator(64 << 20)
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy (~50 ms) before the copies
        q, k, v = q0.clone(), k0.clone(), v0.clone()
        out = flash_cute.flash_attn_func(q, k, v)
    side.synchronize()
    assert_2x_rule(out, q0, k0, v0)


def test_float32_runs_reference_with_warning(monkeypatch):
    """float32 CUDA inputs take the PyTorch reference path, with a UserWarning."""
    monkeypatch.setattr(flash_cute._ops, "_warned_slow_path", False)  # the warning is issued once
    q, k, v = make_qkv(2, 113, 203, 4, 2, 59, torch.float32, "cuda")
    with pytest.warns(UserWarning, match="reference"):
        out, lse, _ = flash_cute.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    _, ref_lse = assert_2x_rule(out, q, k, v, causal=True, oracle_dtype=torch.float64)
    assert_lse_matches(lse, ref_lse, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Build contents


def test_build_info_lists_kernels():
    info = flash_cute.build_info()
    kernels = info["fwd_kernels"]
    assert len(kernels) > 0
    for name, bucket, causal in kernels:
        assert name in ("fp16", "bf16") and bucket in BUCKETS and isinstance(causal, bool)
    for key in ("cuda_archs", "head_dims", "dtypes", "cutlass"):
        assert key in info


def test_head_dim_bucket():
    """Head dims map to the smallest bucket that holds them."""
    from flash_cute import _C

    for d in range(8, 257, 8):
        assert _C.head_dim_bucket(d) == min(b for b in BUCKETS if b >= d)


def test_missing_kernel_names_build_option():
    """A (dtype, bucket, causal) this build lacks raises RuntimeError naming FLASH_CUTE_HEAD_DIMS."""
    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items() if name != "fp32"}
    missing = [
        (name, bucket, causal)
        for name in dtypes
        for bucket in BUCKETS
        for causal in (False, True)
        if (name, bucket, causal) not in built_kernels()
    ]
    if not missing:
        return  # a full build: nothing is missing (test_build_info_lists_kernels covers the list)
    name, bucket, causal = missing[0]
    q, k, v = make_qkv(1, 16, 16, 2, 2, bucket, dtypes[name], "cuda")
    with pytest.raises(RuntimeError, match="FLASH_CUTE_HEAD_DIMS"):
        flash_cute.flash_attn_func(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
def test_opcheck_cuda(causal):
    """torch.library.opcheck of the CUDA kernel path: schema, fake tensor, autograd registration."""
    require_kernel(torch.bfloat16, 64, causal)
    q, k, v = make_qkv(2, 97, 113, 4, 2, 64, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, k, v, 0.125, causal))


def test_torch_compile_cuda():
    """torch.compile(fullgraph=True) traces the op and gives the eager result bit for bit."""
    require_kernel(torch.bfloat16, 128, True)
    q, k, v = make_qkv(2, 300, 300, 4, 4, 128, torch.bfloat16, "cuda")

    def f(q, k, v):
        return flash_cute.flash_attn_func(q * 2, k, v, causal=True) + 1

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))
