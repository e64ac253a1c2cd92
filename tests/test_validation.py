"""Every input check of flash_attn_func: the precise exception type, which is also a
RuntimeError (what the official package raises), with a message that names the argument."""

from __future__ import annotations

import pytest
import torch

import flash_cute
from helpers import make_qkv, require_bwd_kernel


def _qkv(dtype=torch.float16, head_dim=16, nheads=4, nheads_k=2, seqlen_q=8, seqlen_k=32):
    return make_qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype)


def _args(**changes):
    """Valid keyword arguments of flash_attn_func, with some of them replaced."""
    q, k, v = _qkv()
    return {"q": q, "k": k, "v": v, **changes}


def _strided_last_dim(t):
    """t's values with the same shape but a last-dimension stride of 2."""
    return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]


# (id, keyword arguments of flash_attn_func, exception type, regex the message must match)
CASES = [
    ("q-not-a-tensor", lambda: _args(q=[[1.0]]), TypeError, r"\bq must be a torch\.Tensor"),
    ("k-not-a-tensor", lambda: _args(k="k"), TypeError, r"\bk must be a torch\.Tensor"),
    ("v-not-a-tensor", lambda: _args(v=None), TypeError, r"\bv must be a torch\.Tensor"),
    ("q-int32", lambda: _args(**dict(zip("qkv", (t.to(torch.int32) for t in _qkv())))), TypeError, r"\bq has dtype torch\.int32"),
    ("q-float64", lambda: _args(**dict(zip("qkv", _qkv(torch.float64)))), TypeError, r"\bq has dtype torch\.float64"),
    ("k-float64", lambda: _args(k=_qkv(torch.float64)[1]), TypeError, r"\bk has dtype torch\.float64"),
    ("k-dtype-mismatch", lambda: _args(k=_qkv(torch.bfloat16)[1]), TypeError, r"\bk has dtype torch\.bfloat16, expected q's dtype"),
    ("v-dtype-mismatch", lambda: _args(v=_qkv(torch.float32)[2]), TypeError, r"\bv has dtype torch\.float32, expected q's dtype"),
    ("q-ndim-3", lambda: _args(q=_qkv()[0][0]), ValueError, r"\bq must have 4 dimensions"),
    ("k-ndim-5", lambda: _args(k=_qkv()[1].unsqueeze(0)), ValueError, r"\bk must have 4 dimensions"),
    ("k-batch-mismatch", lambda: _args(k=_qkv()[1][:1]), ValueError, r"\bk must have shape"),
    ("k-head-dim-mismatch", lambda: _args(k=_qkv(head_dim=24)[1]), ValueError, r"\bk must have shape"),
    ("v-shape-mismatch", lambda: _args(v=_qkv(seqlen_k=31)[2]), ValueError, r"\bv must have k's shape"),
    ("v-heads-mismatch", lambda: _args(v=_qkv(nheads_k=1)[2]), ValueError, r"\bv must have k's shape"),
    ("head-dim-0", lambda: _args(**dict(zip("qkv", _qkv(head_dim=0)))), ValueError, r"head dim"),
    ("head-dim-257", lambda: _args(**dict(zip("qkv", _qkv(head_dim=257)))), ValueError, r"head dim"),
    ("nheads-not-multiple", lambda: _args(**dict(zip("qkv", _qkv(nheads=3, nheads_k=2)))), ValueError, r"number of heads"),
    ("nheads-k-0", lambda: _args(**dict(zip("qkv", _qkv(nheads=3, nheads_k=0)))), ValueError, r"number of heads"),
    ("dropout_p-1", lambda: _args(dropout_p=1.0), ValueError, r"dropout_p"),
    ("dropout_p-negative", lambda: _args(dropout_p=-0.1), ValueError, r"dropout_p"),
    ("dropout_p-string", lambda: _args(dropout_p="0.1"), ValueError, r"dropout_p"),
    ("softcap-negative", lambda: _args(softcap=-1.0), ValueError, r"softcap"),
    ("softcap-string", lambda: _args(softcap="1"), ValueError, r"softcap"),
    ("softcap-bool", lambda: _args(softcap=True), ValueError, r"softcap"),
    ("alibi-not-a-tensor", lambda: _args(alibi_slopes=[1.0] * 4), TypeError, r"alibi_slopes must be a torch\.Tensor"),
    ("alibi-float16", lambda: _args(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, r"alibi_slopes must have dtype torch\.float32"),
    ("alibi-shape", lambda: _args(alibi_slopes=torch.ones(2)), ValueError, r"alibi_slopes must have shape"),
    ("alibi-batch-shape", lambda: _args(alibi_slopes=torch.ones(3, 4)), ValueError, r"alibi_slopes must have shape"),
    ("window-none", lambda: _args(window_size=None), ValueError, r"window_size"),
    ("window-int", lambda: _args(window_size=5), ValueError, r"window_size"),
    ("window-one", lambda: _args(window_size=(1,)), ValueError, r"window_size"),
    ("window-three", lambda: _args(window_size=(1, 2, 3)), ValueError, r"window_size"),
    ("window-strings", lambda: _args(window_size=("a", "b")), ValueError, r"window_size"),
]


@pytest.mark.parametrize("make_args,exc_type,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejects(make_args, exc_type, message):
    with pytest.raises(exc_type, match=message) as info:
        flash_cute.flash_attn_func(**make_args())
    assert isinstance(info.value, RuntimeError), f"{type(info.value).__name__} is not a RuntimeError"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_last_dim_strided_inputs_are_accepted(device):
    """As the official package (which makes such inputs contiguous first), q, k, v whose last
    dimension is strided give the result of their contiguous copies, forward and backward."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (t.to(device, dtype) for t in _qkv())
    if device == "cuda":
        require_bwd_kernel(dtype, q.shape[-1], True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    strided = [_strided_last_dim(t.detach()).requires_grad_() for t in (q, k, v)]
    assert all(t.stride(-1) == 2 for t in strided)
    outs = [flash_cute.flash_attn_func(*ts, causal=True) for ts in (leaves, strided)]
    assert torch.equal(outs[0], outs[1])
    dout = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, ts, dout) for o, ts in zip(outs, (leaves, strided))]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_strided_inputs_are_valid():
    """The checks above reject what they should and no more: the valid baseline runs, and
    strides other than the last dimension's are fine."""
    flash_cute.flash_attn_func(**_args())
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv())
    flash_cute.flash_attn_func(q, k, v, window_size=[-1, -1])


@pytest.mark.cuda
def test_rejects_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"\bk is on"):
        flash_cute.flash_attn_func(q.cuda(), k, v.cuda())


@pytest.mark.cuda
def test_rejects_batch_beyond_grid():
    """CUDA grids stop at 65535 along y and z: larger batches are refused up front."""
    q, k, v = make_qkv(65536, 1, 1, 1, 1, 8, torch.float16, "cuda")
    with pytest.raises(ValueError, match=r"\bbatch") as info:
        flash_cute.flash_attn_func(q, k, v)
    assert isinstance(info.value, RuntimeError)


# --------------------------------------------------------------------------------------------
# The varlen and packed functions


def _varlen_args(**changes):
    """Valid keyword arguments of flash_attn_varlen_func (3 sequences), with some replaced."""
    q = torch.randn(10, 4, 16)
    k = torch.randn(12, 2, 16)
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    args = {"q": q, "k": k, "v": torch.randn_like(k), "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "max_seqlen_q": 7, "max_seqlen_k": 6}
    return {**args, **changes}


VARLEN_CASES = [
    ("cu-q-int64", lambda: _varlen_args(cu_seqlens_q=torch.tensor([0, 3, 3, 10])), TypeError, r"\bcu_seqlens_q must have dtype torch\.int32"),
    ("cu-k-list", lambda: _varlen_args(cu_seqlens_k=[0, 5, 6, 12]), TypeError, r"\bcu_seqlens_k must be a torch\.Tensor"),
    ("cu-q-2d", lambda: _varlen_args(cu_seqlens_q=torch.zeros(2, 2, dtype=torch.int32)), ValueError, r"\bcu_seqlens_q must be 1-D"),
    ("cu-lengths-differ", lambda: _varlen_args(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError, r"same length"),
    ("max-seqlen-negative", lambda: _varlen_args(max_seqlen_q=-1), ValueError, r"\bmax_seqlen_q must be a non-negative int"),
    ("max-seqlen-float", lambda: _varlen_args(max_seqlen_k=6.0), ValueError, r"\bmax_seqlen_k must be a non-negative int"),
    ("q-4d", lambda: _varlen_args(q=torch.randn(1, 10, 4, 16)), ValueError, r"\bq must have 3 dimensions"),
    ("k-head-dim", lambda: _varlen_args(k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8)), ValueError, r"\bk must have shape"),
    ("heads-not-multiple", lambda: _varlen_args(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError, r"multiple of the number of heads"),
    ("block-table-int64", lambda: _varlen_args(k=torch.randn(4, 16, 2, 16), v=torch.randn(4, 16, 2, 16),
                                               block_table=torch.zeros(3, 1, dtype=torch.int64)), TypeError, r"\bblock_table must have dtype torch\.int32"),
    ("block-table-batch", lambda: _varlen_args(k=torch.randn(4, 16, 2, 16), v=torch.randn(4, 16, 2, 16),
                                               block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError, r"\bblock_table must have shape \(batch=3"),
    ("paged-k-3d", lambda: _varlen_args(block_table=torch.zeros(3, 1, dtype=torch.int32)), ValueError, r"\bk must have 4 dimensions"),
]


@pytest.mark.parametrize("make_args,exc_type,message", [c[1:] for c in VARLEN_CASES], ids=[c[0] for c in VARLEN_CASES])
def test_varlen_rejects(make_args, exc_type, message):
    with pytest.raises(exc_type, match=message) as info:
        flash_cute.flash_attn_varlen_func(**make_args())
    assert isinstance(info.value, RuntimeError), f"{type(info.value).__name__} is not a RuntimeError"


def test_varlen_valid_baseline():
    """The cases above differ from a valid call in one argument only."""
    out = flash_cute.flash_attn_varlen_func(**_varlen_args())
    assert out.shape == (10, 4, 16)


@pytest.mark.parametrize("fn,args,message", [
    ("flash_attn_qkvpacked_func", lambda: (torch.randn(2, 7, 2, 4, 16),), r"\bqkv must have shape \(batch, seqlen, 3, nheads, headdim\)"),
    ("flash_attn_kvpacked_func", lambda: (torch.randn(2, 7, 4, 16), torch.randn(2, 7, 3, 2, 16)), r"\bkv must have shape \(batch, seqlen, 2, nheads, headdim\)"),
    ("flash_attn_varlen_qkvpacked_func", lambda: (torch.randn(10, 3, 4, 16, 1), torch.tensor([0, 10], dtype=torch.int32), 10),
     r"\bqkv must have shape \(total, 3, nheads, headdim\)"),
], ids=["qkv", "kv", "varlen-qkv"])
def test_packed_rejects(fn, args, message):
    with pytest.raises(ValueError, match=message) as info:
        getattr(flash_cute, fn)(*args())
    assert isinstance(info.value, RuntimeError)


@pytest.mark.cuda
def test_varlen_rejects_cu_seqlens_on_another_device():
    args = _varlen_args()
    args.update(q=args["q"].cuda().half(), k=args["k"].cuda().half(), v=args["v"].cuda().half())
    with pytest.raises(RuntimeError, match=r"\bcu_seqlens_q is on cpu"):
        flash_cute.flash_attn_varlen_func(**args)

