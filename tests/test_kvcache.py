"""flash_cute.flash_attn_with_kvcache against its oracle, flash_cute.reference.kvcache_attention.

Every case runs the public function and the reference on clones of the same inputs and compares
the output, the lse and both caches after the call. Cache slots that no batch row may read (pages
no row owns, positions before cache_leftpad, positions from cache_seqlens + seqlen_new on) hold
NaN, so a read of any of them shows as NaN in the output, and a stray write shows in the caches.

* CPU (float32, bfloat16): output and lse equal the reference's up to the last rounding
  (helpers.assert_close_to_rounding); the caches are bit-identical.
* CUDA (bfloat16, head dim 64 and 128): the output follows the 2x rule against the reference run
  in float32 on the upcast inputs (PyTorch's error being the reference run in bfloat16); the lse
  is within 2e-2 of the float32 reference; the caches equal the bfloat16 reference's bit for bit,
  except the rotated new keys, which may differ by the rounding of the rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import flash_cute
from flash_cute.errors import FlashAttnNotImplementedError, FlashAttnTypeError, FlashAttnValueError
from flash_cute.reference import kvcache_attention

from helpers import ROUNDING_TERM, assert_close_to_rounding, assert_lse_matches, require_kernel

# GQA group size -> (nheads, nheads_k)
GROUPS = {1: (2, 2), 4: (8, 2), 8: (8, 1)}


@dataclass(frozen=True)
class Dev:
    device: str
    dtype: torch.dtype
    d: int  # head dim

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


DEVS = [
    pytest.param(Dev("cpu", torch.float32, 32), id="cpu-fp32"),
    pytest.param(Dev("cpu", torch.bfloat16, 32), id="cpu-bf16"),
    pytest.param(Dev("cuda", torch.bfloat16, 64), id="cuda-bf16-d64", marks=pytest.mark.cuda),
    pytest.param(Dev("cuda", torch.bfloat16, 128), id="cuda-bf16-d128", marks=pytest.mark.cuda),
]


def _causal_ids(causal):
    return "causal" if causal else "full"


def _need(dev: Dev, causal: bool) -> None:
    if dev.cuda:
        require_kernel(dev.dtype, dev.d, causal)


# --------------------------------------------------------------------------------------------
# Building a case


@dataclass
class Case:
    inputs: dict  # the keyword arguments both functions take (tensors on the device)
    seqlens: list  # cache_seqlens per batch row (Python ints)
    seqlen_new: int
    where: object  # where(b, positions) -> (dim-0 indices, dim-1 indices) into the caches


def build(dev: Dev, *, batch=3, seqlen_q=2, group=4, cache_len=40, seqlen_new=0, layout="contiguous",
          page_size=16, batch_cache=None, rotary_dim=0, leftpad=False, seqlens="tensor", seqlen_values=None):
    """A case: layout "contiguous", "batch_idx" (cache_batch_idx, batch_cache rows) or "paged"
    (block_table over pages of page_size rows, ceil(cache_len / page_size) pages per row, plus 3
    pages no row owns). seqlens: "tensor" (int32), "int" (one int for every row) or "none" (the
    whole logical length; needs seqlen_new == 0). Only the visible old entries hold numbers."""
    nheads, nheads_k = GROUPS[group]
    d, dtype, device = dev.d, dev.dtype, dev.device

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float32).to(dtype).to(device)

    kwargs = {}
    if layout == "paged":
        pages = -(-cache_len // page_size)
        logical = pages * page_size
        num_pages = batch * pages + 3
        block_table = torch.randperm(num_pages, dtype=torch.int32)[: batch * pages].view(batch, pages)
        shape = (num_pages, page_size, nheads_k, d)
        kwargs["block_table"] = block_table.to(device)

        def where(b, pos):
            return block_table[b].long()[pos // page_size], pos % page_size
    else:
        logical = cache_len
        rows = batch if layout == "contiguous" else (batch_cache or batch + 2)
        shape = (rows, cache_len, nheads_k, d)
        idx = None
        if layout == "batch_idx":
            idx = torch.randperm(rows, dtype=torch.int32)[:batch]
            kwargs["cache_batch_idx"] = idx.to(device)

        def where(b, pos):
            row = b if idx is None else int(idx[b])
            return torch.full_like(pos, row), pos

    if seqlens == "none":
        assert seqlen_new == 0
        values = [logical] * batch
        kwargs["cache_seqlens"] = None
    elif seqlens == "int":
        s = seqlen_values if seqlen_values is not None else int(torch.randint(1, logical - seqlen_new + 1, ()))
        values = [s] * batch
        kwargs["cache_seqlens"] = s
    else:
        values = torch.randint(0, logical - seqlen_new + 1, (batch,)).tolist()
        if seqlen_values is not None:
            values[: len(seqlen_values)] = seqlen_values
        kwargs["cache_seqlens"] = torch.tensor(values, dtype=torch.int32, device=device)
    pads = [0] * batch
    if leftpad:
        pads = [int(torch.randint(0, s + 1, ())) for s in values]
        pads[0] = values[0]  # only the new keys are visible
        kwargs["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32, device=device)

    k_cache = torch.full(shape, math.nan, dtype=dtype)
    v_cache = k_cache.clone()
    for b in range(batch):
        r, c = where(b, torch.arange(pads[b], values[b]))
        k_cache[r, c] = torch.randn(len(r), nheads_k, d).to(dtype)
        v_cache[r, c] = torch.randn(len(r), nheads_k, d).to(dtype)
    kwargs["q"] = randn(batch, seqlen_q, nheads, d)
    kwargs["k_cache"], kwargs["v_cache"] = k_cache.to(device), v_cache.to(device)
    if seqlen_new:
        kwargs["k"] = randn(batch, seqlen_new, nheads_k, d)
        kwargs["v"] = randn(batch, seqlen_new, nheads_k, d)
    if rotary_dim:
        # Causal queries sit at s .. s + seqlen_q - 1: the tables cover them.
        angle = torch.rand(logical + seqlen_q, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
        kwargs["rotary_cos"] = torch.cos(angle).to(dtype).to(device)
        kwargs["rotary_sin"] = torch.sin(angle).to(dtype).to(device)
    return Case(kwargs, values, seqlen_new, where)


def _clone(inputs, dtype=None):
    out = {}
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor):
            t = t.clone()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
        out[name] = t
    return out


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_bits(got, want, name):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    diff = _bits(got) != _bits(want)
    if diff.any():
        raise AssertionError(
            f"{name}: {int(diff.sum())} elements differ bitwise from the reference (first at "
            f"{tuple(diff.nonzero()[0].tolist())}; NaN-poisoned: {int(want[diff].isnan().sum())}, "
            f"written where NaN expected / vice versa shows here)"
        )


def _target_mask(case: Case, shape):
    """True on the cache slots (dims 0, 1) that the append writes."""
    target = torch.zeros(shape[:2], dtype=torch.bool)
    for b, s in enumerate(case.seqlens):
        r, c = case.where(b, torch.arange(s, s + case.seqlen_new))
        target[r, c] = True
    return target


def run_case(dev: Dev, case: Case, causal=False, rotary_interleaved=True, num_splits=0, **options):
    """The public call against the reference; returns the public (out, lse, k_cache, v_cache).
    ``options``: softcap, window_size, alibi_slopes, passed to both."""
    kwargs = dict(causal=causal, rotary_interleaved=rotary_interleaved, **options)
    mine = _clone(case.inputs)
    result = flash_cute.flash_attn_with_kvcache(**mine, num_splits=num_splits, return_softmax_lse=True, **kwargs)
    assert isinstance(result, tuple) and len(result) == 2, "return_softmax_lse=True must return (out, lse)"
    out, lse = result
    ref_in = _clone(case.inputs)
    ref_out, ref_lse = kvcache_attention(**ref_in, **kwargs)

    for name in ("q", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad",
                 "block_table"):
        t = case.inputs.get(name)
        if isinstance(t, torch.Tensor):
            _assert_same_bits(mine[name], t, f"{name} (must not be modified)")

    q = case.inputs["q"]
    batch, seqlen_q, nheads, _ = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32 and lse.device == q.device

    rotated = case.seqlen_new > 0 and case.inputs.get("rotary_cos") is not None
    target = _target_mask(case, case.inputs["k_cache"].shape)
    if not dev.cuda:
        assert_close_to_rounding(out, ref_out, "out")
        assert_close_to_rounding(lse, ref_lse, "lse")
        _assert_same_bits(mine["k_cache"], ref_in["k_cache"], "k_cache")
        _assert_same_bits(mine["v_cache"], ref_in["v_cache"], "v_cache")
    else:
        ref32_out, ref32_lse = kvcache_attention(**_clone(case.inputs, torch.float32), **kwargs)
        assert not out.isnan().any(), "output has NaN (a poisoned cache slot was read, or an element left unwritten)"
        err = (out.float() - ref32_out).abs().max().item()
        err_pt = (ref_out.float() - ref32_out).abs().max().item()
        assert err <= 2 * err_pt + ROUNDING_TERM, (
            f"max error {err:.3e} exceeds 2 x the bf16 reference's error ({err_pt:.3e}) + {ROUNDING_TERM}"
        )
        assert_lse_matches(lse, ref32_lse, rtol=2e-2, atol=2e-2)
        _assert_same_bits(mine["v_cache"], ref_in["v_cache"], "v_cache")
        if rotated:
            t = target.to(q.device)
            _assert_same_bits(mine["k_cache"][~t], ref_in["k_cache"][~t], "k_cache outside the appended rows")
            assert_close_to_rounding(mine["k_cache"][t], ref_in["k_cache"][t], "k_cache appended (rotated) rows")
        else:
            _assert_same_bits(mine["k_cache"], ref_in["k_cache"], "k_cache")
    return out, lse, mine["k_cache"], mine["v_cache"]


# --------------------------------------------------------------------------------------------
# No new keys: attention over the cache; GQA; seqlen_q 1 and > 1; every layout


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("dev", DEVS)
def test_no_append(dev, group, seqlen_q, causal):
    _need(dev, causal)
    case = build(dev, group=group, seqlen_q=seqlen_q)
    run_case(dev, case, causal)


@pytest.mark.parametrize("seqlens", ["tensor", "int", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
@pytest.mark.parametrize("dev", DEVS)
def test_no_append_layouts(dev, layout, seqlens):
    _need(dev, True)
    case = build(dev, layout=layout, seqlens=seqlens, seqlen_q=3, cache_len=48)
    run_case(dev, case, causal=True)


# --------------------------------------------------------------------------------------------
# Appends into a paged cache, crossing page boundaries


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("seqlen_new", [1, 5])
@pytest.mark.parametrize("page_size", [16, 64, 256, 7])
@pytest.mark.parametrize("dev", DEVS)
def test_append_paged(dev, page_size, seqlen_new, rotary, causal):
    _need(dev, causal)
    cache_len = 2 * page_size + 8  # 3 pages per row
    # Row 0 ends on a page boundary (seqlen_new 1) or crosses it (5); row 1 starts a fresh page.
    case = build(dev, layout="paged", page_size=page_size, cache_len=cache_len, seqlen_new=seqlen_new,
                 seqlen_q=3, rotary_dim=16 if rotary else 0, seqlen_values=[page_size - 1, page_size])
    run_case(dev, case, causal)


# --------------------------------------------------------------------------------------------
# Rotary: interleaved or not, rotary_dim 16 or the full head dim; q's rotation depends on causal


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("seqlen_new", [1, 5])
@pytest.mark.parametrize("rotary_dim", ["16", "full"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("dev", DEVS)
def test_rotary(dev, interleaved, rotary_dim, seqlen_new, seqlen_q, causal):
    _need(dev, causal)
    rd = 16 if rotary_dim == "16" else dev.d
    case = build(dev, seqlen_new=seqlen_new, seqlen_q=seqlen_q, rotary_dim=rd, cache_len=32)
    run_case(dev, case, causal, rotary_interleaved=interleaved)


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("dev", DEVS)
def test_rotary_gqa_paged(dev, group):
    _need(dev, True)
    case = build(dev, group=group, layout="paged", page_size=16, cache_len=48, seqlen_new=5, seqlen_q=5,
                 rotary_dim=16, seqlen_values=[11])
    run_case(dev, case, causal=True, rotary_interleaved=False)


# --------------------------------------------------------------------------------------------
# cache_batch_idx, cache_leftpad


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_new", [0, 1, 5])
@pytest.mark.parametrize("batch_cache", ["perm", "subset"])
@pytest.mark.parametrize("dev", DEVS)
def test_cache_batch_idx(dev, batch_cache, seqlen_new, causal):
    _need(dev, causal)
    case = build(dev, batch=4, layout="batch_idx", batch_cache=4 if batch_cache == "perm" else 7,
                 seqlen_new=seqlen_new, seqlen_q=2, rotary_dim=16 if seqlen_new else 0)
    run_case(dev, case, causal)


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_new", [0, 1, 5])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("dev", DEVS)
def test_cache_leftpad(dev, interleaved, seqlen_new, causal):
    _need(dev, causal)
    case = build(dev, batch=4, leftpad=True, seqlen_new=seqlen_new, seqlen_q=3,
                 rotary_dim=32 if seqlen_new else 0)
    run_case(dev, case, causal, rotary_interleaved=interleaved)


@pytest.mark.parametrize("dev", DEVS)
def test_cache_leftpad_with_batch_idx(dev):
    _need(dev, True)
    case = build(dev, layout="batch_idx", leftpad=True, seqlen_new=2, seqlen_q=2, rotary_dim=16)
    run_case(dev, case, causal=True)


# --------------------------------------------------------------------------------------------
# cache_seqlens as an int or an int32 tensor; num_splits; return_softmax_lse


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("dev", DEVS)
def test_cache_seqlens_int_equals_tensor(dev, causal):
    _need(dev, causal)
    case = build(dev, seqlens="int", seqlen_values=13, seqlen_new=3, seqlen_q=2, rotary_dim=16)
    as_int = run_case(dev, case, causal)
    batch = case.inputs["q"].shape[0]
    case.inputs["cache_seqlens"] = torch.full((batch,), 13, dtype=torch.int32, device=dev.device)
    as_tensor = run_case(dev, case, causal)
    assert_close_to_rounding(as_tensor[0], as_int[0], "out")
    assert_close_to_rounding(as_tensor[1], as_int[1], "lse")
    _assert_same_bits(as_tensor[2], as_int[2], "k_cache")
    _assert_same_bits(as_tensor[3], as_int[3], "v_cache")


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dev", DEVS)
def test_num_splits(dev, layout):
    _need(dev, True)
    case = build(dev, layout=layout, page_size=64, cache_len=300, seqlen_new=1, seqlen_q=1, rotary_dim=16,
                 seqlen_values=[250, 63])
    results = [run_case(dev, case, causal=True, num_splits=n) for n in (0, 1, 3)]
    for n, other in zip((1, 3), results[1:]):
        _assert_splits_agree(dev, case, True, other, results[0], f"num_splits={n} vs 0")
        _assert_same_bits(other[2], results[0][2], f"k_cache (num_splits={n} vs 0)")
        _assert_same_bits(other[3], results[0][3], f"v_cache (num_splits={n} vs 0)")


def _assert_splits_agree(dev: Dev, case: Case, causal: bool, got, want, what: str) -> None:
    """Two split counts of one case: caches bit-identical; lse (float32 throughout) equal up to
    float32 rounding; out on the CPU path equal up to rounding, on the GPU within 2x the
    low-precision reference's error (each split rounds its probabilities to bfloat16/float16
    against its own running maximum, so the outputs differ by more than a last rounding)."""
    _assert_same_bits(got[2], want[2], f"k_cache ({what})")
    _assert_same_bits(got[3], want[3], f"v_cache ({what})")
    assert_close_to_rounding(got[1], want[1], f"lse ({what})")
    if not dev.cuda:
        assert_close_to_rounding(got[0], want[0], f"out ({what})")
        return
    ref = kvcache_attention(**_clone(case.inputs), causal=causal)[0].float()
    ref32 = kvcache_attention(**_clone(case.inputs, torch.float32), causal=causal)[0]
    bound = 2 * (ref - ref32).abs().max().item() + ROUNDING_TERM
    diff = (got[0].float() - want[0].float()).abs().max().item()
    assert diff <= bound, f"out ({what}): differs by {diff:.3e}, more than 2x the reference's error ({bound:.3e})"


@pytest.mark.parametrize("dev", DEVS)
def test_return_softmax_lse(dev):
    _need(dev, False)
    case = build(dev, batch=2, seqlen_q=3, group=4, seqlen_new=2)
    out = flash_cute.flash_attn_with_kvcache(**_clone(case.inputs))
    assert isinstance(out, torch.Tensor), f"return_softmax_lse=False must return a tensor, got {type(out).__name__}"
    assert out.shape == case.inputs["q"].shape
    pair = flash_cute.flash_attn_with_kvcache(**_clone(case.inputs), return_softmax_lse=True)
    assert isinstance(pair, tuple) and len(pair) == 2
    out2, lse = pair
    assert lse.shape == (2, 8, 3) and lse.dtype == torch.float32 and lse.device == out2.device
    assert_close_to_rounding(out2, out, "out (with and without return_softmax_lse)")


# --------------------------------------------------------------------------------------------
# Bad inputs


def _small(dev):
    d = dev.d
    dtype, device = dev.dtype, dev.device
    q = torch.randn(1, 1, 2, d).to(dtype).to(device)
    cache_shape = (3, 16, 2, d)
    k_cache = torch.randn(cache_shape).to(dtype).to(device)
    return dict(q=q, k_cache=k_cache, v_cache=k_cache.clone())


def _i32(*values, device="cpu", dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=device)


BAD_DTYPES = ["cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table"]


@pytest.mark.parametrize("name", BAD_DTYPES)
@pytest.mark.parametrize("dev", DEVS)
def test_int64_index_tensors_rejected(dev, name):
    """The official package takes int32 index tensors only (the reference is laxer)."""
    args = _small(dev)
    dev_ = dev.device
    args["cache_seqlens"] = _i32(4, device=dev_)
    if name == "cache_batch_idx":
        args["cache_batch_idx"] = _i32(2, device=dev_, dtype=torch.int64)
    elif name == "cache_leftpad":
        args["cache_leftpad"] = _i32(1, device=dev_, dtype=torch.int64)
    elif name == "block_table":
        args["block_table"] = _i32(2, 0, device=dev_, dtype=torch.int64).view(1, 2)
    else:
        args["cache_seqlens"] = _i32(4, device=dev_, dtype=torch.int64)
    with pytest.raises(FlashAttnTypeError, match=rf"\b{name}\b") as info:
        flash_cute.flash_attn_with_kvcache(**args)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("other", ["cache_batch_idx", "cache_leftpad"])
@pytest.mark.parametrize("dev", DEVS)
def test_paged_rejects_batch_idx_and_leftpad(dev, other):
    args = _small(dev)
    args["block_table"] = _i32(2, 0, device=dev.device).view(1, 2)
    args["cache_seqlens"] = _i32(4, device=dev.device)
    args[other] = _i32(1, device=dev.device)
    with pytest.raises(RuntimeError, match=rf"\b{other}\b") as info:
        flash_cute.flash_attn_with_kvcache(**args)
    assert isinstance(info.value, (FlashAttnValueError, FlashAttnNotImplementedError)), type(info.value)
    assert "block_table" in str(info.value)


@pytest.mark.parametrize("dev", DEVS)
def test_append_argument_rules(dev):
    args = _small(dev)
    k = torch.randn(1, 1, 2, dev.d).to(dev.dtype).to(dev.device)
    with pytest.raises(FlashAttnValueError):  # k without v
        flash_cute.flash_attn_with_kvcache(**args, k=k, cache_seqlens=_i32(1, device=dev.device))
    with pytest.raises(FlashAttnValueError, match=r"\bcache_seqlens\b"):  # an append needs cache_seqlens
        flash_cute.flash_attn_with_kvcache(**args, k=k, v=k.clone())


OPTIONS = [dict(window_size=(1, 0)), dict(window_size=(2, 2)), dict(softcap=0.5), dict(alibi_slopes="heads"),
           dict(alibi_slopes="batch_heads", softcap=2.0, window_size=(6, 1))]
OPTION_IDS = ["window_causal", "window", "softcap", "alibi", "alibi_batch+softcap+window"]


def _option_values(option: dict, case: Case) -> dict:
    batch, _, nheads, _ = case.inputs["q"].shape
    alibi = option.get("alibi_slopes")
    if isinstance(alibi, str):
        shape = (nheads,) if alibi == "heads" else (batch, nheads)
        option = dict(option, alibi_slopes=torch.rand(shape, dtype=torch.float32).to(case.inputs["q"].device))
    return option


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dev", DEVS)
def test_options(dev, option, rotary):
    """softcap, local windows and ALiBi against the reference with the same option (rotary
    queries are positional when local, as causal): the CPU path, and on the GPU the split-KV
    kernel (seqlen_q 3, group 4: 12 packed rows)."""
    _need(dev, False)
    case = build(dev, batch=3, seqlen_q=3, group=4, cache_len=40, seqlen_new=2, rotary_dim=16 if rotary else 0)
    run_case(dev, case, **_option_values(option, case))


def test_rotary_table_too_short_for_causal_queries():
    """With causal, query row i is rotated at cache_seqlens + i: a table that covers the cache but
    not the query rows past it is rejected with an error naming rotary_cos (not an IndexError)."""
    q = torch.randn(1, 4, 2, 32)
    k_cache, v_cache = torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32)
    k, v = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32)
    angles = torch.rand(16, 8)
    with pytest.raises(flash_cute.FlashAttnValueError, match=r"\brotary_cos\b"):
        flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, angles.cos(), angles.sin(),
                                           cache_seqlens=15, causal=True)
    longer = torch.rand(19, 8)
    flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, longer.cos(), longer.sin(),
                                       cache_seqlens=15, causal=True)


# --------------------------------------------------------------------------------------------
# The split-KV kernel (CUDA): long caches and every split count, paged equals contiguous, CUDA
# graphs replayed while the cache grows, and the route to the forward kernel for long queries

# Beyond the development build's bf16 d64/d128: each decode tile shape (4 warps x 4 stages up to
# d96, 4 x 3 at d128, 2 warps above) and head dims that are not a bucket.
CUDA_DEVS = [p for p in DEVS if p.values[0].cuda] + [
    pytest.param(Dev("cuda", dtype, d), id=f"cuda-{name}-d{d}", marks=pytest.mark.cuda)
    for dtype, name, d in ((torch.float16, "fp16", 32), (torch.float16, "fp16", 100), (torch.bfloat16, "bf16", 200),
                           (torch.float16, "fp16", 256))
]


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("dev", CUDA_DEVS)
def test_splits_on_a_long_cache(dev, group, seqlen_q, causal):
    """Every split count, from none to more splits than key blocks, matches the oracle and the
    unsplit result within rounding; rows of 2099, 0, 517 and 16 cached keys plus one new."""
    _need(dev, causal)
    case = build(dev, batch=4, seqlen_q=seqlen_q, group=group, cache_len=2100, seqlen_new=1, rotary_dim=16,
                 seqlen_values=[2099, 0, 517, 16])
    unsplit = run_case(dev, case, causal, num_splits=1)
    for n in (2, 5, 16, 128, 0):
        _assert_splits_agree(dev, case, causal, run_case(dev, case, causal, num_splits=n), unsplit, f"num_splits={n} vs 1")


def _as_paged(case: Case, page_size: int):
    """The contiguous case's cache rows laid out in pages of page_size, in a random page order,
    with 2 pages no row owns (NaN)."""
    inputs = dict(case.inputs)
    k_cache, v_cache = inputs["k_cache"], inputs["v_cache"]
    batch, cache_len = k_cache.shape[:2]
    pages = -(-cache_len // page_size)
    num_pages = batch * pages + 2
    table = torch.randperm(num_pages, device=k_cache.device)[: batch * pages].view(batch, pages)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        padded = torch.full((batch, pages * page_size, *cache.shape[2:]), math.nan, dtype=cache.dtype,
                            device=cache.device)
        padded[:, :cache_len] = cache
        paged = torch.full((num_pages, page_size, *cache.shape[2:]), math.nan, dtype=cache.dtype, device=cache.device)
        paged[table.flatten()] = padded.view(batch * pages, page_size, *cache.shape[2:])
        inputs[name] = paged
    inputs["block_table"] = table.to(torch.int32)
    return Case(inputs, case.seqlens, case.seqlen_new,
                lambda b, pos: (table[b].cpu().long()[pos // page_size], pos % page_size))


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("page_size", [16, 48, 256])
@pytest.mark.parametrize("dev", CUDA_DEVS)
def test_paged_equals_contiguous_bitwise(dev, page_size, causal):
    """The same keys read from pages and from contiguous rows give bit-identical results: the
    kernel visits the same key blocks in the same order either way."""
    _need(dev, causal)
    case = build(dev, batch=3, seqlen_q=2, group=4, cache_len=1000, seqlen_new=2, seqlen_values=[998, 331, 15])
    contiguous = run_case(dev, case, causal, num_splits=3)
    paged = run_case(dev, _as_paged(case, page_size), causal, num_splits=3)
    _assert_same_bits(paged[0], contiguous[0], "out (paged vs contiguous)")
    _assert_same_bits(paged[1], contiguous[1], "lse (paged vs contiguous)")


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dev", CUDA_DEVS[:1])
def test_cuda_graph_replays_as_the_cache_grows(dev, layout):
    """One decoding step captured in a CUDA graph (num_splits=0: the heuristic) and replayed while
    cache_seqlens grow in place, across split boundaries: every replay matches the oracle on the
    inputs of that step, appends where it should, and equals an eager call bit for bit."""
    _need(dev, True)
    case = build(dev, batch=2, seqlen_q=1, group=8, cache_len=3000, seqlen_new=1, layout=layout, page_size=16,
                 rotary_dim=16, seqlen_values=[100, 7])
    static = case.inputs
    kwargs = dict(causal=True, return_softmax_lse=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (caches the split count, opts in to the shared memory)
        flash_cute.flash_attn_with_kvcache(**_clone(static), **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = flash_cute.flash_attn_with_kvcache(**static, **kwargs)

    seqlens = list(case.seqlens)
    for step_seqlens in ([100, 7], [101, 8], [1500, 1999], [2998, 64]):
        static["cache_seqlens"].copy_(torch.tensor(step_seqlens, dtype=torch.int32))
        for name in ("q", "k", "v"):
            static[name].copy_(torch.randn(static[name].shape, dtype=torch.float32).to(static[name].dtype))
        # Keys below the new lengths that no earlier step wrote get numbers (the rest stay NaN).
        for b, (old, new) in enumerate(zip(seqlens, step_seqlens)):
            if new > old + 1:
                r, c = case.where(b, torch.arange(old + 1, new))
                for name in ("k_cache", "v_cache"):
                    static[name][r, c] = torch.randn(len(r), *static[name].shape[2:]).to(static[name].dtype).to(
                        static[name].device)
        seqlens = step_seqlens
        eager = run_case(dev, Case(_clone(static), step_seqlens, 1, case.where), causal=True)
        before = _clone(static)
        graph.replay()
        ref_out, ref_lse = kvcache_attention(**_clone(before, torch.float32), causal=True)
        err = (out.float() - ref_out).abs().max().item()
        assert not out.isnan().any() and err < 5e-2, f"step {step_seqlens}: error {err:.3e} against the oracle"
        _assert_same_bits(out, eager[0], f"out (graph replay vs eager) at cache_seqlens {step_seqlens}")
        _assert_same_bits(lse, eager[1], f"lse (graph replay vs eager) at cache_seqlens {step_seqlens}")
        _assert_same_bits(static["k_cache"], eager[2], f"k_cache after the replay at {step_seqlens}")
        _assert_same_bits(static["v_cache"], eager[3], f"v_cache after the replay at {step_seqlens}")


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dev", CUDA_DEVS[:1])
def test_kernel_route(dev, layout, causal, monkeypatch):
    """Up to 64 packed query rows (seqlen_q * nheads / nheads_k) run the split-KV kernel; more run
    the forward kernel over the cache rows; both match the oracle."""
    _need(dev, causal)
    import flash_cute.flash_attn_interface as interface

    calls = []
    decode = interface._ops.decode_eager
    monkeypatch.setattr(interface._ops, "decode_eager", lambda *a, **k: calls.append(1) or decode(*a, **k))
    for seqlen_q, expect in ((16, 1), (17, 0)):  # group 4: 64 and 68 packed rows
        calls.clear()
        case = build(dev, batch=2, seqlen_q=seqlen_q, group=4, cache_len=300, seqlen_new=3, layout=layout,
                     page_size=64)
        run_case(dev, case, causal)
        assert len(calls) == expect, f"seqlen_q={seqlen_q}: split-KV kernel ran {len(calls)} times, expected {expect}"


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dev", CUDA_DEVS[:1])
def test_opcheck_decode(dev, paged):
    """torch.library.opcheck of flash_cute::decode (the split-KV op, appending k/v in place): the
    schema's mutations, the fake implementation and the AOT dispatch."""
    _need(dev, True)
    case = build(dev, batch=2, seqlen_q=2, group=4, cache_len=200, seqlen_new=2, layout="paged" if paged else "contiguous",
                 page_size=16)
    x = case.inputs
    args = (x["q"], x["k_cache"], x["v_cache"], x["k"], x["v"], 0.125, True, 0, 2, x["cache_seqlens"], None, None,
            x.get("block_table"), 3)
    torch.library.opcheck(torch.ops.flash_cute.decode.default, args)
