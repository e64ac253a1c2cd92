"""flash_attn's options in the float16/bfloat16 CUDA kernels: local windows, softcap, ALiBi,
dropout and the deterministic flag, through every public function, against a direct oracle.

The oracle (``_attend`` below) computes attention from its definition with flash_attn's option
semantics, the same as helpers.options_oracle (test_oracle_matches_options_oracle checks that),
but fit to be PyTorch's float16/bfloat16 computation too (rows and sequences without keys give
0, not NaN), returning the probabilities, and with an optional dropout keep mask. Every check is
the 2x rule of the other GPU tests: with ``ref`` the oracle run in float32 on the upcast inputs
and ``pt`` the same oracle run by PyTorch in the input dtype,
``max|kernel - ref| <= 2 * max|pt - ref| + a small floor`` (helpers.ROUNDING_TERM for outputs,
helpers._assert_grads_within_2x for gradients); the lse is compared with the float32 oracle's
(+inf exactly on rows that see no key).

Covered:
1. flash_attn_func: each option alone and combined (window + causal + softcap + ALiBi), forward
   (NaN-poisoned) and gradients; seqlen_q != seqlen_k both ways; windows so narrow that rows see
   no key (out 0, lse +inf, dq 0); windows that skip whole key blocks; the other head dims.
2. flash_attn_varlen_func with per-sequence windows and ALiBi ((nheads,) and (batch, nheads)
   slopes), and the packed functions (qkv, kv, varlen qkv), with and without dropout.
3. flash_attn_with_kvcache with options: contiguous and paged (16, 256) caches, cache_seqlens
   tensor, with and without new keys, seqlen_q 1 and 4 (the split-KV kernel) and 40 (the forward
   kernel), GQA; cache slots no row may read hold NaN.
4. Dropout: the output, lse and gradients against the oracle that uses the keep mask decoded
   from S_dmask (the sign bit), alone and with every option; the keep rate; same seed => bitwise
   equal out and gradients, another seed => another output; S_dmask's shape and the
   probabilities it encodes; flash_cute.flash_attn_interface._get_block_size_n; varlen; a CUDA
   graph replayed twice draws two masks, each consistent.
5. deterministic=True with a window and ALiBi (and dropout): bitwise-equal gradients.

Every test is a GPU test (skipped without a CUDA GPU); cases whose kernels are not in the build
are skipped with the missing kernel named (helpers.require_kernel / require_bwd_kernel, and the
kernels with options of _C.built_option_kernels, absent from FLASH_CUTE_OPTION_KERNELS=OFF builds).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

import flash_cute
from flash_cute import flash_attn_interface
from helpers import (
    CAUSAL_IDS,
    DTYPES,
    DTYPE_IDS,
    DTYPE_NAMES,
    ROUNDING_TERM,
    _assert_grads_within_2x,
    assert_lse_matches,
    capture_cuda_graph,
    cu_seqlens_of,
    make_qkv,
    make_varlen_qkv,
    options_oracle,
    require_bwd_kernel,
    require_kernel,
    run_backward,
    run_poisoned,
)

pytestmark = pytest.mark.cuda

HEAD_DIMS = [64, 128]
OTHER_HEAD_DIMS = [32, 40, 59, 96, 111, 160, 192, 224, 256]  # 40, 59, 111: padded routes
NHEADS, NHEADS_K = 4, 2  # grouped-query attention everywhere
SEQLENS = [(113, 257), (257, 113), (1, 1000), (1000, 1000)]
DROPOUT_P = 0.17


# --------------------------------------------------------------------------------------------
# Option sets


@dataclass(frozen=True)
class Opts:
    """One combination of flash_attn's options (dropout_p is passed apart)."""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None; "heads": (nheads,) slopes; "batch": (batch, nheads) slopes
    scale: float | None = None

    def slopes(self, batch, nheads=NHEADS):
        """Fresh ALiBi slopes in [0, 0.5) of the kind asked for (float32, on the GPU), or None."""
        if self.alibi is None:
            return None
        shape = (nheads,) if self.alibi == "heads" else (batch, nheads)
        return torch.rand(shape, device="cuda") * 0.5

    def kernel_kwargs(self, slopes):
        """The options as every public function (flash_attn_with_kvcache included) takes them."""
        return dict(softmax_scale=self.scale, causal=self.causal, window_size=self.window, softcap=self.softcap,
                    alibi_slopes=slopes)

    def oracle_kwargs(self, slopes, head_dim):
        return dict(scale=head_dim**-0.5 if self.scale is None else self.scale, causal=self.causal,
                    window=self.window, softcap=self.softcap, slopes=slopes)


def _opt(id_, **kwargs):
    return pytest.param(Opts(**kwargs), id=id_)


PLAIN = _opt("plain")
CAUSAL = _opt("causal", causal=True)
ALL_CAUSAL = _opt("all_causal", causal=True, window=(70, -1), softcap=5.0, alibi="batch")
ALL = _opt("all", window=(70, 30), softcap=8.0, alibi="heads")
# Each option alone, then combined. Right sides stay below the key count of every sequence with
# seqlen_q > seqlen_k (the only place where it matters), so that reading a side at least seqlen_k
# wide as unbounded (the official normalisation, which flash_cute's varlen does against the
# whole batch's keys) changes nothing.
OPTIONS = [
    _opt("window", window=(37, 11)),
    _opt("window_left", window=(50, -1)),
    _opt("window_right", window=(-1, 20)),
    _opt("window_0_0", window=(0, 0)),
    _opt("causal_window", causal=True, window=(40, 7)),  # causal sets right = 0: the 7 is ignored
    _opt("softcap", softcap=5.0),
    _opt("softcap_scale", softcap=2.0, scale=0.3),
    _opt("alibi", alibi="heads"),
    _opt("alibi_batch_causal", causal=True, alibi="batch"),
    ALL_CAUSAL,
    ALL,
    # A negative scale (the functions run it on -q, the kernels' maxima being of q . k)
    _opt("negative_scale", scale=-0.3),
    _opt("negative_scale_all", causal=True, window=(70, -1), softcap=5.0, alibi="batch", scale=-0.2),
]
DROPOUT_OPTIONS = [
    PLAIN, CAUSAL, _opt("window", window=(37, 11)), _opt("softcap", softcap=5.0), _opt("alibi", alibi="heads"),
    ALL_CAUSAL, ALL, _opt("negative_scale", scale=-0.3),
]


@functools.cache
def _built_option_kernels():
    """{(dtype name, head-dim bucket)} that have the kernels with options in this build."""
    from flash_cute import _C

    if not hasattr(_C, "built_option_kernels"):
        pytest.fail("flash_cute._C has no built_option_kernels: the extension predates the kernels with options; "
                    "rebuild it", pytrace=False)
    return frozenset(tuple(entry) for entry in _C.built_option_kernels())


def _require(dtype, head_dim, backward=False):
    """Skips, naming the kernel, unless the build has the kernels an options call may run: the
    forward kernels of both masks (a window with causal may run either), the kernels with options
    (FLASH_CUTE_OPTION_KERNELS) and, with ``backward``, the backward kernel."""
    from flash_cute import _C

    for causal in (False, True):
        require_kernel(dtype, head_dim, causal)
    if backward:
        require_bwd_kernel(dtype, head_dim)
    kernel = (DTYPE_NAMES[dtype], _C.head_dim_bucket(-(-head_dim // 8) * 8))
    if kernel not in _built_option_kernels():
        pytest.skip(f"this build has no kernels with options for {kernel} (dtype, head-dim bucket): "
                    "FLASH_CUTE_OPTION_KERNELS=OFF")


def _randn(shape, dtype):
    return torch.randn(shape, device="cuda").to(dtype)


def _fresh_seed():
    """A seed for torch.manual_seed, drawn from the test's own seeded CPU generator."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


# --------------------------------------------------------------------------------------------
# The oracle


def _visible(seqlen_q, seqlen_k, causal, window, device):
    """(seqlen_q, seqlen_k) bool: query i sees key j iff i + d - left <= j <= i + d + right
    (d = seqlen_k - seqlen_q, -1: unbounded; causal sets right = 0)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible


def _scores(q, k, scale, causal, window, softcap, slopes):
    """Scores (batch, nheads, seqlen_q, seqlen_k) in q's dtype (k in the same dtype): q k^T * scale,
    then softcap * tanh(. / softcap), then the ALiBi bias -slope * |i + d - j| (computed in float32,
    or float64 for float64 scores, then rounded to the dtype, as a bias tensor given to PyTorch
    would be), -inf where not visible."""
    seqlen_q, nheads = q.shape[1], q.shape[2]
    seqlen_k = k.shape[1]
    kk = k.repeat_interleave(nheads // k.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        bias_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        distance = (i + seqlen_k - seqlen_q - j).abs().to(bias_dtype)
        s = s - (slopes.to(bias_dtype).reshape(-1, nheads, 1, 1) * distance).to(s.dtype)
    return s.masked_fill(~_visible(seqlen_q, seqlen_k, causal, window, q.device), -math.inf)


def _attend(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, slopes=None, keep=None, dropout_p=0.0):
    """Attention with flash_attn's options and, given ``keep``, dropout, from the definition, in
    q's dtype on q's device; differentiable. q (batch, seqlen_q, nheads, d), k and v (batch,
    seqlen_k, nheads_k, d) in q's dtype; slopes as the kernels take them; keep: bool (batch, nheads,
    seqlen_q, seqlen_k), True where dropout keeps the probability (out = (P * keep / (1 - p)) V).
    Returns (out, lse, probs): probs before dropout; rows that see no key give out 0, lse +inf,
    probs 0 (and gradients 0)."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    if seqlen_k == 0:
        lse = torch.full((batch, nheads, seqlen_q), math.inf, dtype=q.dtype, device=q.device)
        return q * 0, lse, q.new_zeros(batch, nheads, seqlen_q, 0)
    s = _scores(q, k, scale, causal, window, softcap, slopes)
    m = s.detach().amax(dim=-1, keepdim=True)  # softmax does not depend on the shift
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(l > 0, l, torch.ones_like(l))
    lse = torch.where(l > 0, m + l.log(), torch.full_like(l, math.inf)).squeeze(-1)
    weights = probs if keep is None else probs * keep.to(probs.dtype) / (1 - dropout_p)
    vv = v.repeat_interleave(nheads // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vv), lse, probs


def _attend_varlen(q, k, v, *, lens_q, lens_k, slopes=None, keep=None, **kwargs):
    """_attend of each sequence of a variable-length batch alone, with its own lengths, its row of
    (batch, nheads) slopes and its corner keep[b, :, :len_q, :len_k] of a varlen S_dmask's mask.
    q (total_q, nheads, d), k and v (total_k, nheads_k, d). Returns out (total_q, nheads, d), lse
    (nheads, total_q) and the list of each sequence's probs (nheads, len_q, len_k)."""
    outs, lses, probs = [], [], []
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        o, lse, p = _attend(
            q[None, q0:q0 + lq], k[None, k0:k0 + lk], v[None, k0:k0 + lk],
            slopes=slopes if slopes is None or slopes.dim() == 1 else slopes[b],
            keep=None if keep is None else keep[b:b + 1, :, :lq, :lk], **kwargs,
        )
        outs.append(o[0])
        lses.append(lse[0])
        probs.append(p[0])
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, dim=1), probs


class _Ref(NamedTuple):
    out: torch.Tensor
    lse: torch.Tensor
    probs: object  # a tensor (_attend) or a list of them (_attend_varlen)
    grads: tuple | None


def _reference(attend, q, k, v, dout, dtype, **kwargs):
    """attend(q, k, v, **kwargs) computed in ``dtype`` from the inputs cast to it, and with
    ``dout`` the gradients of q, k, v by torch.autograd."""
    leaves = [t.detach().to(dtype).requires_grad_(dout is not None) for t in (q, k, v)]
    with torch.enable_grad():
        out, lse, probs = attend(*leaves, **kwargs)
    grads = None if dout is None else torch.autograd.grad(out, leaves, dout.to(dtype))
    return _Ref(out.detach(), lse.detach(), probs, grads)


def _lse_atol(softcap):
    """The lse tolerance: 1e-3, plus the move of each score by the approximate tanh that the
    kernels may use for softcap (relative error ~2^-11 of softcap * tanh)."""
    return 1e-3 + softcap * 2.0**-10


def _assert_2x(name, got, ref, pt, floor=ROUNDING_TERM):
    """max|got - ref| <= 2 * max|pt - ref| + floor, the same shape, no NaN."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert not got.isnan().any(), f"{name} has NaN (an element left unwritten, or a NaN computed)"
    if got.numel() == 0:
        return
    err = (got.to(ref.dtype) - ref).abs().max().item()
    err_pt = (pt.to(ref.dtype) - ref).abs().max().item()
    assert err <= 2 * err_pt + floor, (
        f"{name}: max error {err:.3e} exceeds 2 x PyTorch's error in {pt.dtype} ({err_pt:.3e}) + {floor}"
    )


def _compare(out, lse, grads, q, k, v, dout=None, *, attend=_attend, **kwargs):
    """The kernels' out (and lse, and grads of q, k, v when given) against the float32 oracle,
    PyTorch's error being the oracle run in q's dtype. Returns (ref, pt)."""
    with_grads = grads is not None
    ref = _reference(attend, q, k, v, dout if with_grads else None, torch.float32, **kwargs)
    pt = _reference(attend, q, k, v, dout if with_grads else None, q.dtype, **kwargs)
    assert out.dtype == q.dtype and out.device == q.device, (out.dtype, out.device)
    _assert_2x("out", out, ref.out, pt.out)
    if lse is not None:
        assert_lse_matches(lse, ref.lse, atol=_lse_atol(kwargs.get("softcap", 0.0)))
    if with_grads:
        _assert_grads_within_2x(grads, ref.grads, pt.grads, (q, k, v), torch.float32)
    return ref, pt


# --------------------------------------------------------------------------------------------
# Running the kernels; S_dmask


def _run(fn, tensors, *args, dout=None, probs=True, **kwargs):
    """fn(*tensors, *args, return_attn_probs=probs, **kwargs) on leaves that share the tensors'
    memory. Returns (out, lse, s_dmask, grads): lse and s_dmask are None without ``probs``, grads
    (one per tensor) None without ``dout``."""
    leaves = [t.detach().requires_grad_(dout is not None) for t in tensors]
    result = fn(*leaves, *args, return_attn_probs=probs, **kwargs)
    out, lse, s_dmask = result if probs else (result, None, None)
    grads = None if dout is None else torch.autograd.grad(out, leaves, dout)
    return out.detach(), lse, s_dmask, grads


def _round128(n):
    return -(-n // 128) * 128


def _keep_mask(s_dmask, batch, nheads, seqlen_q, seqlen_k, dtype):
    """Checks S_dmask's shape (batch, nheads, seqlen_q and seqlen_k rounded up to 128; varlen:
    the max_seqlen) and dtype, and returns dropout's keep mask (batch, nheads, seqlen_q,
    seqlen_k): the entries whose sign bit is clear (dropped ones hold -exp(s - m), -0.0 included).
    Only its visible entries mean anything."""
    want = (batch, nheads, _round128(seqlen_q), _round128(seqlen_k))
    assert tuple(s_dmask.shape) == want, f"S_dmask shape {tuple(s_dmask.shape)}, expected {want}"
    assert s_dmask.dtype == dtype, f"S_dmask dtype {s_dmask.dtype}, expected {dtype}"
    return ~torch.signbit(s_dmask[:, :, :seqlen_q, :seqlen_k])


def _block_size_n(device, head_dim, is_dropout, is_causal):
    fn = getattr(flash_attn_interface, "_get_block_size_n", None)
    assert fn is not None, "flash_cute.flash_attn_interface has no _get_block_size_n"
    return fn(device, head_dim, is_dropout, is_causal)


def _decode_probs(s_dmask, scores, lse, block_n):
    """The attention probabilities S_dmask encodes, recovered as the official tests do. The kernel
    stores |S| = exp(s - m) with m the running row max when it processed the key block, walking
    blocks of block_n keys from the last to the first: m of block j is the max of the scores of
    blocks j, j + 1, ... (a cumulative max from the right), and p = |S| * exp(m - lse).
    scores: float32 (batch, nheads, seqlen_q, seqlen_k), -inf where not visible; lse: float32."""
    seqlen_q, seqlen_k = scores.shape[-2:]
    unnormalised = s_dmask[:, :, :seqlen_q, :seqlen_k].float().abs()
    block_max = torch.stack([blk.amax(dim=-1) for blk in scores.split(block_n, dim=-1)], dim=-1)
    running_max = block_max.flip(-1).cummax(dim=-1).values.flip(-1)
    return torch.cat([u * torch.exp(m - lse)[..., None]
                      for u, m in zip(unnormalised.split(block_n, dim=-1), running_max.unbind(-1))], dim=-1)


def _check_dropout(fn, tensors, args, dout, dropout_p, keep_of, kernel_kwargs, attend=_attend, **oracle_kwargs):
    """Two calls with the same seed: the first returns S_dmask, whose keep mask (keep_of(s_dmask))
    makes the oracle that out and lse must match; the second, without return_attn_probs (the
    training path), draws the same mask, so its out and gradients match that oracle too."""
    seed = _fresh_seed()
    torch.manual_seed(seed)
    out, lse, s_dmask, _ = _run(fn, tensors, *args, dropout_p=dropout_p, **kernel_kwargs)
    keep = keep_of(s_dmask)
    _compare(out, lse, None, *tensors, attend=attend, keep=keep, dropout_p=dropout_p, **oracle_kwargs)
    torch.manual_seed(seed)
    out, _, _, grads = _run(fn, tensors, *args, dout=dout, probs=False, dropout_p=dropout_p, **kernel_kwargs)
    _compare(out, None, grads, *tensors, dout, attend=attend, keep=keep, dropout_p=dropout_p, **oracle_kwargs)
    return keep


# --------------------------------------------------------------------------------------------
# 0. The oracle itself


def test_oracle_matches_options_oracle():
    """_attend (on the GPU, float64) equals helpers.options_oracle (the CPU oracle of
    test_options.py), outputs and gradients, for windows, causal, softcap and both slope shapes."""
    cases = [Opts(window=(5, 3)), Opts(causal=True, window=(9, 2), softcap=3.0, alibi="batch"),
             Opts(softcap=2.0, alibi="heads", scale=0.7), Opts(window=(0, 0))]
    for opts in cases:
        for seqlen_q, seqlen_k in ((9, 17), (17, 9)):
            q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, 16, torch.float64, "cuda")
            dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")
            slopes = opts.slopes(2)
            oracle_kwargs = opts.oracle_kwargs(slopes, 16)
            got = _reference(_attend, q, k, v, dout, torch.float64, **oracle_kwargs)
            leaves = [t.cpu().requires_grad_() for t in (q, k, v)]
            out, lse = options_oracle(*leaves, oracle_kwargs["scale"], opts.causal, opts.softcap, opts.window,
                                      None if slopes is None else slopes.cpu())
            grads = torch.autograd.grad(out, leaves, dout.cpu())
            torch.testing.assert_close(got.out.cpu(), out.detach())
            torch.testing.assert_close(got.lse.cpu(), lse.detach())
            for g, want in zip(got.grads, grads):
                torch.testing.assert_close(g.cpu(), want)


# --------------------------------------------------------------------------------------------
# 1. flash_attn_func


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_func_options_forward(dtype, head_dim, seqlen_q, seqlen_k, opts):
    """Each option alone and combined: out (on NaN-poisoned memory) and lse."""
    _require(dtype, head_dim)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    slopes = opts.slopes(2)
    out, lse = run_poisoned(q, k, v, **opts.kernel_kwargs(slopes))
    _compare(out, lse, None, q, k, v, **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_func_options_backward(dtype, head_dim, seqlen_q, seqlen_k, opts):
    """Each option alone and combined: dq, dk, dv (the backward on NaN-poisoned memory)."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    slopes = opts.slopes(2)
    out, dq, dk, dv = run_backward(q, k, v, dout, **opts.kernel_kwargs(slopes))
    _compare(out, None, (dq, dk, dv), q, k, v, dout, **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("opts", [
    _opt("window_5_2", window=(5, 2)),
    _opt("window_0_0", window=(0, 0)),
    _opt("causal_window", causal=True, window=(3, -1)),
    _opt("window_alibi_softcap", window=(20, 10), softcap=5.0, alibi="batch"),
])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_seeing_no_key(dtype, head_dim, opts):
    """seqlen_q > seqlen_k with a narrow window: the leading rows see no key (query i's keys end
    at i + seqlen_k - seqlen_q + right < 0). Their output is exactly 0, their lse +inf, their dq
    exactly 0, and nothing is NaN."""
    _require(dtype, head_dim, backward=True)
    seqlen_q, seqlen_k = 257, 113
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    slopes = opts.slopes(2)
    kernel_kwargs, oracle_kwargs = opts.kernel_kwargs(slopes), opts.oracle_kwargs(slopes, head_dim)
    out, lse = run_poisoned(q, k, v, **kernel_kwargs)
    ref, _ = _compare(out, lse, None, q, k, v, **oracle_kwargs)
    right = 0 if opts.causal else opts.window[1]
    n_empty = seqlen_q - seqlen_k - right
    empty = torch.isposinf(ref.lse)  # (batch, nheads, seqlen_q)
    assert empty[..., :n_empty].all() and not empty[..., n_empty:].any(), "the oracle's empty rows (a test bug)"
    assert torch.all(out[:, :n_empty] == 0), "rows that see no key must give output 0"
    assert torch.isposinf(lse[..., :n_empty]).all(), "rows that see no key must give lse +inf"

    _, dq, dk, dv = run_backward(q, k, v, dout, **kernel_kwargs)
    _compare(out, None, (dq, dk, dv), q, k, v, dout, **oracle_kwargs)
    assert torch.all(dq[:, :n_empty] == 0), "dq of rows that see no key must be exactly 0"


@pytest.mark.parametrize("softcap", [2.0, 50.0, 51.9, 52.1, 300.0])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softcap_saturated_rows(dtype, head_dim, softcap):
    """Rows whose every score saturates tanh at +softcap or at -softcap beside ordinary rows: the
    softmax's extremes. The bf16 forward takes softcap's probabilities against a fixed maximum up
    to softcap 52 (51.9 the last, 52.1 the first it does not), so the smallest, 2^-120 at -softcap,
    must stay normal floats. out and lse (NaN-poisoned) and the gradients, against the oracle."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, 200, 300, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    k = k.abs()  # q = +-40 (1, ..., 1) then scores +-40 * sum|k| / sqrt(d): ~ +-360 (d128)
    q[:, :50] = 40.0
    q[:, 50:100] = -40.0
    dout = _randn(q.shape, dtype)
    opts = Opts(softcap=softcap)
    out, lse = run_poisoned(q, k, v, **opts.kernel_kwargs(None))
    _compare(out, lse, None, q, k, v, **opts.oracle_kwargs(None, head_dim))
    out, dq, dk, dv = run_backward(q, k, v, dout, **opts.kernel_kwargs(None))
    _compare(out, None, (dq, dk, dv), q, k, v, dout, **opts.oracle_kwargs(None, head_dim))


@pytest.mark.parametrize("opts", [
    _opt("window_64_64", window=(64, 64)),
    _opt("window_0_0", window=(0, 0)),
    _opt("window_300_5", window=(300, 5)),
    _opt("window_5_300", window=(5, 300)),
    _opt("causal_window_64_alibi", causal=True, window=(64, -1), alibi="heads"),
])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1000, 1000), (500, 1500)])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_window_skips_key_blocks(dtype, head_dim, seqlen_q, seqlen_k, opts):
    """Windows much narrower than the keys: whole key blocks lie outside every row of a query
    tile on either side (the kernels may skip them, but must still get every row right)."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    _check_forward_and_backward(q, k, v, dout, opts, head_dim)


def _check_forward_and_backward(q, k, v, dout, opts, head_dim):
    """The forward (on poisoned memory) and the gradients against the oracle, (batch, nheads) slopes."""
    slopes = opts.slopes(2)
    out, lse = run_poisoned(q, k, v, **opts.kernel_kwargs(slopes))
    _compare(out, lse, None, q, k, v, **opts.oracle_kwargs(slopes, head_dim))
    out, dq, dk, dv = run_backward(q, k, v, dout, **opts.kernel_kwargs(slopes))
    _compare(out, None, (dq, dk, dv), q, k, v, dout, **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("opts", [ALL_CAUSAL, ALL, _opt("softcap", softcap=5.0)])
@pytest.mark.parametrize("head_dim", OTHER_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_options_other_head_dims(dtype, head_dim, opts):
    """Every option at once for the other head dims (padded ones included), forward and backward;
    and softcap alone, whose backward computes P inside the GEMMs on the tiles that need no mask
    (every key block of the 257 keys but the last)."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, 113, 257, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    _check_forward_and_backward(q, k, v, dout, opts, head_dim)


# --------------------------------------------------------------------------------------------
# 2. Varlen and the packed functions

# Sequences with seqlen_q > seqlen_k, with no query, with no key, single rows and a long one.
LENS_Q = [113, 0, 257, 1, 7, 300]
LENS_K = [257, 40, 113, 1, 0, 1000]


def _varlen_inputs(head_dim, dtype):
    q, k, v, cu_q, cu_k = make_varlen_qkv(LENS_Q, LENS_K, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    return q, k, v, (cu_q, cu_k, max(LENS_Q), max(LENS_K)), _randn(q.shape, dtype)


VARLEN_ORACLE = functools.partial(_attend_varlen, lens_q=LENS_Q, lens_k=LENS_K)


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_options(dtype, head_dim, opts):
    """Per sequence: the window and the ALiBi distances from the sequence's own lengths, its own
    row of (batch, nheads) slopes; out, lse and gradients."""
    _require(dtype, head_dim, backward=True)
    q, k, v, varlen, dout = _varlen_inputs(head_dim, dtype)
    slopes = opts.slopes(len(LENS_Q))
    out, lse, s_dmask, grads = _run(flash_cute.flash_attn_varlen_func, (q, k, v), *varlen, dout=dout,
                                    **opts.kernel_kwargs(slopes))
    assert s_dmask.numel() == 0, "S_dmask must be empty without dropout"
    _compare(out, lse, grads, q, k, v, dout, attend=VARLEN_ORACLE, **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("opts", [PLAIN, ALL_CAUSAL, ALL])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_dropout(dtype, head_dim, opts):
    """Dropout per sequence: S_dmask (batch, nheads, max_seqlen_q and max_seqlen_k rounded up to
    128) holds sequence b at [b, :, :len_q, :len_k]; out, lse and gradients follow its mask."""
    _require(dtype, head_dim, backward=True)
    q, k, v, varlen, dout = _varlen_inputs(head_dim, dtype)
    slopes = opts.slopes(len(LENS_Q))

    def keep_of(s_dmask):
        return _keep_mask(s_dmask, len(LENS_Q), NHEADS, max(LENS_Q), max(LENS_K), dtype)

    _check_dropout(flash_cute.flash_attn_varlen_func, (q, k, v), varlen, dout, 0.2, keep_of,
                   opts.kernel_kwargs(slopes), attend=VARLEN_ORACLE, **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("kind", ["qkv", "kv", "varlen_qkv"])
@pytest.mark.parametrize("opts", [ALL_CAUSAL, ALL])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_options(dtype, head_dim, opts, kind, dropout_p):
    """The packed functions pass every option (and dropout) to the forward and to the packed
    backward: out, lse and the packed gradient, split into dq, dk, dv."""
    _require(dtype, head_dim, backward=True)
    attend, args = _attend, ()
    if kind == "qkv":
        fn, batch, seqlen_q, seqlen_k = flash_cute.flash_attn_qkvpacked_func, 2, 257, 257
        packed = (_randn((batch, seqlen_q, 3, NHEADS, head_dim), dtype),)

        def unpack(ts):
            return ts[0].unbind(2)
    elif kind == "kv":
        fn, batch, seqlen_q, seqlen_k = flash_cute.flash_attn_kvpacked_func, 2, 113, 257
        packed = (_randn((batch, seqlen_q, NHEADS, head_dim), dtype),
                  _randn((batch, seqlen_k, 2, NHEADS_K, head_dim), dtype))

        def unpack(ts):
            return (ts[0], *ts[1].unbind(2))
    else:
        lens = [113, 1, 300]
        fn, batch, seqlen_q, seqlen_k = flash_cute.flash_attn_varlen_qkvpacked_func, len(lens), max(lens), max(lens)
        packed = (_randn((sum(lens), 3, NHEADS, head_dim), dtype),)
        args = (cu_seqlens_of(lens, "cuda"), max(lens))
        attend = functools.partial(_attend_varlen, lens_q=lens, lens_k=lens)

        def unpack(ts):
            return ts[0].unbind(1)
    q, k, v = unpack(packed)
    dout = _randn(q.shape, dtype)
    slopes = opts.slopes(batch)
    torch.manual_seed(_fresh_seed())
    out, lse, s_dmask, grads = _run(fn, packed, *args, dout=dout, dropout_p=dropout_p, **opts.kernel_kwargs(slopes))
    if dropout_p > 0:
        keep = _keep_mask(s_dmask, batch, NHEADS, seqlen_q, seqlen_k, dtype)
    else:
        keep = None
        assert s_dmask.numel() == 0, "S_dmask must be empty without dropout"
    _compare(out, lse, unpack(grads), q, k, v, dout, attend=attend, keep=keep, dropout_p=dropout_p,
             **opts.oracle_kwargs(slopes, head_dim))


# --------------------------------------------------------------------------------------------
# 3. flash_attn_with_kvcache

KV_OPTIONS = [
    _opt("causal_window", causal=True, window=(48, -1)),
    _opt("window_softcap", window=(100, 3), softcap=5.0),
    _opt("alibi_batch", alibi="batch"),
    _opt("all_causal", causal=True, window=(70, -1), softcap=5.0, alibi="heads"),
    _opt("negative_scale_softcap", softcap=5.0, scale=-0.4),
]
KV_CAPACITY = 600  # rows per cache row (paged: rounded up to whole pages)


def _paged(slots, page_size, table, num_pages):
    """The pages (num_pages, page_size, nheads_k, d) holding slots (batch, capacity, nheads_k, d)
    at block_table ``table``; pages no row owns hold NaN."""
    pages = torch.full((num_pages, page_size, *slots.shape[2:]), math.nan, dtype=slots.dtype, device=slots.device)
    pos = torch.arange(slots.shape[1], device=slots.device)
    pages[table.long()[:, pos // page_size], pos % page_size] = slots
    return pages


def _attended_rows(slots, new, old):
    """What the call attends to, as the varlen oracle takes it: each batch row's old rows
    slots[b, :old[b]], then its new rows new[b] (if any), concatenated over the batch."""
    return torch.cat([slots[b, :s] if new is None else torch.cat([slots[b, :s], new[b]]) for b, s in enumerate(old)])


@pytest.mark.parametrize("seqlen_q,seqlen_new", [(1, 0), (1, 1), (4, 4), (40, 0)],
                         ids=["q1", "q1_new1", "q4_new4", "q40"])
@pytest.mark.parametrize("page_size", [None, 16, 256], ids=["contiguous", "paged16", "paged256"])
@pytest.mark.parametrize("opts", KV_OPTIONS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_options(dtype, head_dim, opts, page_size, seqlen_q, seqlen_new):
    """Batch row b attends to its cache_seqlens[b] old keys and the seqlen_new new ones (written
    into the cache by the call), the window, causal mask and ALiBi distances counted from that
    row's own key count. seqlen_q 1 and 4 run the split-KV kernel, 40 (80 query rows per KV head)
    the forward kernel. Every cache slot past a row's old keys, and every page no row owns, holds
    NaN: a read of one shows in the output."""
    _require(dtype, head_dim)
    batch = 3
    capacity = KV_CAPACITY if page_size is None else -(-KV_CAPACITY // page_size) * page_size
    old = [45, 300, capacity - seqlen_new]  # shorter than a key block, mid-way, a full cache after the call
    q = _randn((batch, seqlen_q, NHEADS, head_dim), dtype)
    k_slots, v_slots = (_randn((batch, capacity, NHEADS_K, head_dim), dtype) for _ in range(2))
    k_new, v_new = ((_randn((batch, seqlen_new, NHEADS_K, head_dim), dtype) for _ in range(2)) if seqlen_new
                    else (None, None))
    lens_k = [s + seqlen_new for s in old]
    keys, values = _attended_rows(k_slots, k_new, old), _attended_rows(v_slots, v_new, old)
    for slots in (k_slots, v_slots):
        for b, s in enumerate(old):
            slots[b, s:] = math.nan
    table = None
    if page_size is None:
        k_cache, v_cache = k_slots, v_slots
    else:
        pages_per_row = capacity // page_size
        num_pages = batch * pages_per_row + 3
        table = torch.randperm(num_pages, device="cuda")[: batch * pages_per_row].view(batch, -1).to(torch.int32)
        k_cache, v_cache = (_paged(slots, page_size, table, num_pages) for slots in (k_slots, v_slots))
    slopes = opts.slopes(batch)

    out, lse = flash_cute.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(old, dtype=torch.int32, device="cuda"),
        block_table=table, return_softmax_lse=True, **opts.kernel_kwargs(slopes),
    )
    assert out.shape == q.shape and lse.shape == (batch, NHEADS, seqlen_q)
    attend = functools.partial(_attend_varlen, lens_q=[seqlen_q] * batch, lens_k=lens_k)
    _compare(out.reshape(batch * seqlen_q, NHEADS, head_dim), lse.transpose(0, 1).reshape(NHEADS, batch * seqlen_q),
             None, q.reshape(batch * seqlen_q, NHEADS, head_dim), keys, values,
             attend=attend, **opts.oracle_kwargs(slopes, head_dim))
    if seqlen_new:  # the new keys were written at cache_seqlens
        pos = torch.arange(seqlen_new, device="cuda")
        for b, s in enumerate(old):
            if table is None:
                where = (b, s + pos)
            else:
                where = (table[b].long()[(s + pos) // page_size], (s + pos) % page_size)
            assert torch.equal(k_cache[where], k_new[b]) and torch.equal(v_cache[where], v_new[b]), (
                f"row {b}: the new keys/values are not in the cache at cache_seqlens"
            )


# --------------------------------------------------------------------------------------------
# 4. Dropout


@pytest.mark.parametrize("opts", DROPOUT_OPTIONS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 257), (257, 113), (1000, 1000)])
@pytest.mark.parametrize("head_dim", HEAD_DIMS + [pytest.param(d, id=f"{d}") for d in OTHER_HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_matches_oracle(dtype, head_dim, seqlen_q, seqlen_k, opts):
    """out = (softmax(scores) * keep / (1 - p)) V with the keep mask decoded from S_dmask, lse of
    the softmax before dropout, and the gradients of that expression (the same seed, hence the
    same mask, in a second call without return_attn_probs); alone and with causal, a window,
    softcap and ALiBi."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    slopes = opts.slopes(2)

    def keep_of(s_dmask):
        return _keep_mask(s_dmask, 2, NHEADS, seqlen_q, seqlen_k, dtype)

    _check_dropout(flash_cute.flash_attn_func, (q, k, v), (), dout, DROPOUT_P, keep_of, opts.kernel_kwargs(slopes),
                   **opts.oracle_kwargs(slopes, head_dim))


@pytest.mark.parametrize("opts", [PLAIN, _opt("causal_window", causal=True, window=(300, -1))])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_keep_rate(dtype, dropout_p, opts):
    """The fraction of kept visible entries is within 5 standard deviations of the keep
    probability, flash_attn's 8-bit one: a random byte <= floor((1 - p) * 255), so
    (floor((1 - p) * 255) + 1) / 256 (0.8984 for p = 0.1) (masked entries do not count). Without a mask, the masks of two heads, of two batch rows, of two key
    blocks and of two query blocks are not copies of one another (the random stream is not
    reused across them)."""
    _require(dtype, 64)
    seqlen = 1000
    q, k, v = make_qkv(2, seqlen, seqlen, NHEADS, NHEADS_K, 64, dtype, "cuda")
    _, _, s_dmask, _ = _run(flash_cute.flash_attn_func, (q, k, v), dropout_p=dropout_p, causal=opts.causal,
                            window_size=opts.window)
    keep = _keep_mask(s_dmask, 2, NHEADS, seqlen, seqlen, dtype)
    visible = _visible(seqlen, seqlen, opts.causal, opts.window, "cuda").expand_as(keep)
    n = int(visible.sum())
    kept = int((keep & visible).sum())
    keep_p = (math.floor((1 - dropout_p) * 255) + 1) / 256
    std = math.sqrt(keep_p * (1 - keep_p) / n)
    assert abs(kept / n - keep_p) <= 5 * std, (
        f"kept {kept} of {n} visible entries ({kept / n:.5f}); expected {keep_p:.5f} +- 5 x {std:.2e}"
    )
    assert torch.isfinite(s_dmask[:, :, :seqlen, :seqlen][visible]).all(), "S_dmask has non-finite visible entries"
    if opts.causal:
        return
    for name, a, b in (("heads 0 and 1", keep[0, 0], keep[0, 1]), ("batch rows 0 and 1", keep[0, 0], keep[1, 0]),
                       ("key blocks", keep[..., :64], keep[..., 64:128]),
                       ("query blocks", keep[..., :64, :], keep[..., 64:128, :])):
        assert not torch.equal(a, b), f"the dropout masks of {name} are equal"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_seed_reproducible(dtype):
    """torch.manual_seed(s) then the same call gives bitwise-equal out and gradients; another
    seed gives another output."""
    _require(dtype, 64, backward=True)
    opts = Opts(causal=True, window=(100, -1), softcap=5.0, alibi="heads")
    q, k, v = make_qkv(2, 257, 300, NHEADS, NHEADS_K, 64, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    kwargs = dict(dropout_p=0.3, **opts.kernel_kwargs(opts.slopes(2)))
    seed = _fresh_seed()

    def run(s):
        torch.manual_seed(s)
        out, _, _, grads = _run(flash_cute.flash_attn_func, (q, k, v), dout=dout, probs=False, **kwargs)
        return out, *grads

    first, second, other = run(seed), run(seed), run(seed + 1)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two calls after the same torch.manual_seed"
    assert not torch.equal(first[0], other[0]), "another seed gave the same output (the same mask)"


@pytest.mark.parametrize("causal", [False, True], ids=CAUSAL_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_alibi_branch_same_mask(dtype, head_dim, causal):
    """Dropout with alibi_slopes of 0 (which change no score) takes the dropout kernel's ALiBi
    branch, dropout alone does not: after the same torch.manual_seed both draw the same mask
    (S_dmask's signs equal; the random numbers are a function of the coordinates only) and give the
    same out, lse and gradients up to rounding."""
    _require(dtype, head_dim, backward=True)
    q, k, v = make_qkv(2, 300, 257, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    seed = _fresh_seed()

    def run(**kwargs):
        torch.manual_seed(seed)
        out, lse, s_dmask, _ = _run(flash_cute.flash_attn_func, (q, k, v), dropout_p=0.3, causal=causal, **kwargs)
        torch.manual_seed(seed)
        _, _, _, grads = _run(flash_cute.flash_attn_func, (q, k, v), dout=dout, probs=False, dropout_p=0.3,
                              causal=causal, **kwargs)
        return out, lse, _keep_mask(s_dmask, 2, NHEADS, 300, 257, dtype), grads

    alone = run()
    with_alibi = run(alibi_slopes=torch.zeros(NHEADS, device="cuda"))
    assert torch.equal(alone[2], with_alibi[2]), "dropout with zero ALiBi slopes drew another mask"
    torch.testing.assert_close(alone[0], with_alibi[0])
    torch.testing.assert_close(alone[1], with_alibi[1])
    for name, a, b in zip(("dq", "dk", "dv"), alone[3], with_alibi[3]):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_probs_kernel_same_output(dtype, head_dim, varlen):
    """return_attn_probs=True runs a forward kernel of its own (the one that also stores S_dmask):
    after the same torch.manual_seed it draws the same mask as the call without, so both outputs
    are bitwise equal."""
    _require(dtype, head_dim)
    if varlen:
        q, k, v, args, _ = _varlen_inputs(head_dim, dtype)
        fn = flash_cute.flash_attn_varlen_func
    else:
        q, k, v = make_qkv(2, 300, 257, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
        args, fn = (), flash_cute.flash_attn_func
    seed = _fresh_seed()
    outs = []
    for probs in (False, True):
        torch.manual_seed(seed)
        outs.append(_run(fn, (q, k, v), *args, probs=probs, dropout_p=0.3, causal=True, softcap=5.0)[0])
    assert torch.equal(outs[0], outs[1]), (
        f"out with and without return_attn_probs differ: max {(outs[0].float() - outs[1].float()).abs().max()}")


@pytest.mark.parametrize("opts", [PLAIN, CAUSAL, _opt("window_64_64", window=(64, 64)), ALL_CAUSAL, ALL])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 257), (1000, 1000)])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_s_dmask_probabilities(dtype, head_dim, seqlen_q, seqlen_k, opts):
    """The probabilities S_dmask encodes (|S_dmask| rescaled per key block of
    _get_block_size_n(device, head_dim, True, causal) keys, see _decode_probs) are the oracle's
    softmax probabilities within 2x PyTorch's error in the dtype, on the visible entries, which
    are all finite."""
    _require(dtype, head_dim)
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, head_dim, dtype, "cuda")
    slopes = opts.slopes(2)
    oracle_kwargs = opts.oracle_kwargs(slopes, head_dim)
    _, lse, s_dmask, _ = _run(flash_cute.flash_attn_func, (q, k, v), dropout_p=0.3, **opts.kernel_kwargs(slopes))
    _keep_mask(s_dmask, 2, NHEADS, seqlen_q, seqlen_k, dtype)  # shape and dtype
    ref = _reference(_attend, q, k, v, None, torch.float32, **oracle_kwargs)
    pt = _reference(_attend, q, k, v, None, dtype, **oracle_kwargs)
    assert_lse_matches(lse, ref.lse, atol=_lse_atol(opts.softcap))
    visible = _visible(seqlen_q, seqlen_k, opts.causal, opts.window, "cuda").expand(2, NHEADS, -1, -1)
    assert torch.isfinite(s_dmask[:, :, :seqlen_q, :seqlen_k][visible]).all(), "S_dmask has non-finite visible entries"
    scores = _scores(q.float(), k.float(), oracle_kwargs["scale"], opts.causal, opts.window, opts.softcap, slopes)
    block_n = _block_size_n(q.device, head_dim, True, opts.causal)
    probs = torch.where(visible, _decode_probs(s_dmask, scores, ref.lse, block_n), 0.0)
    _assert_2x("probabilities from S_dmask", probs, ref.probs, pt.probs)


def test_get_block_size_n():
    """flash_cute.flash_attn_interface._get_block_size_n(device, head_dim, is_dropout, is_causal),
    as in the official package: a positive int for every head dim and flag."""
    fn = getattr(flash_attn_interface, "_get_block_size_n", None)
    assert fn is not None, "flash_cute.flash_attn_interface has no _get_block_size_n"
    assert list(inspect.signature(fn).parameters) == ["device", "head_dim", "is_dropout", "is_causal"]
    device = torch.device("cuda", torch.cuda.current_device())
    for head_dim in [32, 40, 59, 64, 96, 128, 160, 192, 224, 256]:
        for is_dropout in (False, True):
            for is_causal in (False, True):
                n = fn(device, head_dim, is_dropout, is_causal)
                assert isinstance(n, int) and not isinstance(n, bool) and n > 0, (head_dim, is_dropout, is_causal, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_cuda_graph(dtype):
    """A forward and backward with dropout captured in a CUDA graph and replayed twice: the two
    replays draw different masks (the generator advances per replay), and each replay's out, lse
    and gradients follow the mask its own S_dmask shows."""
    _require(dtype, 64, backward=True)
    opts, dropout_p = Opts(causal=True), 0.25
    q, k, v = make_qkv(2, 113, 257, NHEADS, NHEADS_K, 64, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        out, lse, s_dmask = flash_cute.flash_attn_func(*leaves, dropout_p=dropout_p, causal=True,
                                                       return_attn_probs=True)
        return (out, lse, s_dmask, *torch.autograd.grad(out, leaves, dout))

    graph, static = capture_cuda_graph(step, warmups=2)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append([t.detach().clone() for t in static])
    torch.cuda.synchronize()

    visible = _visible(113, 257, True, (-1, -1), "cuda")
    keeps = [_keep_mask(r[2], 2, NHEADS, 113, 257, dtype) & visible for r in replays]
    assert not torch.equal(keeps[0], keeps[1]), "two replays of the graph drew the same dropout mask"
    for (out, lse, _, *grads), keep in zip(replays, keeps):
        _compare(out, lse, grads, q, k, v, dout, keep=keep, dropout_p=dropout_p, **opts.oracle_kwargs(None, 64))


# --------------------------------------------------------------------------------------------
# 5. The deterministic flag with options


@pytest.mark.parametrize("dropout_p", [0.0, 0.15], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("opts", [_opt("window_alibi", window=(256, 128), alibi="heads"),
                                  _opt("causal_window_alibi_softcap", causal=True, window=(512, -1), softcap=5.0,
                                       alibi="batch")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_with_options(dtype, opts, dropout_p):
    """deterministic=True: two backward passes (the same seed for dropout) are bitwise equal, on
    a shape where several key blocks add into each dQ row, and the first matches the oracle (with
    dropout, on the mask its S_dmask shows): the kernels with options add dQ inside dK's GEMM,
    between the semaphore's wait and its release."""
    _require(dtype, 128, backward=True)
    seqlen = 2048
    q, k, v = make_qkv(2, seqlen, seqlen, NHEADS, NHEADS_K, 128, dtype, "cuda")
    dout = _randn(q.shape, dtype)
    slopes = opts.slopes(2)
    kwargs = dict(dropout_p=dropout_p, deterministic=True, **opts.kernel_kwargs(slopes))
    seed = _fresh_seed()
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)
        runs.append(_run(flash_cute.flash_attn_func, (q, k, v), dout=dout, **kwargs))
    for name, a, b in zip(("dq", "dk", "dv"), runs[0][3], runs[1][3]):
        assert not a.isnan().any(), f"{name} has NaN"
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    out, lse, s_dmask, grads = runs[0]
    keep = None
    if dropout_p:
        keep = _keep_mask(s_dmask, 2, NHEADS, seqlen, seqlen, dtype)
        keep &= _visible(seqlen, seqlen, opts.causal, opts.window, "cuda")
    _compare(out, lse, grads, q, k, v, dout, keep=keep, dropout_p=dropout_p, **opts.oracle_kwargs(slopes, 128))
