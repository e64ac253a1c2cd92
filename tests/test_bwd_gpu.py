"""The CUDA backward kernels against a float32 oracle: gradients of the naive attention by
torch.autograd (the 2x rule of helpers.assert_grads_2x_rule), computed on NaN-poisoned memory so
that a gradient element the kernels leave unwritten shows up.

Cases whose kernels are not in the build (development builds restrict FLASH_CUTE_HEAD_DIMS and
FLASH_CUTE_DTYPES on purpose) are skipped with the missing kernel named. The oracle materialises
(seqlen_q, seqlen_k) matrices in float32, so the shapes it checks stay small; the one long shape
(the deterministic mode's bitwise check) is not compared with the oracle.
"""

from __future__ import annotations

import pytest
import torch

import flash_cute
from flash_cute import _ops
from helpers import (
    CAUSAL_IDS,
    DTYPES,
    DTYPE_IDS,
    DTYPE_NAMES,
    assert_grads_2x_rule,
    built_bwd_kernels,
    built_kernels,
    bwd_call_bytes,
    empty_rows,
    make_qkv,
    poison_allocator,
    require_bwd_kernel,
    run_backward,
)

pytestmark = pytest.mark.cuda

HEAD_DIMS = [40, 59, 64, 96, 111, 128, 160, 192, 224, 256]  # 40, 59, 111: padded routes
SEQLENS = [(1, 1), (97, 113), (113, 97), (512, 1025), (1025, 97)]
BUCKETS = [32, 64, 96, 128, 160, 192, 224, 256]


def make_dout(shape, dtype):
    return torch.randn(shape, device="cuda").to(dtype)


def _check(q, k, v, dout=None, softmax_scale=None, causal=False, deterministic=False):
    """The backward pass on poisoned memory, checked with the 2x rule. Returns (dq, dk, dv)."""
    if dout is None:
        dout = make_dout(q.shape, q.dtype)
    _, dq, dk, dv = run_backward(q, k, v, dout, softmax_scale=softmax_scale, causal=causal, deterministic=deterministic)
    assert_grads_2x_rule((dq, dk, dv), q, k, v, dout, softmax_scale, causal)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward(dtype, head_dim, seqlen_q, seqlen_k, causal):
    """Every head-dim bucket (padded head dims included), both dtypes, both masks, seqlen_q !=
    seqlen_k in both directions, partial blocks on both sides."""
    require_bwd_kernel(dtype, head_dim, causal)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 4, head_dim, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("nheads_k", [8, 2, 1], ids=["group1", "group4", "group8"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(300, 300), (113, 97), (1025, 97)])
@pytest.mark.parametrize("head_dim", [59, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_gqa(dtype, head_dim, seqlen_q, seqlen_k, causal, nheads_k):
    """Grouped-query and multi-query attention: 8 query heads over 8, 2 or 1 KV heads; dK and dV
    sum over the query heads of their group (the default in-kernel reduction)."""
    require_bwd_kernel(dtype, head_dim, causal)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 8, nheads_k, head_dim, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("nheads_k", [3, 1])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_batch_17_heads_3(dtype, causal, nheads_k):
    """A batch and a head count that are not powers of two (nor multiples of 8)."""
    require_bwd_kernel(dtype, 64, causal)
    q, k, v = make_qkv(17, 97, 113, 3, nheads_k, 64, dtype, "cuda")
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_softmax_scale(dtype):
    """A softmax_scale other than 1/sqrt(d): it scales dS into dQ and dK."""
    require_bwd_kernel(dtype, 64, True)
    q, k, v = make_qkv(2, 113, 203, 4, 2, 64, dtype, "cuda")
    _check(q, k, v, softmax_scale=0.5, causal=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(203, 113), (1025, 97), (130, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_rows_without_keys(dtype, head_dim, seqlen_q, seqlen_k):
    """Causal with seqlen_q > seqlen_k: the leading rows see no key (lse +inf); their dq is
    exactly 0, they add nothing to dk and dv, and nothing is NaN."""
    require_bwd_kernel(dtype, head_dim, True)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, head_dim, dtype, "cuda")
    dq, dk, dv = _check(q, k, v, causal=True)
    n = empty_rows(seqlen_q, seqlen_k, causal=True)
    assert n > 0
    assert torch.all(dq[:, :n] == 0), "dq of rows that see no key must be exactly 0"
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_no_keys(dtype):
    """seqlen_k == 0: the output is 0 whatever q is, so dq is 0; dk and dv are empty."""
    q, k, v = make_qkv(2, 5, 0, 4, 4, 64, dtype, "cuda")
    dout = make_dout(q.shape, dtype)
    _, dq, dk, dv = run_backward(q, k, v, dout)
    assert dq.shape == q.shape and torch.all(dq == 0)
    assert dk.shape == k.shape and dv.shape == v.shape


# --------------------------------------------------------------------------------------------
# Layouts


def _dout_in_layout(layout, shape, dtype):
    b, s, h, d = shape
    if layout == "transposed":  # stored (batch, heads, seqlen, d), viewed as (batch, seqlen, heads, d)
        dout = make_dout((b, h, s, d), dtype).transpose(1, 2)
        assert not dout.is_contiguous() and dout.stride(-1) == 1
    elif layout == "last_dim_stride_2":  # every other element of rows of 2 d
        dout = make_dout((b, s, h, 2 * d), dtype)[..., ::2]
        assert dout.stride(-1) == 2
    else:  # "broadcast": one row expanded to every (batch, seqlen, head), strides 0
        dout = make_dout((1, 1, 1, d), dtype).expand(b, s, h, d)
        assert dout.stride()[:3] == (0, 0, 0)
    assert dout.shape == shape
    return dout


@pytest.mark.parametrize("layout", ["transposed", "last_dim_stride_2", "broadcast"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_dout_layouts(dtype, causal, layout):
    """An upstream gradient that is not contiguous, through autograd and given to
    flash_cute::bwd directly (so that the op itself sees the layout)."""
    require_bwd_kernel(dtype, 64, causal)
    q, k, v = make_qkv(2, 113, 203, 4, 2, 64, dtype, "cuda")
    dout = _dout_in_layout(layout, q.shape, dtype)
    _check(q, k, v, dout, causal=causal)

    scale = 64**-0.5
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, scale, causal)
    poison_allocator(bwd_call_bytes(q, k, v))
    grads = torch.ops.flash_cute.bwd(dout, q, k, v, out, lse, scale, causal, False)
    assert_grads_2x_rule(grads, q, k, v, dout, scale, causal)


def _inputs_in_layout(layout, dtype, head_dim):
    if layout == "packed":  # slices of one (batch, seqlen, 3, heads, d) tensor
        q, k, v = torch.randn(2, 203, 3, 4, head_dim, device="cuda").to(dtype).unbind(dim=2)
        assert not q.is_contiguous()
    elif layout == "transposed":  # stored (batch, heads, seqlen, d)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
                   for t in make_qkv(2, 113, 203, 4, 2, head_dim, dtype, "cuda"))
        assert not q.is_contiguous() and q.stride(-1) == 1
    elif layout == "misaligned":  # views one element into their buffers (not 16-byte aligned)
        shapes = [(2, 113, 4, head_dim), (2, 203, 2, head_dim), (2, 203, 2, head_dim)]
        q, k, v = (torch.randn(s.numel() + 1, device="cuda").to(dtype)[1:].view(s)
                   for s in map(torch.Size, shapes))
        assert q.data_ptr() % 16 != 0
    else:  # "odd_row_stride": d sliced out of rows of d + 4 elements
        q, k, v = (t[..., :head_dim] for t in make_qkv(2, 113, 203, 4, 2, head_dim + 4, dtype, "cuda"))
        assert q.stride(2) == head_dim + 4
    return q, k, v


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("layout", ["packed", "transposed", "misaligned", "odd_row_stride"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_input_layouts(dtype, layout, causal):
    """q, k, v that are views with other strides: the gradients still come back with their
    shapes and the right values."""
    require_bwd_kernel(dtype, 64, causal)
    q, k, v = _inputs_in_layout(layout, dtype, 64)
    _check(q, k, v, causal=causal)


# --------------------------------------------------------------------------------------------
# Deterministic mode and the GQA reductions


@pytest.mark.parametrize("nheads,nheads_k", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_bitwise(dtype, causal, nheads, nheads_k):
    """deterministic=True: two backward passes are bitwise equal, on a shape where the fp32
    atomics into dQ (one addition per key block: 2048 keys) would otherwise add in any order."""
    require_bwd_kernel(dtype, 128, causal)
    q, k, v = make_qkv(2, 2048, 2048, nheads, nheads_k, 128, dtype, "cuda")
    dout = make_dout(q.shape, dtype)
    first = run_backward(q, k, v, dout, causal=causal, deterministic=True)[1:]
    second = run_backward(q, k, v, dout, causal=causal, deterministic=True)[1:]
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert not a.isnan().any(), f"{name} has NaN"
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_flag_accuracy(dtype, causal, deterministic):
    """Both ways of accumulating dQ (fp32 atomics, and ordered accumulation) meet the 2x rule,
    with many key blocks adding into each dQ row."""
    require_bwd_kernel(dtype, 128, causal)
    q, k, v = make_qkv(2, 97, 1025, 4, 2, 128, dtype, "cuda")
    _check(q, k, v, causal=causal, deterministic=deterministic)


def _grads_with_reduction(monkeypatch, reduction, q, k, v, dout, **kwargs):
    monkeypatch.setattr(_ops, "GQA_BWD_REDUCTION", reduction)
    return run_backward(q, k, v, dout, **kwargs)[1:]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("nheads_k", [2, 1], ids=["group4", "group8"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gqa_reductions(monkeypatch, dtype, causal, nheads_k, deterministic):
    """The two GQA reductions of dK and dV ("in_kernel": one CTA per KV head sums its query
    heads in registers; "expand": nheads-sized dK/dV summed afterwards) both meet the 2x rule and
    agree: dK and dV within a few rounding steps of the dtype (expand rounds each query head's
    share before summing), dQ (computed the same way by both) bitwise in deterministic mode."""
    require_bwd_kernel(dtype, 64, causal)
    q, k, v = make_qkv(2, 203, 301, 8, nheads_k, 64, dtype, "cuda")
    dout = make_dout(q.shape, dtype)
    kwargs = dict(causal=causal, deterministic=deterministic)
    in_kernel = _grads_with_reduction(monkeypatch, "in_kernel", q, k, v, dout, **kwargs)
    ref = assert_grads_2x_rule(in_kernel, q, k, v, dout, causal=causal)
    expand = _grads_with_reduction(monkeypatch, "expand", q, k, v, dout, **kwargs)
    assert_grads_2x_rule(expand, q, k, v, dout, causal=causal)

    groups = 8 // nheads_k
    eps = torch.finfo(dtype).eps  # one ulp at 1.0
    for name, a, b, r in zip(("dq", "dk", "dv"), in_kernel, expand, ref):
        diff = (a.float() - b.float()).abs().max().item()
        bound = groups * eps * r.abs().max().item() + 1e-4
        assert diff <= bound, f"{name}: in_kernel and expand differ by {diff:.3e} (bound {bound:.3e})"
    if deterministic:
        assert torch.equal(in_kernel[0], expand[0]), "dq differs between the GQA reductions"


def test_gqa_expand_allocates_head_sized_buffers(monkeypatch):
    """The switch really selects the other reduction: "expand" allocates two nheads-sized dK/dV
    buffers more than "in_kernel" during the backward pass."""
    require_bwd_kernel(torch.bfloat16, 128, False)
    q, k, v = make_qkv(2, 1024, 1024, 8, 1, 128, torch.bfloat16, "cuda")
    dout = make_dout(q.shape, q.dtype)
    buffer_bytes = 2 * 1024 * 8 * 128 * 2  # (batch, seqlen_k, nheads, d) in bf16

    def backward_peak(reduction):
        monkeypatch.setattr(_ops, "GQA_BWD_REDUCTION", reduction)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = flash_cute.flash_attn_func(qq, kk, vv)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = torch.autograd.grad(out, (qq, kk, vv), dout)
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - before

    in_kernel, expand = backward_peak("in_kernel"), backward_peak("expand")
    assert expand - in_kernel >= 1.9 * buffer_bytes, (in_kernel, expand, buffer_bytes)


# --------------------------------------------------------------------------------------------
# torch.library and torch.compile


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
def test_opcheck_bwd_cuda(causal, deterministic):
    """torch.library.opcheck of flash_cute::bwd on the CUDA kernel path: schema, fake tensor
    (shapes, strides, dtypes), autograd registration and AOT dispatch."""
    require_bwd_kernel(torch.bfloat16, 64, causal)
    q, k, v = make_qkv(2, 97, 113, 4, 2, 64, torch.bfloat16, "cuda")
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.125, causal)
    dout = make_dout(q.shape, q.dtype)
    torch.library.opcheck(torch.ops.flash_cute.bwd.default, (dout, q, k, v, out, lse, 0.125, causal, deterministic))


def test_opcheck_bwd_cuda_strided_inputs():
    """The fake implementation must give the gradients the strides the real one gives them, also
    for q, k, v that are transposed views (else torch.compile plans with wrong strides)."""
    require_bwd_kernel(torch.bfloat16, 64, True)
    q, k, v = _inputs_in_layout("transposed", torch.bfloat16, 64)
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.125, True)
    dout = make_dout(q.shape, q.dtype)
    torch.library.opcheck(torch.ops.flash_cute.bwd.default, (dout, q, k, v, out, lse, 0.125, True, False))


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,layout", [(128, "contiguous"), (59, "contiguous"), (128, "transposed")])
def test_torch_compile_forward_backward(head_dim, layout):
    """torch.compile(fullgraph=True) of a function computing a loss through flash_attn_func;
    .backward() on its result gives the eager gradients (deterministic mode: the same dQ order)
    within rounding."""
    dtype = torch.bfloat16
    require_bwd_kernel(dtype, head_dim, True)
    q0, k0, v0 = make_qkv(2, 300, 300, 4, 2, head_dim, dtype, "cuda")
    if layout == "transposed":
        q0, k0, v0 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q0, k0, v0))
    dout = make_dout(q0.shape, dtype)

    def loss_fn(q, k, v, dout):
        out = flash_cute.flash_attn_func(q * 2, k, v, causal=True, deterministic=True)
        return (out.float() * dout.float()).sum()

    def grads(fn):
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
        loss = fn(q, k, v, dout)
        loss.backward()
        return loss.detach(), q.grad, k.grad, v.grad

    torch._dynamo.reset()
    compiled = grads(torch.compile(loss_fn, fullgraph=True))
    eager = grads(loss_fn)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-3)
    for name, c, e in zip(("dq", "dk", "dv"), compiled[1:], eager[1:]):
        assert c.shape == e.shape and c.dtype == e.dtype, name
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# Other paths and the build


def test_float32_backward_runs_reference(monkeypatch):
    """float32 CUDA inputs take the PyTorch reference path for the backward pass too."""
    monkeypatch.setattr(_ops, "_warned_slow_path", False)
    q, k, v = make_qkv(2, 113, 203, 4, 2, 59, torch.float32, "cuda")
    dout = make_dout(q.shape, torch.float32)
    with pytest.warns(UserWarning, match="reference"):
        _, dq, dk, dv = run_backward(q, k, v, dout, poison=False, causal=True)
    assert_grads_2x_rule((dq, dk, dv), q, k, v, dout, causal=True, oracle_dtype=torch.float64)


def test_build_lists_bwd_kernels():
    """built_bwd_kernels: (dtype, bucket) pairs, one per forward (dtype, bucket) of the build."""
    kernels = built_bwd_kernels()
    assert len(kernels) > 0
    for name, bucket in kernels:
        assert name in ("fp16", "bf16") and bucket in BUCKETS
    assert kernels == {(name, bucket) for name, bucket, _ in built_kernels()}


def test_bwd_tile():
    """bwd_tile(d): (block_m, block_n, warps, kernel head dim), positive, the same for every d of a
    bucket, whose default kernel has the bucket's head dim."""
    from flash_cute import _C

    for d in range(8, 257, 8):
        block_m, block_n, warps, kernel_dim = _C.bwd_tile(d)
        assert min(block_m, block_n, warps) > 0 and block_m % 16 == 0 and block_n % 16 == 0
        assert kernel_dim == _C.head_dim_bucket(d)
        assert _C.bwd_tile(d) == _C.bwd_tile(_C.head_dim_bucket(d))


def test_missing_bwd_kernel_names_build_option():
    """A (dtype, bucket) this build has no backward kernel for raises RuntimeError naming
    FLASH_CUTE_HEAD_DIMS (flash_cute::bwd called directly: the forward kernel is missing too)."""
    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items() if name != "fp32"}
    missing = [(name, bucket) for name in dtypes for bucket in BUCKETS if (name, bucket) not in built_bwd_kernels()]
    if not missing:
        return  # a full build
    name, bucket = missing[0]
    q, k, v = make_qkv(1, 16, 16, 2, 2, bucket, dtypes[name], "cuda")
    out = torch.zeros_like(q)
    lse = torch.zeros(1, 2, 16, device="cuda")
    with pytest.raises(RuntimeError, match="FLASH_CUTE_HEAD_DIMS"):
        torch.ops.flash_cute.bwd(out, q, k, v, out, lse, 0.125, False, False)
