"""softcap, local windows and ALiBi through the public functions (flash_attn_func, the varlen and
the packed functions): forward and gradients against helpers.options_oracle, a direct float64
computation with flash_attn's semantics, on the reference path (CPU tensors and float32 inputs);
tests/test_options_kernels.py checks the float16/bfloat16 CUDA kernels."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("packed", [False, True], ids=["func", "qkvpacked"])
@pytest.mark.parametrize("softcap,window,alibi", [(0.0, (-1, -1), None), (3.0, (4, 1), "heads")], ids=["plain", "all"])
@pytest.mark.parametrize("device", DEVICES)
def test_negative_softmax_scale(device, softcap, window, alibi, packed):
    """softmax_scale < 0 is softmax(q . k * scale) like any other (the functions run it on -q):
    forward and gradients, the packed function's too."""
    q, k, v = (t.to(device) for t in make_qkv(2, 13, 13, 4, 4, 16, torch.float32))
    slopes = _slopes(alibi, 2, 4, device)
    kwargs = dict(softmax_scale=-0.6, window_size=window, softcap=softcap, alibi_slopes=slopes)
    if packed:
        qkv = torch.stack([q, k, v], dim=2).requires_grad_()
        out = flash_cute.flash_attn_qkvpacked_func(qkv, **kwargs)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, qkv, dout)[0].unbind(2)
    else:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_cute.flash_attn_func(*leaves, **kwargs)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    want_out, _ = options_oracle(*ref_leaves, -0.6, False, softcap, window, None if slopes is None else slopes.cpu())
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


# ------------------------------------------------------------------------------------------------
# Dropout on the reference path (tests/test_options_kernels.py has the CUDA kernels')


def _dropout_call(leaves, seed, **kwargs):
    torch.manual_seed(seed)
    return flash_cute.flash_attn_func(*leaves, dropout_p=0.3, softmax_scale=0.6, return_attn_probs=True, **kwargs)


@pytest.mark.parametrize("options", [dict(), dict(causal=True, window_size=(20, 3), softcap=2.0, alibi_slopes="heads")],
                         ids=["plain", "causal+window+softcap+alibi"])
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_against_the_returned_mask(device, options):
    """The output and the gradients equal the oracle's with the keep mask the call returns
    (S_dmask >= 0, as the official tests read it); the same seed repeats the call bit for bit, another
    seed draws another mask."""
    q, k, v = (t.to(device) for t in make_qkv(2, 37, 45, 4, 2, 16, torch.float32))
    if options.get("alibi_slopes") == "heads":
        options = dict(options, alibi_slopes=torch.rand(4, device=device))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, s_dmask = _dropout_call(leaves, 7, **options)
    assert s_dmask.shape == (2, 4, 128, 128) and s_dmask.dtype == q.dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    keep = (s_dmask[:, :, :37, :45] >= 0).cpu()
    assert 0 < keep.float().mean() < 1
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    slopes = options.get("alibi_slopes")
    want_out, want_lse = options_oracle(*ref, 0.6, options.get("causal", False), options.get("softcap", 0.0),
                                        options.get("window_size", (-1, -1)), None if slopes is None else slopes.cpu(),
                                        keep=keep, dropout_p=0.3)
    want_grads = torch.autograd.grad(want_out, ref, dout.double().cpu())
    _check(out.detach().cpu(), [g.cpu() for g in grads], want_out.detach(), want_grads)
    torch.testing.assert_close(lse.cpu(), want_lse.float(), **TOL)

    again = [t.clone().requires_grad_() for t in (q, k, v)]
    out2, _, s_dmask2 = _dropout_call(again, 7, **options)
    assert torch.equal(out2, out) and torch.equal(s_dmask2, s_dmask)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out2, again, dout), grads))
    other = _dropout_call([t.clone() for t in (q, k, v)], 8, **options)[0]
    assert not torch.equal(other, out)


def test_dropout_keep_rate_and_probabilities():
    """The kept fraction of the visible entries is 1 - p within 5 standard deviations, and
    S_dmask's magnitudes decode the official way (running maxima over blocks of
    _get_block_size_n keys, from the last block) to the softmax probabilities."""
    from flash_cute.flash_attn_interface import _get_block_size_n

    q, k, v = make_qkv(2, 100, 300, 4, 4, 32, torch.float32)
    for p in (0.1, 0.5):
        torch.manual_seed(0)
        _, lse, s_dmask = flash_cute.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
        visible = torch.ones(100, 300, dtype=torch.bool).tril(200)
        kept = (s_dmask[:, :, :100, :300] > 0)[..., visible].float()
        n = kept.numel()
        assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), (p, kept.mean().item())
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 32 ** -0.5
    scores = scores.masked_fill(~visible, -math.inf)
    block_n = _get_block_size_n(q.device, 32, True, True)
    assert isinstance(block_n, int) and block_n > 0
    blocks = scores.split(block_n, dim=-1)
    running = torch.stack([b.amax(-1) for b in blocks], -1).flip(-1).cummax(-1).values.flip(-1)
    probs = torch.cat([s_dmask[:, :, :100, :300].abs().split(block_n, -1)[i].double() *
                       (running[..., i : i + 1] - lse.double()[..., None]).exp() for i in range(len(blocks))], -1)
    torch.testing.assert_close(probs, scores.softmax(-1), rtol=1e-4, atol=1e-6)
