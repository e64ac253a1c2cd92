"""flash_cute.reference.kvcache_attention: the oracle for flash_attn_with_kvcache (CPU, float32).

Each test builds what the call must do by hand (which cache slots change, which keys each batch
row sees, where rotary puts each row) and checks the reference against flash_attn_func on those
keys, or against the same call on another layout of the same cache.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_cute
from flash_cute.reference import kvcache_attention

# GQA group size -> (nheads, nheads_k)
GROUPS = {1: (2, 2), 4: (8, 2), 8: (8, 1)}
DTYPE = torch.float32
TOL = dict(rtol=1e-5, atol=1e-5)


def _causal_ids(causal):
    return "causal" if causal else "full"


def randn(*shape):
    return torch.randn(*shape, dtype=DTYPE)


def rotary_tables(seqlen_ro, rotary_dim):
    """Random angles: (seqlen_ro, rotary_dim / 2) cos and sin tables, as flash_attn takes them."""
    angle = torch.rand(seqlen_ro, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    return torch.cos(angle).to(DTYPE), torch.sin(angle).to(DTYPE)


def rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding written independently of the reference, with complex numbers: row i of
    x (seqlen, heads, d) is multiplied pairwise by exp(i * angle[positions[i]]) on its first
    rotary_dim dims. Pairs are (2p, 2p + 1) interleaved, (p, p + rotary_dim / 2) otherwise."""
    r = 2 * cos.shape[-1]
    x64 = x.to(torch.float64)
    head, tail = x64[..., :r], x64[..., r:]
    if interleaved:
        z = torch.view_as_complex(head.reshape(*head.shape[:-1], r // 2, 2).contiguous())
    else:
        z = torch.complex(head[..., : r // 2], head[..., r // 2 :])
    # cos/sin are rounded tables, not exactly on the unit circle: use them as given.
    turn = torch.complex(cos[positions].to(torch.float64), sin[positions].to(torch.float64))
    z = z * turn[:, None, :]
    if interleaved:
        head = torch.view_as_real(z).flatten(-2)
    else:
        head = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((head, tail), dim=-1).to(x.dtype)


def attend(q_b, k_vis, v_vis, causal):
    """flash_attn_func on one batch row's visible keys: (out, lse) without the batch dim."""
    out, lse, _ = flash_cute.flash_attn_func(
        q_b[None], k_vis[None], v_vis[None], causal=causal, return_attn_probs=True
    )
    return out[0], lse[0]


def check_row(out, lse, b, q_b, k_vis, v_vis, causal):
    ref_out, ref_lse = attend(q_b, k_vis, v_vis, causal)
    torch.testing.assert_close(out[b], ref_out, **TOL)
    torch.testing.assert_close(lse[b], ref_lse, **TOL)


def seqlens_for(batch, cache_len, seqlen_new, low=0):
    return torch.randint(low, cache_len - seqlen_new + 1, (batch,), dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# (a) no append, no rotary: attention over the visible keys; (g) GQA; (h) seqlen_q 1 and > 1


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("seqlen_q", [1, 6])
def test_no_append_equals_flash_attn_func(seqlen_q, group, causal):
    nheads, nheads_k = GROUPS[group]
    batch, cache_len, d = 3, 40, 32
    q = randn(batch, seqlen_q, nheads, d)
    k_cache, v_cache = randn(batch, cache_len, nheads_k, d), randn(batch, cache_len, nheads_k, d)
    before = k_cache.clone(), v_cache.clone()
    seqlens = seqlens_for(batch, cache_len, 0, low=1)
    out, lse = kvcache_attention(q, k_cache, v_cache, cache_seqlens=seqlens, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32
    for b in range(batch):
        s = int(seqlens[b])
        check_row(out, lse, b, q[b], k_cache[b, :s], v_cache[b, :s], causal)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "no k/v: cache must not change"


def test_no_cache_seqlens_sees_whole_cache():
    q = randn(2, 3, 4, 16)
    k_cache, v_cache = randn(2, 9, 2, 16), randn(2, 9, 2, 16)
    out, lse = kvcache_attention(q, k_cache, v_cache, causal=True)
    for b in range(2):
        check_row(out, lse, b, q[b], k_cache[b], v_cache[b], True)


def test_causal_more_queries_than_visible_keys():
    """Bottom-right alignment: with 7 queries and 3 visible keys, the first 4 rows see nothing
    (output 0, lse +inf)."""
    q = randn(1, 7, 2, 16)
    k_cache, v_cache = randn(1, 10, 2, 16), randn(1, 10, 2, 16)
    out, lse = kvcache_attention(q, k_cache, v_cache, cache_seqlens=3, causal=True)
    check_row(out, lse, 0, q[0], k_cache[0, :3], v_cache[0, :3], True)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    assert torch.isposinf(lse[0, :, :4]).all() and torch.isfinite(lse[0, :, 4:]).all()


# --------------------------------------------------------------------------------------------
# (b) appends write exactly the target slots; invisible slots are never read


def _layout(layout, batch, cache_len, nheads_k, d, page_size=8):
    """Caches poisoned with NaN, and how to address them: returns (k_cache, v_cache, kwargs,
    where) with where(b, positions) -> (dim-0 indices, dim-1 indices) of those logical positions."""
    if layout == "paged":
        pages = cache_len // page_size
        num_pages = batch * pages + 3  # 3 pages no row owns
        block_table = torch.randperm(num_pages, dtype=torch.int32)[: batch * pages].view(batch, pages)
        shape = (num_pages, page_size, nheads_k, d)
        kwargs = dict(block_table=block_table)

        def where(b, pos):
            return block_table[b].long()[pos // page_size], pos % page_size
    else:
        batch_cache = batch if layout == "contiguous" else 2 * batch
        shape = (batch_cache, cache_len, nheads_k, d)
        idx = None if layout == "contiguous" else torch.randperm(batch_cache, dtype=torch.int32)[:batch]
        kwargs = dict(cache_batch_idx=idx)

        def where(b, pos):
            row = b if idx is None else int(idx[b])
            return torch.full_like(pos, row), pos
    nan = torch.full(shape, math.nan, dtype=DTYPE)
    return nan, nan.clone(), kwargs, where


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
def test_append_writes_only_target_slots(layout, rotary):
    batch, cache_len, nheads, nheads_k, d, seqlen_q, seqlen_new = 3, 32, 4, 2, 32, 4, 4
    k_cache, v_cache, kwargs, where = _layout(layout, batch, cache_len, nheads_k, d)
    seqlens = seqlens_for(batch, cache_len, seqlen_new)
    seqlens[0] = 0  # an empty cache row: only the new keys are visible
    leftpad = None
    if layout != "paged":  # (flash_attn: no leftpad with a paged cache)
        leftpad = torch.stack([torch.randint(0, int(s) + 1, ()) for s in seqlens]).to(torch.int32)
    # Only the visible old entries p .. s - 1 hold numbers; everything else is NaN, so a read of
    # any other slot (or of a target slot before it is written) poisons the output.
    for b in range(batch):
        p = 0 if leftpad is None else int(leftpad[b])
        rows, cols = where(b, torch.arange(p, int(seqlens[b])))
        k_cache[rows, cols] = randn(len(rows), nheads_k, d)
        v_cache[rows, cols] = randn(len(rows), nheads_k, d)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = randn(batch, seqlen_q, nheads, d)
    k, v = randn(batch, seqlen_new, nheads_k, d), randn(batch, seqlen_new, nheads_k, d)
    inputs = q.clone(), k.clone(), v.clone()
    cos, sin = rotary_tables(cache_len, 16) if rotary else (None, None)

    out, lse = kvcache_attention(
        q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens, cache_leftpad=leftpad, causal=True, **kwargs
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "a slot outside p .. s + n - 1 was read"
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), inputs)), "q, k, v must not be modified"

    target = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b in range(batch):
        positions = int(seqlens[b]) + torch.arange(seqlen_new)
        rows, cols = where(b, positions)
        target[rows, cols] = True
        k_expected = rotate(k[b], cos, sin, positions, True) if rotary else k[b]
        torch.testing.assert_close(k_cache[rows, cols], k_expected, **TOL)
        assert torch.equal(v_cache[rows, cols], v[b])
    for name, after, before in (("k_cache", k_cache, before_k), ("v_cache", v_cache, before_v)):
        # Outside the targets: bit-identical, NaN included.
        rest_after, rest_before = after[~target], before[~target]
        same = (rest_after == rest_before) | (rest_after.isnan() & rest_before.isnan())
        assert same.all(), f"{name}: a slot outside the targets changed"


# --------------------------------------------------------------------------------------------
# (c) a paged cache equals the contiguous cache, appends crossing page boundaries


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_new", [1, 5, 70])
@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_equals_contiguous(page_size, seqlen_new, causal):
    batch, nheads, nheads_k, d, seqlen_q = 3, 4, 2, 32, 3
    pages = max(2, -(-(seqlen_new + 2 * page_size) // page_size))
    cache_len = pages * page_size
    k_contig, v_contig = randn(batch, cache_len, nheads_k, d), randn(batch, cache_len, nheads_k, d)
    num_pages = batch * pages + 2
    block_table = torch.randperm(num_pages, dtype=torch.int32)[: batch * pages].view(batch, pages)
    # Pages no row owns are NaN: reading or writing them would show.
    k_paged = torch.full((num_pages, page_size, nheads_k, d), math.nan, dtype=DTYPE)
    v_paged = k_paged.clone()
    for b in range(batch):
        for j in range(pages):
            k_paged[block_table[b, j]] = k_contig[b, j * page_size : (j + 1) * page_size]
            v_paged[block_table[b, j]] = v_contig[b, j * page_size : (j + 1) * page_size]
    seqlens = seqlens_for(batch, cache_len, seqlen_new)
    seqlens[0] = page_size - 2 if seqlen_new > 2 else page_size - 1  # ends at / crosses a boundary
    seqlens[1] = page_size  # starts on a fresh page
    q = randn(batch, seqlen_q, nheads, d)
    k, v = randn(batch, seqlen_new, nheads_k, d), randn(batch, seqlen_new, nheads_k, d)
    cos, sin = rotary_tables(cache_len, 16)
    common = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=causal)

    out, lse = kvcache_attention(q, k_contig, v_contig, k, v, **common)
    out_p, lse_p = kvcache_attention(q, k_paged, v_paged, k, v, block_table=block_table, **common)
    torch.testing.assert_close(out_p, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse_p, lse, rtol=0, atol=1e-6)
    gathered_k = k_paged[block_table.long()].flatten(1, 2)  # (batch, pages * page_size, ...)
    gathered_v = v_paged[block_table.long()].flatten(1, 2)
    assert torch.equal(gathered_k, k_contig) and torch.equal(gathered_v, v_contig)
    spare = torch.ones(num_pages, dtype=torch.bool)
    spare[block_table.long().flatten()] = False
    assert k_paged[spare].isnan().all() and v_paged[spare].isnan().all(), "a page no row owns was written"


# --------------------------------------------------------------------------------------------
# (d) rotary against an explicit rotation; (g) GQA; (h) seqlen_q 1 and > 1, causal and not


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("seqlen_q", [1, 5])
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("rotary_dim", [16, 64])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_rotary_matches_explicit_rotation(interleaved, rotary_dim, group, seqlen_q, causal):
    nheads, nheads_k = GROUPS[group]
    batch, cache_len, d, seqlen_new = 3, 24, 64, 3
    q = randn(batch, seqlen_q, nheads, d)
    k_cache, v_cache = randn(batch, cache_len, nheads_k, d), randn(batch, cache_len, nheads_k, d)
    old_k, old_v = k_cache.clone(), v_cache.clone()
    k, v = randn(batch, seqlen_new, nheads_k, d), randn(batch, seqlen_new, nheads_k, d)
    # Causal queries sit at s .. s + seqlen_q - 1: keep them inside the cos/sin tables.
    seqlens = seqlens_for(batch, cache_len, max(seqlen_new, seqlen_q))
    cos, sin = rotary_tables(cache_len, rotary_dim)

    out, lse = kvcache_attention(
        q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens, causal=causal, rotary_interleaved=interleaved
    )
    for b in range(batch):
        s = int(seqlens[b])
        new_pos = s + torch.arange(seqlen_new)
        k_full = torch.cat((old_k[b, :s], rotate(k[b], cos, sin, new_pos, interleaved)))
        v_full = torch.cat((old_v[b, :s], v[b]))
        q_pos = s + (torch.arange(seqlen_q) if causal else torch.zeros(seqlen_q, dtype=torch.long))
        check_row(out, lse, b, rotate(q[b], cos, sin, q_pos, interleaved), k_full, v_full, causal)
        if rotary_dim < d:  # dims past rotary_dim are copied as they are
            assert torch.equal(k_cache[b, new_pos, :, rotary_dim:], k[b, :, :, rotary_dim:])


def test_rotation_convention():
    """Rotating by 90 degrees: interleaved maps (x0, x1) -> (-x1, x0); GPT-NeoX maps
    (x0, x_half) -> (-x_half, x0); dims past rotary_dim stay."""
    x = torch.arange(1.0, 33.0).view(1, 1, 32)
    cos, sin = torch.zeros(1, 8), torch.ones(1, 8)
    pos = torch.zeros(1, dtype=torch.long)
    k_cache = torch.zeros(1, 1, 1, 32)
    kvcache_attention(torch.zeros(1, 1, 1, 32), k_cache, k_cache.clone(), x[None], x[None], cos, sin,
                      cache_seqlens=0, rotary_interleaved=True)
    y = k_cache[0, 0, 0]
    assert y[:4].tolist() == [-2.0, 1.0, -4.0, 3.0] and torch.equal(y[16:], x[0, 0, 16:])
    k_cache.zero_()
    kvcache_attention(torch.zeros(1, 1, 1, 32), k_cache, k_cache.clone(), x[None], x[None], cos, sin,
                      cache_seqlens=0, rotary_interleaved=False)
    y = k_cache[0, 0, 0]
    assert y[0].item() == -9.0 and y[8].item() == 1.0 and torch.equal(y[16:], x[0, 0, 16:])
    assert torch.equal(y, rotate(x, cos, sin, pos, False)[0, 0])


# --------------------------------------------------------------------------------------------
# (e) cache_batch_idx


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
def test_cache_batch_idx(causal):
    batch, batch_cache, cache_len, nheads, nheads_k, d, seqlen_q, seqlen_new = 3, 7, 20, 4, 2, 32, 2, 2
    q = randn(batch, seqlen_q, nheads, d)
    k_cache, v_cache = randn(batch_cache, cache_len, nheads_k, d), randn(batch_cache, cache_len, nheads_k, d)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = randn(batch, seqlen_new, nheads_k, d), randn(batch, seqlen_new, nheads_k, d)
    idx = torch.randperm(batch_cache, dtype=torch.int32)[:batch]
    seqlens = seqlens_for(batch, cache_len, seqlen_new)
    out, lse = kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, cache_batch_idx=idx, causal=causal)
    for b in range(batch):
        row, s = int(idx[b]), int(seqlens[b])
        k_full = torch.cat((before_k[row, :s], k[b]))
        v_full = torch.cat((before_v[row, :s], v[b]))
        check_row(out, lse, b, q[b], k_full, v_full, causal)
        end = s + seqlen_new
        assert torch.equal(k_cache[row, :end], k_full) and torch.equal(v_cache[row, :end], v_full)
        assert torch.equal(k_cache[row, end:], before_k[row, end:])
        assert torch.equal(v_cache[row, end:], before_v[row, end:])
    others = torch.ones(batch_cache, dtype=torch.bool)
    others[idx.long()] = False
    assert torch.equal(k_cache[others], before_k[others]) and torch.equal(v_cache[others], before_v[others])


# --------------------------------------------------------------------------------------------
# (f) cache_leftpad


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_cache_leftpad(interleaved, causal):
    """Row b sees p .. s + n - 1; rotary positions stay absolute (new key i at s + i, queries at
    s (+ i when causal)), not shifted by the padding; causal alignment is over the visible keys."""
    batch, cache_len, nheads, nheads_k, d, seqlen_q, seqlen_new = 4, 30, 4, 2, 32, 3, 2
    q = randn(batch, seqlen_q, nheads, d)
    k_cache, v_cache = randn(batch, cache_len, nheads_k, d), randn(batch, cache_len, nheads_k, d)
    old_k, old_v = k_cache.clone(), v_cache.clone()
    k, v = randn(batch, seqlen_new, nheads_k, d), randn(batch, seqlen_new, nheads_k, d)
    seqlens = seqlens_for(batch, cache_len, seqlen_q, low=1)
    leftpad = torch.stack([torch.randint(0, int(s) + 1, ()) for s in seqlens]).to(torch.int32)
    leftpad[0] = seqlens[0]  # only the new keys are visible
    cos, sin = rotary_tables(cache_len, 32)
    out, lse = kvcache_attention(
        q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens, cache_leftpad=leftpad, causal=causal,
        rotary_interleaved=interleaved,
    )
    for b in range(batch):
        p, s = int(leftpad[b]), int(seqlens[b])
        k_vis = torch.cat((old_k[b, p:s], rotate(k[b], cos, sin, s + torch.arange(seqlen_new), interleaved)))
        v_vis = torch.cat((old_v[b, p:s], v[b]))
        q_pos = s + (torch.arange(seqlen_q) if causal else torch.zeros(seqlen_q, dtype=torch.long))
        check_row(out, lse, b, rotate(q[b], cos, sin, q_pos, interleaved), k_vis, v_vis, causal)
        assert torch.equal(k_cache[b, :s], old_k[b, :s]), "the padding and old entries are not rewritten"


def test_leftpad_hides_everything():
    """cache_leftpad == cache_seqlens and nothing appended: no key is visible, output 0, lse +inf."""
    q = randn(2, 2, 2, 16)
    k_cache, v_cache = randn(2, 8, 2, 16), randn(2, 8, 2, 16)
    seqlens = torch.tensor([5, 3], dtype=torch.int32)
    out, lse = kvcache_attention(q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=seqlens.clone())
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()
    leftpad = torch.tensor([2, 0], dtype=torch.int32)
    out, lse = kvcache_attention(q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=leftpad)
    check_row(out, lse, 0, q[0], k_cache[0, 2:5], v_cache[0, 2:5], False)
    check_row(out, lse, 1, q[1], k_cache[1, :3], v_cache[1, :3], False)


# --------------------------------------------------------------------------------------------
# (i) cache_seqlens as an int or as a tensor


@pytest.mark.parametrize("causal", [False, True], ids=_causal_ids)
def test_cache_seqlens_int_or_tensor(causal):
    batch, cache_len, nheads, nheads_k, d, seqlen_q, seqlen_new, s = 3, 16, 4, 1, 32, 2, 2, 9
    q = randn(batch, seqlen_q, nheads, d)
    k_cache, v_cache = randn(batch, cache_len, nheads_k, d), randn(batch, cache_len, nheads_k, d)
    k, v = randn(batch, seqlen_new, nheads_k, d), randn(batch, seqlen_new, nheads_k, d)
    cos, sin = rotary_tables(cache_len, 16)
    results = []
    for seqlens in (s, torch.full((batch,), s, dtype=torch.int32), torch.full((batch,), s, dtype=torch.int64)):
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = kvcache_attention(q, kc, vc, k, v, cos, sin, cache_seqlens=seqlens, causal=causal)
        results.append((out, lse, kc, vc))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    kc = results[0][2]
    for b in range(batch):
        assert torch.equal(kc[b, s + seqlen_new :], k_cache[b, s + seqlen_new :])


# --------------------------------------------------------------------------------------------
# The official argument rules


def test_rejected_combinations():
    q = randn(1, 1, 2, 32)
    k_cache, v_cache = randn(2, 8, 2, 32), randn(2, 8, 2, 32)
    k, v = randn(1, 1, 2, 32), randn(1, 1, 2, 32)
    cos, sin = rotary_tables(8, 16)
    wide = rotary_tables(8, 48)
    table = torch.zeros(1, 1, dtype=torch.int32)
    one = torch.zeros(1, dtype=torch.int32)
    cases = [
        dict(k=k),  # k without v
        dict(k=k, v=v),  # an append without cache_seqlens
        dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=1),  # rotary without k and v
        dict(k=k, v=v, rotary_cos=cos, cache_seqlens=1),  # cos without sin
        dict(k=k, v=v, rotary_cos=wide[0], rotary_sin=wide[1], cache_seqlens=1),  # rotary_dim 48 > headdim 32
        dict(block_table=table, cache_batch_idx=one),
        dict(block_table=table, cache_leftpad=one),
        dict(k=k, v=v, cache_seqlens=8),  # the cache is full
        dict(cache_seqlens=3, cache_leftpad=torch.tensor([4], dtype=torch.int32)),  # leftpad past the end
    ]
    for kwargs in cases:
        with pytest.raises(ValueError):
            kvcache_attention(q, k_cache, v_cache, **kwargs)
