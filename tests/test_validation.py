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
    ("dropout_p", lambda: _args(dropout_p=0.1), NotImplementedError, r"dropout_p"),
    ("softcap", lambda: _args(softcap=1.0), NotImplementedError, r"softcap"),
    ("alibi_slopes", lambda: _args(alibi_slopes=torch.ones(4)), NotImplementedError, r"alibi_slopes"),
    ("window-16-0", lambda: _args(window_size=(16, 0)), NotImplementedError, r"window_size"),
    ("window-0-16", lambda: _args(window_size=(0, 16)), NotImplementedError, r"window_size"),
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
