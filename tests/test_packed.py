"""The packed variants: flash_attn_qkvpacked_func, flash_attn_kvpacked_func and their varlen
forms. Each equals the unpacked function called on the unbound views of the same packed tensor,
forward (bitwise: the same kernels on the same data) and gradients (up to rounding: the packed
gradient is one tensor shaped like qkv / kv), on the CPU reference path and on the GPU kernels."""

from __future__ import annotations

import pytest
import torch

import flash_cute
import flash_cute.flash_attn_interface
from helpers import CAUSAL_IDS, assert_close_to_rounding, cu_seqlens_of, require_bwd_kernel


# --------------------------------------------------------------------------------------------
# The cases. Each builds the packed leaves and says how to call the packed function, how to
# unpack the leaves into (q, k, v) views and how to call the unpacked function on them.


def _randn(shape, dtype, device):
    return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)


class Case:
    def __init__(self, packed, unpacked, leaves, unpack, args=(), lse_shape=None):
        self.packed = packed  # name of the packed function
        self.unpacked = unpacked  # name of the unpacked function
        self.leaves = leaves  # the packed inputs (tensors)
        self.unpack = unpack  # leaves -> (q, k, v) views
        self.args = args  # arguments after the tensors (cu_seqlens, max_seqlen)
        self.lse_shape = lse_shape


def qkvpacked(dtype, device):
    """qkv (batch, seqlen, 3, nheads, d)."""
    qkv = _randn((2, 97, 3, 4, 64), dtype, device)
    return Case("flash_attn_qkvpacked_func", "flash_attn_func", [qkv], lambda qkv: qkv.unbind(dim=2),
                lse_shape=(2, 4, 97))


def kvpacked(dtype, device):
    """q (batch, seqlen_q, nheads, d), kv (batch, seqlen_k, 2, nheads_k, d) with GQA and
    seqlen_q != seqlen_k."""
    q = _randn((2, 113, 4, 128), dtype, device)
    kv = _randn((2, 97, 2, 2, 128), dtype, device)
    return Case("flash_attn_kvpacked_func", "flash_attn_func", [q, kv], lambda q, kv: (q, *kv.unbind(dim=2)),
                lse_shape=(2, 4, 113))


def varlen_qkvpacked(dtype, device):
    """qkv (total, 3, nheads, d), one cu_seqlens (an empty and a length-1 sequence included)."""
    lens = [5, 0, 130, 1, 33]
    qkv = _randn((sum(lens), 3, 4, 64), dtype, device)
    cu = cu_seqlens_of(lens, device)
    return Case("flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_func", [qkv],
                lambda qkv: qkv.unbind(dim=1), args=(cu, max(lens)), lse_shape=(4, sum(lens)))


def varlen_kvpacked(dtype, device):
    """q (total_q, nheads, d), kv (total_k, 2, nheads_k, d), GQA, len_q != len_k both ways."""
    lens_q, lens_k = [5, 0, 130, 1, 3], [7, 2, 100, 1, 0]
    q = _randn((sum(lens_q), 4, 128), dtype, device)
    kv = _randn((sum(lens_k), 2, 2, 128), dtype, device)
    cu_q, cu_k = cu_seqlens_of(lens_q, device), cu_seqlens_of(lens_k, device)
    return Case("flash_attn_varlen_kvpacked_func", "flash_attn_varlen_func", [q, kv],
                lambda q, kv: (q, *kv.unbind(dim=1)), args=(cu_q, cu_k, max(lens_q), max(lens_k)),
                lse_shape=(4, sum(lens_q)))


CASES = {f.__name__: f for f in (qkvpacked, kvpacked, varlen_qkvpacked, varlen_kvpacked)}
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]


def _unpacked_args(case, q, k, v):
    """The unpacked function's positional arguments: varlen_qkvpacked's one cu_seqlens and
    max_seqlen serve both q and k."""
    if case.packed == "flash_attn_varlen_qkvpacked_func":
        cu, max_seqlen = case.args
        return (q, k, v, cu, cu, max_seqlen, max_seqlen)
    return (q, k, v, *case.args)


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_packed_equals_unpacked(name, device, dtype, causal):
    """The packed function equals the unpacked one on the unbound views: out and lse bitwise,
    the packed gradient (one tensor per packed input, shaped like it) up to rounding; the
    return value without return_attn_probs is the output alone."""
    case = CASES[name](dtype, device)
    if device == "cuda":
        require_bwd_kernel(dtype, case.leaves[0].shape[-1], causal)
    packed_fn = getattr(flash_cute, case.packed)
    unpacked_fn = getattr(flash_cute, case.unpacked)
    kwargs = dict(causal=causal, deterministic=True)

    leaves = [t.detach().clone().requires_grad_() for t in case.leaves]
    res = packed_fn(*leaves, *case.args, return_attn_probs=True, **kwargs)
    assert isinstance(res, tuple) and len(res) == 3, "return_attn_probs=True returns (out, softmax_lse, S_dmask)"
    out, lse, s_dmask = res
    assert s_dmask.numel() == 0
    assert lse.shape == case.lse_shape and lse.dtype == torch.float32, f"lse {tuple(lse.shape)} {lse.dtype}"

    ref_leaves = [t.detach().clone().requires_grad_() for t in case.leaves]
    q, k, v = case.unpack(*ref_leaves)
    ref_out, ref_lse, _ = unpacked_fn(*_unpacked_args(case, q, k, v), return_attn_probs=True, **kwargs)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert torch.equal(out, ref_out), "packed and unpacked outputs differ"
    assert torch.equal(lse, ref_lse), "packed and unpacked lse differ"

    plain = packed_fn(*[t.detach() for t in case.leaves], *case.args, **kwargs)
    assert isinstance(plain, torch.Tensor), "without return_attn_probs the packed function returns the output alone"
    assert torch.equal(plain, out)

    dout = torch.randn(out.shape, device=device).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout)  # through unbind: packed-shaped
    for i, (g, r, leaf) in enumerate(zip(grads, ref_grads, leaves)):
        assert isinstance(g, torch.Tensor) and g.shape == leaf.shape and g.dtype == leaf.dtype
        assert g.device == leaf.device
        assert not g.isnan().any()
        assert_close_to_rounding(g, r, f"gradient of packed input {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_packed_backward_makes_no_copies(varlen):
    """The packed gradient is written in place by the backward kernels (as the official package
    does): no copy, concatenation or stacking kernel runs in the backward pass."""
    require_bwd_kernel(torch.bfloat16, 64, True)
    if varlen:
        qkv = _randn((300, 3, 4, 64), torch.bfloat16, "cuda").requires_grad_()
        cu = cu_seqlens_of([100, 0, 200], "cuda")
        out = flash_cute.flash_attn_varlen_qkvpacked_func(qkv, cu, 200, causal=True)
    else:
        qkv = _randn((2, 150, 3, 4, 64), torch.bfloat16, "cuda").requires_grad_()
        out = flash_cute.flash_attn_qkvpacked_func(qkv, causal=True)
    dout = torch.randn_like(out)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        (grad,) = torch.autograd.grad(out, qkv, dout)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("bwd_kernel" in k for k in kernels), kernels
    copies = [k for k in kernels if any(w in k.lower() for w in ("copy", "cat", "stack"))]
    assert not copies, f"the packed backward ran copy kernels: {copies}"
    assert grad.shape == qkv.shape and not grad.isnan().any()
