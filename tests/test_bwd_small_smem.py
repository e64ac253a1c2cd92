"""The backward's small-shared-memory tiles: what GPUs with 99 KB of shared memory per block
(sm_86, sm_89, sm_120: RTX 30x0 / 40x0 / 50x0, A10, L4, L40) run where the default backward tile
needs more (every head dim: d256 with V in registers, and d224 on d256's).

The kernels' testing hook FLASH_CUTE_FORCE_SMALL_SMEM_TILE makes an H100 run them, so these tests
cover them on any GPU. Every check is against the float32 oracle with the 2x rule of the other
GPU tests (the gradients on NaN-poisoned memory): the plain kernel over awkward shapes, GQA, the
deterministic mode, varlen, flash_attn's options and dropout (its keep mask decoded from the
forward's S_dmask, so the small tile must draw exactly the forward's random numbers).
"""

from __future__ import annotations

import pytest
import torch

import flash_cute
from helpers import (
    CAUSAL_IDS,
    DTYPES,
    DTYPE_IDS,
    assert_grads_2x_rule,
    built_bwd_kernels,
    make_qkv,
    require_bwd_kernel,
    require_kernel,
    require_small_smem_tiles,
    run_backward,
)
from test_options_kernels import (
    ALL,
    ALL_CAUSAL,
    DROPOUT_P,
    LENS_Q,
    NHEADS,
    NHEADS_K,
    VARLEN_ORACLE,
    _check_dropout,
    _check_forward_and_backward,
    _compare,
    _keep_mask,
    _opt,
    _randn,
    _require,
    _run,
    _varlen_inputs,
)

pytestmark = pytest.mark.cuda

# Head dims whose bucket has a small tile: all (59, 111, 152, 200, 248: padded routes of the d64,
# d128, d160, d224 and d256 buckets; d224's run on d256's tile).
SMALL_TILE_DIMS = [32, 59, 64, 96, 111, 128, 152, 160, 192, 200, 224, 248, 256]
BUCKETS_WITH_SMALL_TILE = {32, 64, 96, 128, 160, 192, 224, 256}
SEQLENS = [(1, 1), (97, 113), (113, 97), (300, 300), (1025, 97)]


@pytest.fixture(autouse=True)
def small_tile(monkeypatch):
    """Every test of this file runs the small-shared-memory tiles (skipped, naming the option, in a
    build made without them)."""
    if torch.cuda.is_available():
        require_small_smem_tiles()
    monkeypatch.setenv("FLASH_CUTE_FORCE_SMALL_SMEM_TILE", "1")


def _check(q, k, v, causal=False, deterministic=False):
    dout = _randn(q.shape, q.dtype)
    _, dq, dk, dv = run_backward(q, k, v, dout, causal=causal, deterministic=deterministic)
    assert_grads_2x_rule((dq, dk, dv), q, k, v, dout, None, causal)
    return dq, dk, dv


def test_hook_picks_the_small_tile(monkeypatch):
    """bwd_tile(d, device) reports the tile that runs (and pads the workspace): under the hook the
    small one, no larger than the default (d160's differs in its buffers only), with the kernel's
    head dim (d224's small tile is d256's); without the hook the GPU's limit decides; and the
    kernel launched is the small tile's (its traits' kSmallSmem in the profiler's name) for every
    bucket this build has."""
    from flash_cute import _C

    device = torch.cuda.current_device()
    kernel_dims = {}  # bucket -> the head dim of its small kernel, checked here
    for bucket in BUCKETS_WITH_SMALL_TILE:
        small, default = _C.bwd_tile(bucket, device), _C.bwd_tile(bucket)
        kernel_dims[bucket] = small[3]
        assert small[0] <= default[0] and small[1] <= default[1] and (small != default or bucket == 160), (
            bucket, small, default)
        assert default[3] == bucket and small[3] == (256 if bucket == 224 else bucket), (bucket, small, default)

    def launched_kernels(d):
        q, k, v = make_qkv(1, 128, 128, 2, 2, d, torch.bfloat16, "cuda")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_backward(q, k, v, torch.randn_like(q), poison=False)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if "bwd_kernel" in e.name]

    built = [b for b in sorted(BUCKETS_WITH_SMALL_TILE) if ("bf16", b) in built_bwd_kernels()]
    assert built, "this build has no bf16 backward kernel"
    for bucket in built:
        require_kernel(torch.bfloat16, bucket, causal=False)
        names = launched_kernels(bucket)
        assert names and all(f"{kernel_dims[bucket]}, true>" in name for name in names), (bucket, names)

    monkeypatch.delenv("FLASH_CUTE_FORCE_SMALL_SMEM_TILE")
    # Without the hook the GPU's limit decides: d128's default tile takes 164,864 bytes (A100,
    # H100: the default; sm_86, sm_89: the small tile).
    default_fits = torch.cuda.get_device_properties(device).shared_memory_per_block_optin >= 164864
    assert (_C.bwd_tile(128, device) == _C.bwd_tile(128)) == default_fits
    if ("bf16", 128) not in built_bwd_kernels():
        pytest.skip("this build has no bf16 d128 backward kernel (FLASH_CUTE_HEAD_DIMS)")
    names = launched_kernels(128)
    assert names and all(("128, false>" if default_fits else "128, true>") in name for name in names), names


def test_d224_runs_d256_small_tile():
    """On the small tiles, head dims of the d224 bucket run d256's kernel (the profiler's name;
    its dQ accumulator has the 256 columns that bwd_tile reports), with gradients that pass the
    2x rule."""
    require_bwd_kernel(torch.bfloat16, 224, causal=False)
    q, k, v = make_qkv(1, 130, 100, 2, 2, 216, torch.bfloat16, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _check(q, k, v)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "bwd_kernel" in e.name]
    assert names and all("256, true>" in name for name in names), names


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", SMALL_TILE_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_small_tile(dtype, head_dim, seqlen_q, seqlen_k, causal):
    """Each small tile, both dtypes, both masks, partial blocks on both sides, GQA (4 over 2)."""
    require_bwd_kernel(dtype, head_dim, causal)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_deterministic_small_tile(head_dim, causal):
    """deterministic=True with the small tiles' query blocks (their own dQ semaphores): the 2x
    rule, and two runs bitwise equal on 2048 keys (32 key blocks adding into each dQ row)."""
    dtype = torch.bfloat16
    require_bwd_kernel(dtype, head_dim, causal)
    q, k, v = make_qkv(2, 97, 1025, 4, 2, head_dim, dtype, "cuda")
    _check(q, k, v, causal=causal, deterministic=True)
    q, k, v = make_qkv(1, 2048, 2048, 4, 2, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    first = run_backward(q, k, v, dout, causal=causal, deterministic=True)[1:]
    second = run_backward(q, k, v, dout, causal=causal, deterministic=True)[1:]
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert not a.isnan().any(), f"{name} has NaN"
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


OPTIONS = [
    _opt("plain"),
    _opt("window", window=(37, 11)),
    _opt("softcap", softcap=5.0),
    _opt("alibi_batch_causal", causal=True, alibi="batch"),
    ALL_CAUSAL,
    ALL,
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 192, 224, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_options_small_tile(dtype, head_dim, opts):
    """flash_attn's options in the small tiles' kernels (softcap computes P inside the GEMMs on
    the unmasked tiles of 2 x 64 keys or more), forward and gradients against the oracle."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, 257, 300, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    _check_forward_and_backward(q, k, v, _randn(q.shape, dtype), opts, head_dim)


@pytest.mark.parametrize("opts", [_opt("plain"), ALL_CAUSAL])
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_varlen_small_tile(head_dim, opts):
    """flash_attn_varlen_func: sequences with no query, no key, single rows and a long one, each
    padded to the small tile's query blocks in the workspace."""
    dtype = torch.bfloat16
    _require(dtype, head_dim, backward=True)
    q, k, v, varlen, dout = _varlen_inputs(head_dim, dtype)
    slopes = opts.slopes(len(LENS_Q))
    out, lse, _, grads = _run(flash_cute.flash_attn_varlen_func, (q, k, v), *varlen, dout=dout,
                              **opts.kernel_kwargs(slopes))
    _compare(out, lse, grads, q, k, v, dout, attend=VARLEN_ORACLE, **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("opts", [_opt("plain"), _opt("causal", causal=True), ALL])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 224, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_small_tile(dtype, head_dim, opts):
    """Dropout: the small tile's backward draws the forward's random numbers (its keep mask, read
    from S_dmask, makes the oracle of the gradients), alone and with every option."""
    _require(dtype, head_dim, backward=True)
    seqlen_q, seqlen_k = 257, 300
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    slopes = opts.slopes(2)

    def keep_of(s_dmask):
        return _keep_mask(s_dmask, 2, NHEADS, seqlen_q, seqlen_k, dtype)

    _check_dropout(flash_cute.flash_attn_func, (q, k, v), (), _randn(q.shape, dtype), DROPOUT_P, keep_of,
                   opts.kernel_kwargs(slopes), **opts.oracle_kwargs(slopes, head_dim))
