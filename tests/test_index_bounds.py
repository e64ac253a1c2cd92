"""Out-of-range index values on CUDA with the index checks off (CHECK_INDEX_VALUES False) never make
flash_cute read or write outside its tensors, raise, or break the CUDA context; instead:

* flash_attn_varlen_func (contiguous k/v, pages of 16 and 256 rows): a bad sequence b (cu_seqlens_q[b] < 0,
  cu_seqlens_q[b + 1] < cu_seqlens_q[b] or > total_q, the same for cu_seqlens_k and k.shape[0]; paged:
  cu_seqlens_k decreasing, a used block_table entry outside [0, num_pages), more keys than its table row
  holds) gets NaN out and lse on its rows inside q (cu_seqlens_q[b] .. [b + 1] clamped to [0, total_q]); the
  other sequences match the fp32 oracle, forward and dq; the backward runs.
* flash_attn_with_kvcache (both routes, every cache layout): a bad batch row (cache_seqlens < 0 or past the
  capacity with the new rows, cache_batch_idx not a cache row, cache_leftpad < 0 or > cache_seqlens, a used
  block_table entry not a page) gets NaN out and lse; the other rows match the oracle and append; only the
  bad row's own cache slots may change. With CHECK_INDEX_VALUES on, exactly these calls are refused.
"""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

import flash_cute
import flash_cute.flash_attn_interface as interface
from flash_cute import FlashAttnValueError
from flash_cute.reference import kvcache_attention
from helpers import (
    ROUNDING_TERM,
    _assert_grads_within_2x,
    assert_2x_rule,
    assert_lse_matches,
    assert_varlen_2x_rule,
    cu_seqlens_of,
    make_qkv,
    poison_allocator,
    require_bwd_kernel,
    require_kernel,
    varlen_call_bytes,
    varlen_naive_grads,
)

pytestmark = pytest.mark.cuda

D = 128
BF16 = torch.bfloat16
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
CAUSAL = [pytest.param(False, id="full"), pytest.param(True, id="causal")]
SENTINEL = 0x7FA5  # the bits of the caches' guard regions: a NaN with a payload in bf16 and fp16


# --------------------------------------------------------------------------------------------
# Shared helpers


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test's node id: fresh, reproducible inputs per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def unchecked(monkeypatch):
    """CUDA index values not checked on the host, as without FLASH_CUTE_CHECK_INDICES."""
    monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", False)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype).to("cuda")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_unchanged(snapshot) -> None:
    """snapshot: [(name, tensor, its clone before the call)]: inputs keep their bits."""
    for name, t, before in snapshot:
        assert _same_bits(t, before), f"{name} was modified"


def _assert_context_healthy(dtype, causal) -> None:
    """The call left the CUDA context usable: pending work completes (an illegal address or a
    device-side assert would raise here) and an ordinary call gives the right result."""
    torch.cuda.synchronize()
    q, k, v = make_qkv(2, 65, 97, 4, 2, D, dtype, "cuda")
    assert_2x_rule(flash_cute.flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# flash_attn_varlen_func

LENS_Q = (70, 130, 1, 95)  # cu_seqlens_q (0, 70, 200, 201, 296)
LENS_K = (150, 64, 33, 300)  # cu_seqlens_k (0, 150, 214, 247, 547); 300 keys take 2 pages of 256
NHEADS, NHEADS_K = 4, 2
PAGE_SIZES = {"contiguous": 0, "paged16": 16, "paged256": 256}
ANY, CONTIGUOUS, PAGED = tuple(PAGE_SIZES), ("contiguous",), ("paged16", "paged256")


class VarlenCase(NamedTuple):
    id: str
    layouts: tuple
    # ("cu_q" | "cu_k", {index: value}); ("page", b, value): the last block_table entry that
    # sequence b uses ("num_pages": the first past the cache); ("narrow", b): the block_table cut
    # to one column fewer than sequence b needs
    edit: tuple | None
    bad: tuple  # the sequences the edit makes bad


# The good sequences' rows stay apart from each other's and the bad one's (their keys may overlap).
VARLEN_CASES = [
    VarlenCase("all-good", ANY, None, ()),
    VarlenCase("q-start-negative", ANY, ("cu_q", {0: -5}), (0,)),
    VarlenCase("q-decreasing", ANY, ("cu_q", {0: 201, 1: 296, 2: 0, 3: 70, 4: 200}), (1,)),  # rows of 0, 2, 3 disjoint
    VarlenCase("q-end-past-q", ANY, ("cu_q", {4: 303}), (3,)),
    VarlenCase("q-end-int32-max", ANY, ("cu_q", {4: INT32_MAX}), (3,)),
    VarlenCase("k-start-negative", CONTIGUOUS, ("cu_k", {0: -1}), (0,)),
    VarlenCase("k-decreasing", ANY, ("cu_k", {2: 100, 3: 133, 4: 433}), (1,)),  # 2 and 3 keep their lengths
    VarlenCase("k-end-past-k", CONTIGUOUS, ("cu_k", {4: 548}), (3,)),
    VarlenCase("k-end-int32-max", CONTIGUOUS, ("cu_k", {4: INT32_MAX}), (3,)),
    VarlenCase("page-past-end", PAGED, ("page", 2, "num_pages"), (2,)),
    VarlenCase("page-negative", PAGED, ("page", 2, -1), (2,)),
    VarlenCase("page-int32-max", PAGED, ("page", 0, INT32_MAX), (0,)),
    VarlenCase("keys-past-table", PAGED, ("narrow", 3), (3,)),
]
VARLEN_PARAMS = [pytest.param(case, layout, id=f"{layout}-{case.id}")
                 for case in VARLEN_CASES for layout in case.layouts]
BACKWARD_CASES = [pytest.param(c, id=c.id) for c in VARLEN_CASES
                  if c.id in ("q-decreasing", "q-end-past-q", "q-end-int32-max", "k-decreasing", "k-end-past-k",
                              "k-end-int32-max")]


def _paged_kv(gen, dtype, x, edit):
    """k, v as caches of x.page-row pages in random order with the block_table; a table row's
    columns past the pages its sequence uses hold junk (-1, INT32_MAX, ...), which must have no
    effect. Every slot is finite but those past a good sequence's keys in its last page (NaN: a
    stray read shows in its output); a bad sequence's pages are finite: its NaN rows are written."""
    page = x.page
    used = [-(-n // page) for n in LENS_K]
    x.num_pages = sum(used) + 2
    perm = torch.randperm(x.num_pages, generator=gen).tolist()
    junk = [-1, INT32_MAX, x.num_pages, INT32_MIN]
    table = [[junk[(b + j) % len(junk)] for j in range(max(used) + 1)] for b in range(len(LENS_K))]
    for b, u in enumerate(used):
        table[b][:u] = perm[sum(used[:b]): sum(used[:b]) + u]
    x.k, x.v = (_randn(gen, x.num_pages, page, NHEADS_K, D, dtype=dtype) for _ in range(2))
    for b, (n, u) in enumerate(zip(LENS_K, used)):
        if b not in x.bad:
            x.k[table[b][u - 1], n - (u - 1) * page:] = math.nan
            x.v[table[b][u - 1], n - (u - 1) * page:] = math.nan
    if edit and edit[0] == "page":
        _, b, value = edit
        table[b][used[b] - 1] = x.num_pages if value == "num_pages" else value
    if edit and edit[0] == "narrow":
        table = [row[: used[edit[1]] - 1] for row in table]
    x.table = torch.tensor(table, dtype=torch.int32, device="cuda")


def _varlen_inputs(gen, dtype, layout, case: VarlenCase):
    """q, k, v (paged: caches and block_table) and cu_seqlens for LENS_Q, LENS_K with the case's
    edit applied; cu_q, cu_k also as Python lists."""
    x = SimpleNamespace(page=PAGE_SIZES[layout], bad=set(case.bad), table=None)
    x.cu_q, x.cu_k = cu_seqlens_of(LENS_Q).tolist(), cu_seqlens_of(LENS_K).tolist()
    if case.edit and case.edit[0] in ("cu_q", "cu_k"):
        for i, value in case.edit[1].items():
            (x.cu_q if case.edit[0] == "cu_q" else x.cu_k)[i] = value
    x.q = _randn(gen, sum(LENS_Q), NHEADS, D, dtype=dtype)
    if x.page:
        _paged_kv(gen, dtype, x, case.edit)
    else:
        x.k, x.v = (_randn(gen, sum(LENS_K), NHEADS_K, D, dtype=dtype) for _ in range(2))
    x.cu_q_t, x.cu_k_t = (torch.tensor(cu, dtype=torch.int32, device="cuda") for cu in (x.cu_q, x.cu_k))
    return x


def _varlen_call(x, q, k, v, **kwargs):
    """The size hints are those of the good batch (LENS_Q, LENS_K), as a caller would pass."""
    return flash_cute.flash_attn_varlen_func(q, k, v, x.cu_q_t, x.cu_k_t, max(LENS_Q), max(LENS_K),
                                             block_table=x.table, **kwargs)


def _keys_of(x, b):
    """The keys and values of good sequence b."""
    start, end = x.cu_k[b], x.cu_k[b + 1]
    if not x.page:
        return x.k[start:end], x.v[start:end]
    j = torch.arange(end - start, device="cuda")
    pages = x.table[b].long()[j // x.page]
    return x.k[pages, j % x.page], x.v[pages, j % x.page]


def _good_batch(x):
    """The good sequences as a varlen batch of their own (rows: their slices of q)."""
    good = [b for b in range(len(LENS_Q)) if b not in x.bad]
    rows = [slice(x.cu_q[b], x.cu_q[b + 1]) for b in good]
    keys = [_keys_of(x, b) for b in good]
    return SimpleNamespace(
        rows=rows, q=torch.cat([x.q[r] for r in rows]),
        k=torch.cat([k for k, _ in keys]), v=torch.cat([v for _, v in keys]),
        cu_q=cu_seqlens_of([r.stop - r.start for r in rows], "cuda"),
        cu_k=cu_seqlens_of([len(k) for k, _ in keys], "cuda"),
    )


def _take(t, rows, dim=0):
    """The rows (slices along dim) of t, concatenated."""
    return torch.cat([t[(slice(None),) * dim + (r,)] for r in rows], dim)


def _assert_bad_rows_nan(x, out, lse) -> None:
    """A bad sequence's rows of out inside q (cu_seqlens_q[b] .. cu_seqlens_q[b + 1] clamped to
    [0, total_q]) and their lse are NaN."""
    total = x.q.shape[0]
    for b in sorted(x.bad):
        lo, hi = (min(max(x.cu_q[i], 0), total) for i in (b, b + 1))
        assert out[lo:hi].isnan().all(), f"bad sequence {b}: out rows {lo}..{hi} are not all NaN"
        assert lse[:, lo:hi].isnan().all(), f"bad sequence {b}: lse rows {lo}..{hi} are not all NaN"


def _assert_good_sequences_match(x, out, lse, causal) -> None:
    """The good sequences' out (2x rule) and lse against the per-sequence fp32 oracle."""
    g = _good_batch(x)
    _, ref_lse = assert_varlen_2x_rule(_take(out, g.rows), g.q, g.k, g.v, g.cu_q, g.cu_k, causal=causal)
    assert_lse_matches(_take(lse, g.rows, dim=1), ref_lse)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,layout", VARLEN_PARAMS)
@pytest.mark.usefixtures("unchecked")
def test_varlen_bad_sequence_gets_nan(case, layout, dtype, causal, gen):
    """On zeroed memory: the bad sequence's rows in q are NaN (written), the others match the
    oracle, the inputs keep their bits, and the context is healthy."""
    require_kernel(dtype, D, causal)
    x = _varlen_inputs(gen, dtype, layout, case)
    snapshot = [(n, t, t.clone()) for n, t in (("q", x.q), ("k", x.k), ("v", x.v), ("cu_seqlens_q", x.cu_q_t),
                                               ("cu_seqlens_k", x.cu_k_t), ("block_table", x.table)) if t is not None]
    poison_allocator(varlen_call_bytes(x.q, x.k, x.v, len(LENS_Q), max(LENS_K)), byte=0)
    out, lse, _ = _varlen_call(x, x.q, x.k, x.v, causal=causal, return_attn_probs=True)
    torch.cuda.synchronize()
    _assert_bad_rows_nan(x, out, lse)
    _assert_good_sequences_match(x, out, lse, causal)
    _assert_unchanged(snapshot)
    _assert_context_healthy(dtype, causal)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.usefixtures("unchecked")
def test_varlen_backward_with_bad_sequence(case, dtype, causal, gen):
    """The backward of a call with a bad sequence (cu_seqlens decreasing or past the end) runs;
    the good sequences' dq rows match the oracle (2x rule), except where cu_seqlens_q decreases:
    the sequences' rows of the backward's workspace then overlap, and only staying inside the
    tensors is promised (docs/errors.md)."""
    require_bwd_kernel(dtype, D, causal)
    x = _varlen_inputs(gen, dtype, "contiguous", case)
    leaves = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
    out = _varlen_call(x, *leaves, causal=causal)
    dout = _randn(gen, *out.shape, dtype=dtype)
    dq, _, _ = torch.autograd.grad(out, leaves, dout)
    torch.cuda.synchronize()
    if case.id == "q-decreasing":
        _assert_context_healthy(dtype, causal)
        return
    g = _good_batch(x)
    dout_g = _take(dout, g.rows)
    ref = varlen_naive_grads(g.q, g.k, g.v, dout_g, g.cu_q, g.cu_k, causal=causal)
    pt = varlen_naive_grads(g.q, g.k, g.v, dout_g, g.cu_q, g.cu_k, causal=causal, dtype=dtype)
    _assert_grads_within_2x((_take(dq, g.rows),), ref[:1], pt[:1], (g.q,), torch.float32)
    _assert_context_healthy(dtype, causal)


# --------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: batch of 3, batch row 1 the bad one


class Route(NamedTuple):
    id: str
    seqlen_q: int
    nheads: int
    nheads_k: int
    num_splits: int
    causal: bool


# Up to 64 packed query rows (seqlen_q * nheads / nheads_k) per KV head run the split-KV kernel,
# more the forward kernel, except with cache_leftpad or 16-row pages (the split-KV kernel's).
KV_ROUTES = [
    Route("decode-auto-splits", 1, 8, 2, 0, True),
    Route("decode-1-split", 1, 8, 2, 1, True),
    Route("decode-4-splits", 1, 8, 2, 4, True),
    Route("long-query", 100, 2, 2, 0, False),
    Route("long-query-causal", 100, 2, 2, 0, True),
]
CACHE_LEN = 300  # contiguous caches (not a multiple of the forward kernel's key block)
KV_PAGES = {"paged16": (16, 20), "paged256": (256, 2)}  # page size, block_table columns
CACHE_ROWS = {"contiguous": 3, "batch_idx": 5, "leftpad": 3}
BATCH_IDX = (4, 1, 2)  # cache rows 0 and 3 belong to no batch row


class KvCase(NamedTuple):
    layout: str
    what: str
    field: str | None  # the index tensor whose value for batch row 1 is spoilt (None: all good)
    value: int | str | None  # "past": the first value past its range (see _past)

    @property
    def id(self):
        return f"{self.layout}-{self.what}"


KV_CASES = [
    KvCase("contiguous", "all-good", None, None),
    KvCase("contiguous", "seqlens-negative", "cache_seqlens", -1),
    KvCase("contiguous", "seqlens-past-capacity", "cache_seqlens", "past"),
    KvCase("contiguous", "seqlens-int32-max", "cache_seqlens", INT32_MAX),
    KvCase("batch_idx", "all-good", None, None),
    KvCase("batch_idx", "past-end", "cache_batch_idx", "past"),
    KvCase("batch_idx", "negative", "cache_batch_idx", -1),
    KvCase("batch_idx", "int32-min", "cache_batch_idx", INT32_MIN),
    KvCase("leftpad", "all-good", None, None),
    KvCase("leftpad", "negative", "cache_leftpad", -1),
    KvCase("leftpad", "past-seqlens", "cache_leftpad", "past"),
] + [case for layout in KV_PAGES for case in (
    KvCase(layout, "all-good", None, None),
    KvCase(layout, "seqlens-negative", "cache_seqlens", -1),
    KvCase(layout, "seqlens-past-capacity", "cache_seqlens", "past"),
    KvCase(layout, "page-past-end", "block_table", "past"),
    KvCase(layout, "page-negative", "block_table", -1),
    KvCase(layout, "page-int32-max", "block_table", INT32_MAX),
)]


def _past(field, x, seqlens, capacity, seqlen_new):
    """The first value past the range of ``field`` for batch row 1."""
    return {"cache_seqlens": capacity - seqlen_new + 1, "cache_leftpad": seqlens[1] + 1,
            "cache_batch_idx": x.rows, "block_table": x.rows}[field]


def _slots(x, b, positions):
    """(dim 0, dim 1) cache indices of batch row b's positions (b's values in range)."""
    if x.page:
        return x.table[b].long()[positions // x.page], positions % x.page
    return torch.full_like(positions, b if x.idx is None else int(x.idx[b])), positions


def _guarded(values, guard):
    """values as a view into a buffer with ``guard`` cache rows (or pages) of SENTINEL bits on
    each side. Returns (buffer, cache)."""
    buf = torch.empty((values.shape[0] + 2 * guard, *values.shape[1:]), dtype=values.dtype, device="cuda")
    _bits(buf).fill_(SENTINEL)
    buf[guard: guard + values.shape[0]] = values
    return buf, buf[guard: guard + values.shape[0]]


def _kvcache_inputs(gen, case: KvCase, route: Route, seqlen_new: int):
    """q, guarded caches, new rows and index tensors. Row 0 fills its cache to the last slot, row
    2 is shorter (paged: junk in its unused block_table columns), row 1 is spoilt by the case. The
    caches are finite but for the good rows' slots they must not read (before cache_leftpad, from
    cache_seqlens on: NaN); the bad row's slots are finite, so its NaN output is written."""
    batch, nheads_k = 3, route.nheads_k
    x = SimpleNamespace(bad=None if case.field is None else 1, idx=None, table=None, page=0)
    if case.layout in KV_PAGES:
        x.page, width = KV_PAGES[case.layout]
        capacity, x.rows, x.guard = x.page * width, batch * width + 3, 2
    else:
        capacity, x.rows, x.guard = CACHE_LEN, CACHE_ROWS[case.layout], 1
    seqlens = [capacity - seqlen_new, capacity // 2, int(torch.randint(2, capacity // 2 - 3, (), generator=gen))]
    pads = [7, seqlens[1] // 2, int(torch.randint(0, seqlens[2], (), generator=gen))]
    index = {}
    if x.page:
        perm = torch.randperm(x.rows, generator=gen)[: batch * width].view(batch, width)
        used2 = -(-(seqlens[2] + seqlen_new) // x.page)
        perm[2, used2:] = torch.tensor([-1, INT32_MAX, INT32_MIN, x.rows] * width)[: width - used2]
        index["block_table"] = perm.to(torch.int32)
    if case.layout == "batch_idx":
        index["cache_batch_idx"] = torch.tensor(BATCH_IDX, dtype=torch.int32)
    if case.layout == "leftpad":
        index["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32)
    index["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32)
    if case.field is not None:
        value = _past(case.field, x, seqlens, capacity, seqlen_new) if case.value == "past" else case.value
        column = (seqlens[1] + seqlen_new - 1) // x.page if x.page else 0  # row 1's last used page
        index[case.field][(1, column) if case.field == "block_table" else 1] = value
    x.index = {n: t.to("cuda") for n, t in index.items()}
    x.idx, x.table = x.index.get("cache_batch_idx"), x.index.get("block_table")

    shape = (x.rows, x.page or capacity, nheads_k, D)
    values = [_randn(gen, *shape, dtype=BF16) for _ in range(2)]
    for b in range(batch):
        if b == x.bad:
            continue
        end = -(-(seqlens[b] + seqlen_new) // x.page) * x.page if x.page else capacity
        pad = pads[b] if case.layout == "leftpad" else 0
        r, c = _slots(x, b, torch.cat([torch.arange(0, pad), torch.arange(seqlens[b], end)]).to("cuda"))
        for t in values:
            t[r, c] = math.nan
    (x.k_buf, x.k_cache), (x.v_buf, x.v_cache) = (_guarded(t, x.guard) for t in values)
    x.before = (x.k_cache.clone(), x.v_cache.clone())
    x.q = _randn(gen, batch, route.seqlen_q, route.nheads, D, dtype=BF16)
    x.k = x.v = None
    if seqlen_new:
        x.k, x.v = (_randn(gen, batch, seqlen_new, nheads_k, D, dtype=BF16) for _ in range(2))
    return x


def _kvcache_call(x, route: Route):
    return flash_cute.flash_attn_with_kvcache(x.q, x.k_cache, x.v_cache, x.k, x.v, **x.index, causal=route.causal,
                                             num_splits=route.num_splits, return_softmax_lse=True)


def _assert_good_rows_match(x, route: Route, out, lse):
    """The good rows' out (2x rule: the reference in bf16 against the reference in fp32, both on
    the caches as they were before the call) and lse. Returns the caches the bf16 reference
    appended the good rows into: what the caches must hold outside the bad row's slots."""
    good = torch.tensor([b for b in range(3) if b != x.bad], device="cuda")
    index = {n: t[good] for n, t in x.index.items()}
    if x.table is None and "cache_batch_idx" not in index:  # batch row b reads cache row b: keep it so
        index["cache_batch_idx"] = good.to(torch.int32)
    new = (None, None) if x.k is None else (x.k[good], x.v[good])
    expected = tuple(t.clone() for t in x.before)
    ref, _ = kvcache_attention(x.q[good], *expected, *new, **index, causal=route.causal)
    f32 = [None if t is None else t.float() for t in (x.q[good], *x.before, *new)]
    ref32, ref32_lse = kvcache_attention(*f32, **index, causal=route.causal)
    got = out[good]
    assert not got.isnan().any(), "a good row's output has NaN (a NaN slot was read, or an element left unwritten)"
    err = (got.float() - ref32).abs().max().item()
    err_pt = (ref.float() - ref32).abs().max().item()
    assert err <= 2 * err_pt + ROUNDING_TERM, f"good rows: max error {err:.3e} exceeds 2 x bf16's ({err_pt:.3e})"
    assert_lse_matches(lse[good], ref32_lse, rtol=2e-2, atol=2e-2)
    return expected


def _bad_row_slots(x):
    """(dim 0, dim 1) mask of the bad row's own cache slots: its cache row, or the pages of its
    block_table row, where they are in range. Only these may change besides the good appends."""
    own = torch.zeros(x.k_cache.shape[:2], dtype=torch.bool, device="cuda")
    if x.bad is not None:
        refs = x.table[x.bad] if x.page else (x.idx[x.bad : x.bad + 1] if x.idx is not None else torch.tensor([x.bad]))
        refs = refs.long().to("cuda")
        own[refs[(refs >= 0) & (refs < x.rows)]] = True
    return own


def _assert_caches(x, expected) -> None:
    """The guards keep their sentinel bits; every slot but the bad row's own holds the expected
    content (the old one, plus the good rows' appended rows)."""
    own = _bad_row_slots(x)
    for name, buf, cache, want in zip(("k_cache", "v_cache"), (x.k_buf, x.v_buf), (x.k_cache, x.v_cache), expected):
        for side, guard in (("before", buf[: x.guard]), ("after", buf[-x.guard:])):
            assert (_bits(guard) == SENTINEL).all(), f"{name}: written {side} the cache tensor"
        assert _same_bits(cache[~own], want[~own]), f"{name}: slots other than the bad row's differ from the expected"


@pytest.mark.parametrize("seqlen_new", [0, 1, 3], ids=["no-append", "append1", "append3"])
@pytest.mark.parametrize("route", KV_ROUTES, ids=[r.id for r in KV_ROUTES])
@pytest.mark.parametrize("case", KV_CASES, ids=[c.id for c in KV_CASES])
@pytest.mark.usefixtures("unchecked")
def test_kvcache_bad_row_gets_nan(case, route, seqlen_new, gen):
    """On zeroed memory: out and lse of the bad row are NaN (written), the good rows match the
    oracle and their appends land, nothing outside the caches changes, the context is healthy.
    (bf16 only: the bounds logic does not depend on the dtype.)"""
    require_kernel(BF16, D, route.causal)
    x = _kvcache_inputs(gen, case, route, seqlen_new)
    snapshot = [(n, t, t.clone()) for n, t in (("q", x.q), ("k", x.k), ("v", x.v), *x.index.items()) if t is not None]
    poison_allocator(4 * (x.q.nbytes + x.k_cache.nbytes + x.v_cache.nbytes) + (8 << 20), byte=0)
    out, lse = _kvcache_call(x, route)
    torch.cuda.synchronize()
    if x.bad is not None:
        assert out[x.bad].isnan().all(), "the bad row's out is not all NaN"
        assert lse[x.bad].isnan().all(), "the bad row's lse is not all NaN"
    expected = _assert_good_rows_match(x, route, out, lse)
    _assert_caches(x, expected)
    _assert_unchanged(snapshot)
    _assert_context_healthy(BF16, route.causal)


# --------------------------------------------------------------------------------------------
# The same calls with CHECK_INDEX_VALUES on (FLASH_CUTE_CHECK_INDICES=1). test_robustness.py's
# test_bad_varlen_index_values_refused / test_bad_kvcache_index_values_refused check the messages
# and that a refused call leaves the caches alone; here: the checks refuse exactly the calls
# that the tables above call bad, and let the all-good ones (junk in unused columns) through.

CHECKED_PARAMS = (
    [pytest.param("varlen", case, layout, id=f"varlen-{layout}-{case.id}") for case in VARLEN_CASES
     for layout in case.layouts]
    + [pytest.param("kvcache", case, case.layout, id=f"kvcache-{case.id}") for case in KV_CASES]
)


@pytest.mark.parametrize("fn,case,layout", CHECKED_PARAMS)
def test_checked_mode_refuses_exactly_the_bad_calls(fn, case, layout, gen, monkeypatch):
    require_kernel(BF16, D, True)
    monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", True)
    if fn == "varlen":
        x = _varlen_inputs(gen, BF16, layout, case)
        bad = bool(case.bad)
        call = lambda: _varlen_call(x, x.q, x.k, x.v, causal=True)  # noqa: E731
    else:
        route = KV_ROUTES[0]
        x = _kvcache_inputs(gen, case, route, seqlen_new=3)
        bad = case.field is not None
        call = lambda: _kvcache_call(x, route)  # noqa: E731
    if bad:
        with pytest.raises(FlashAttnValueError):
            call()
    else:
        call()
        torch.cuda.synchronize()
