"""softcap, local windows and ALiBi through the public functions (flash_attn_func, the varlen and
the packed functions): forward and gradients against helpers.options_oracle, a direct float64
computation with flash_attn's semantics. So far the CPU path and float32 inputs (the reference)
take these options; the float16/bfloat16 CUDA kernels refuse them by name
(test_validation.py::test_kernel_dtypes_refuse_options_not_in_the_kernels_yet)."""

from __future__ import annotations

import pytest
import torch

import flash_cute
from helpers import cu_seqlens_of, make_qkv, options_oracle

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # float32 on both: the reference path
# (softcap, window, alibi): each alone, then combined
OPTIONS = [
    (0.0, (3, 2), None), (0.0, (0, -1), None), (0.0, (-1, 4), None), (5.0, (-1, -1), None),
    (0.0, (-1, -1), "heads"), (2.0, (7, 0), "batch_heads"), (3.0, (4, 1), "heads"),
]
IDS = ["w3-2", "w0-inf", "winf-4", "cap5", "alibi", "cap2+w7-0+alibi_b", "cap3+w4-1+alibi"]
TOL = dict(rtol=2e-4, atol=2e-4)  # float32 tiles against float64 in one expression


def _slopes(kind, batch, nheads, device):
    if kind is None:
        return None
    return torch.rand((nheads,) if kind == "heads" else (batch, nheads), dtype=torch.float32, device=device)


def _check(out, grads, want_out, want_grads):
    want_out = want_out.to(out.dtype)
    torch.testing.assert_close(out, want_out, **TOL)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        torch.testing.assert_close(g, w.to(g.dtype), **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("softcap,window,alibi", OPTIONS, ids=IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 17), (17, 9)])
@pytest.mark.parametrize("device", DEVICES)
def test_func_options(device, seqlen_q, seqlen_k, softcap, window, alibi, causal):
    q, k, v = (t.to(device) for t in make_qkv(2, seqlen_q, seqlen_k, 4, 2, 16, torch.float32))
    slopes = _slopes(alibi, 2, 4, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_cute.flash_attn_func(*leaves, softmax_scale=0.6, causal=causal, window_size=window, softcap=softcap,
                                     alibi_slopes=slopes)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    want_out, _ = options_oracle(*ref_leaves, 0.6, causal, softcap, window, None if slopes is None else slopes.cpu())
    want_grads = torch.autograd.grad(want_out, ref_leaves, dout.double().cpu())
    _check(out.cpu(), [g.cpu() for g in grads], want_out.detach(), want_grads)


@pytest.mark.parametrize("softcap,window,alibi", OPTIONS, ids=IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_options(device, softcap, window, alibi):
    """Per sequence: the window and the ALiBi distances from that sequence's own lengths, the
    (batch, nheads) slopes from its own row; an empty sequence and max_seqlen hints too small."""
    lens_q, lens_k = [5, 0, 9, 1], [12, 3, 7, 1]
    cu_q, cu_k = cu_seqlens_of(lens_q, device), cu_seqlens_of(lens_k, device)
    q = torch.randn(sum(lens_q), 4, 16, device=device)
    k, v = (torch.randn(sum(lens_k), 2, 16, device=device) for _ in range(2))
    slopes = _slopes(alibi, 4, 4, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, 4, 4, causal=True, window_size=window, softcap=softcap,
                                            alibi_slopes=slopes)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    want_out, want_grads = [], [[], [], []]
    for b in range(4):
        q0, q1, k0, k1 = sum(lens_q[:b]), sum(lens_q[:b + 1]), sum(lens_k[:b]), sum(lens_k[:b + 1])
        ref = [t.detach().double().cpu()[None, r0:r1].clone().requires_grad_()
               for t, (r0, r1) in zip((q, k, v), ((q0, q1), (k0, k1), (k0, k1)))]
        s_b = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes).cpu()
        o, _ = options_oracle(*ref, 16 ** -0.5, True, softcap, window, s_b)
        want_out.append(o[0].detach())
        for lst, g in zip(want_grads, torch.autograd.grad(o, ref, dout.double().cpu()[None, q0:q1])):
            lst.append(g[0])
    _check(out.cpu(), [g.cpu() for g in grads], torch.cat(want_out), [torch.cat(g) for g in want_grads])


@pytest.mark.parametrize("device", DEVICES)
def test_qkvpacked_options(device):
    """The packed functions pass the options through to the forward and to the packed backward."""
    qkv = torch.randn(2, 11, 3, 4, 16, device=device, requires_grad=True)
    slopes = torch.rand(4, device=device)
    out = flash_cute.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, 0), softcap=4.0, alibi_slopes=slopes)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    ref = [t.detach().double().cpu().requires_grad_() for t in qkv.unbind(2)]
    want_out, _ = options_oracle(*ref, 16 ** -0.5, True, 4.0, (3, 0), slopes.cpu())
    want_grads = torch.autograd.grad(want_out, ref, dout.double().cpu())
    _check(out.cpu(), list(grad.cpu().unbind(2)), want_out.detach(), want_grads)


def test_window_wider_than_the_keys_is_no_window():
    """As in the official package: a side at least seqlen_k wide is unbounded, so such a window
    equals plain (or causal) attention bit for bit."""
    q, k, v = make_qkv(1, 7, 13, 2, 2, 16, torch.float32)
    plain = flash_cute.flash_attn_func(q, k, v)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, window_size=(13, 100)), plain)
    assert torch.equal(flash_cute.flash_attn_func(q, k, v, window_size=(20, 0)),
                       flash_cute.flash_attn_func(q, k, v, causal=True))
