"""flash_cute.bert_padding: unpad/pad between (batch, seqlen, ...) and packed (tokens, ...) tensors,
checked against independent computations (loops over the mask, torch.nonzero, cumsum) and with
torch.autograd.gradcheck. Sizes are drawn per test (conftest seeds torch from the test id)."""

from __future__ import annotations

import pytest
import torch

from flash_cute import bert_padding as bp
from flash_cute.bert_padding import (
    IndexFirstAxis,
    IndexFirstAxisResidual,
    IndexPutFirstAxis,
    index_first_axis,
    index_first_axis_residual,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)

MASK_DTYPES = [torch.bool, torch.int32, torch.int64, torch.uint8]


def _randint(lo, hi):
    """A python int in [lo, hi], from torch's (seeded) generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


def _sizes():
    """(batch, seqlen, trailing dims) drawn at random; trailing has 0 to 2 dims."""
    trailing = tuple(_randint(1, 4) for _ in range(_randint(0, 2)))
    return _randint(1, 6), _randint(1, 20), trailing


def _random_mask(batch, seqlen, dtype=torch.bool, p=0.6):
    """Arbitrary 0/1 pattern (not only left-aligned), with at least one nonzero entry."""
    mask = torch.rand(batch, seqlen) < p
    mask[_randint(0, batch - 1), _randint(0, seqlen - 1)] = True
    return mask.to(dtype)


def _expected_unpad(x, keep):
    """Loop-built packed tensor and flat indices for a 0/1 mask."""
    batch, seqlen = keep.shape
    rows, idx = [], []
    for b in range(batch):
        for s in range(seqlen):
            if keep[b, s]:
                rows.append(x[b, s])
                idx.append(b * seqlen + s)
    packed = torch.stack(rows) if rows else x.new_zeros((0, *x.shape[2:]))
    return packed, torch.tensor(idx, dtype=torch.long)


def _check_unpad_metadata(out, mask, keep):
    """The 5-tuple of unpad_input against independent computations; keep = mask | unused."""
    _, indices, cu_seqlens, max_seqlen, used = out
    assert torch.equal(indices, torch.nonzero(keep.flatten()).flatten())
    assert indices.dtype == torch.long
    lens = keep.long().sum(dim=1)
    expected_cu = torch.tensor([0] + torch.cumsum(lens, 0).tolist(), dtype=torch.int32)
    assert cu_seqlens.dtype == torch.int32
    assert torch.equal(cu_seqlens, expected_cu)
    assert type(max_seqlen) is int and max_seqlen == int(lens.max())
    assert used.dtype == torch.int32
    assert torch.equal(used, (mask != 0).sum(dim=1).to(torch.int32))


def test_public_names():
    # Function.apply is a classmethod: each access is a new bound method, so compare with ==
    assert index_first_axis == IndexFirstAxis.apply
    assert index_put_first_axis == IndexPutFirstAxis.apply
    assert index_first_axis_residual == IndexFirstAxisResidual.apply
    for name in bp.__all__:
        assert hasattr(bp, name)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_unpad_matches_loop_and_round_trips(mask_dtype):
    batch, seqlen, trailing = _sizes()
    x = torch.randn(batch, seqlen, *trailing)
    mask = _random_mask(batch, seqlen, mask_dtype)
    out = unpad_input(x, mask)
    assert len(out) == 5
    packed, indices = out[0], out[1]
    exp_packed, exp_idx = _expected_unpad(x, mask.bool())
    assert torch.equal(indices, exp_idx)
    assert torch.equal(packed, exp_packed)
    _check_unpad_metadata(out, mask, mask.bool())
    # pad(unpad(x)) == x * mask, zeros exactly at the padding
    restored = pad_input(packed, indices, batch, seqlen)
    assert restored.shape == x.shape and restored.dtype == x.dtype
    keep = mask.bool().reshape(batch, seqlen, *([1] * len(trailing)))
    assert torch.equal(restored, x * keep)
    assert torch.equal(restored, torch.where(keep, x, torch.zeros_like(x)))


def test_empty_and_full_rows():
    batch, seqlen, trailing = _sizes()
    batch = max(batch, 3)
    x = torch.randn(batch, seqlen, *trailing)
    mask = _random_mask(batch, seqlen)
    empty, full = torch.randperm(batch)[:2].tolist()
    mask[empty] = False
    mask[full] = True
    out = unpad_input(x, mask)
    _check_unpad_metadata(out, mask, mask)
    packed, indices, cu_seqlens, max_seqlen, used = out
    assert cu_seqlens[empty + 1] == cu_seqlens[empty]  # zero-length sequence
    assert cu_seqlens[full + 1] - cu_seqlens[full] == seqlen
    assert max_seqlen == seqlen
    assert used[empty] == 0 and used[full] == seqlen
    full_rows = packed[cu_seqlens[full] : cu_seqlens[full + 1]]
    assert torch.equal(full_rows, x[full])
    assert torch.equal(pad_input(packed, indices, batch, seqlen)[empty], torch.zeros_like(x[empty]))


def test_all_masked_and_all_kept():
    batch, seqlen, trailing = _sizes()
    x = torch.randn(batch, seqlen, *trailing)
    packed, indices, cu, max_seqlen, used = unpad_input(x, torch.zeros(batch, seqlen, dtype=torch.bool))
    assert packed.shape == (0, *trailing) and indices.numel() == 0
    assert torch.equal(cu, torch.zeros(batch + 1, dtype=torch.int32))
    assert max_seqlen == 0 and torch.equal(used, torch.zeros(batch, dtype=torch.int32))
    assert torch.equal(pad_input(packed, indices, batch, seqlen), torch.zeros_like(x))

    packed, indices, cu, max_seqlen, used = unpad_input(x, torch.ones(batch, seqlen, dtype=torch.int32))
    assert torch.equal(packed, x.reshape(batch * seqlen, *trailing))
    assert torch.equal(indices, torch.arange(batch * seqlen))
    assert torch.equal(cu, torch.arange(batch + 1, dtype=torch.int32) * seqlen)
    assert max_seqlen == seqlen and torch.equal(used, torch.full((batch,), seqlen, dtype=torch.int32))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32], ids=str)
def test_unused_mask(mask_dtype):
    """Slots in unused_mask are packed (and counted in cu_seqlens / max_seqlen), but
    used_seqlens counts attention_mask alone. The two masks are disjoint, as in the official
    use (real tokens followed by allocated-but-unused slots)."""
    batch, seqlen, trailing = _sizes()
    x = torch.randn(batch, seqlen, *trailing)
    used_len = torch.randint(0, seqlen + 1, (batch,))
    unused_len = (torch.rand(batch) * (seqlen - used_len + 1)).long()  # used + unused <= seqlen
    pos = torch.arange(seqlen).unsqueeze(0)
    mask = pos < used_len.unsqueeze(1)
    unused = (pos >= used_len.unsqueeze(1)) & (pos < (used_len + unused_len).unsqueeze(1))
    out = unpad_input(x, mask.to(mask_dtype), unused.to(mask_dtype))
    keep = mask | unused
    _check_unpad_metadata(out, mask, keep)
    exp_packed, _ = _expected_unpad(x, keep)
    assert torch.equal(out[0], exp_packed)
    assert torch.equal(out[4], mask.sum(1).to(torch.int32))
    # without unused_mask the same call packs the real tokens only
    plain = unpad_input(x, mask.to(mask_dtype))
    _check_unpad_metadata(plain, mask, mask)
    assert torch.equal(plain[4], out[4])


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool], ids=str
)
def test_any_dtype(dtype):
    batch, seqlen, trailing = _sizes()
    x = (torch.randn(batch, seqlen, *trailing) * 5).to(dtype)
    mask = _random_mask(batch, seqlen)
    packed, indices, *_ = unpad_input(x, mask)
    assert packed.dtype == dtype
    assert torch.equal(packed, x[mask])
    restored = pad_input(packed, indices, batch, seqlen)
    assert restored.dtype == dtype
    assert torch.equal(restored[mask], x[mask])
    assert not restored[~mask].any()


def test_non_contiguous_input():
    batch, seqlen, _ = _sizes()
    x = torch.randn(seqlen, batch, 3, 2).transpose(0, 1)  # (batch, seqlen, 3, 2), not contiguous
    mask = _random_mask(batch, seqlen)
    packed, indices, *_ = unpad_input(x, mask)
    assert torch.equal(packed, x[mask])
    assert torch.equal(pad_input(packed, indices, batch, seqlen)[mask], x[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_unpad_gradient_scatters_to_kept_tokens(dtype):
    batch, seqlen, trailing = _sizes()
    x = torch.randn(batch, seqlen, *trailing).to(dtype).requires_grad_()
    mask = _random_mask(batch, seqlen)
    packed, *_ = unpad_input(x, mask)
    weight = torch.randn_like(packed)
    (packed * weight).sum().backward()
    expected = torch.zeros_like(x)
    expected[mask] = weight
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_pad_gradient_gathers_from_kept_tokens(dtype):
    batch, seqlen, trailing = _sizes()
    mask = _random_mask(batch, seqlen)
    _, indices, *_ = unpad_input(torch.zeros(batch, seqlen), mask)
    packed = torch.randn(indices.numel(), *trailing).to(dtype).requires_grad_()
    padded = pad_input(packed, indices, batch, seqlen)
    weight = torch.randn_like(padded)
    (padded * weight).sum().backward()
    assert torch.equal(packed.grad, weight[mask])


def test_gradcheck_index_first_axis():
    rows, dim = _randint(2, 12), _randint(1, 5)
    x = torch.randn(rows, dim, 2, dtype=torch.float64, requires_grad=True)
    indices = torch.randperm(rows)[: _randint(1, rows)]
    assert torch.autograd.gradcheck(lambda t: index_first_axis(t, indices), (x,))
    # repeated rows: the backward sums their gradients
    dup = torch.randint(0, rows, (_randint(1, 2 * rows),))
    assert torch.autograd.gradcheck(lambda t: index_first_axis(t, dup), (x,))
    # int32 indices are accepted
    assert torch.equal(index_first_axis(x, indices.int()), x[indices])


def test_gradcheck_index_put_first_axis():
    rows, dim = _randint(2, 12), _randint(1, 5)
    indices = torch.randperm(rows)[: _randint(1, rows)]
    values = torch.randn(indices.numel(), dim, dtype=torch.float64, requires_grad=True)
    out = index_put_first_axis(values, indices, rows)
    expected = torch.zeros(rows, dim, dtype=torch.float64)
    expected[indices] = values.detach()
    assert torch.equal(out, expected)
    assert torch.autograd.gradcheck(lambda v: index_put_first_axis(v, indices, rows), (values,))


def test_gradcheck_index_first_axis_residual():
    rows, dim = _randint(2, 12), _randint(1, 5)
    x = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
    indices = torch.randperm(rows)[: _randint(1, rows)]
    out, residual = index_first_axis_residual(x, indices)
    assert torch.equal(out, x[indices]) and torch.equal(residual, x)
    assert torch.autograd.gradcheck(lambda t: index_first_axis_residual(t, indices), (x,))


def test_gradcheck_pad_and_unpad():
    batch, seqlen, trailing = _sizes()
    mask = _random_mask(batch, seqlen)
    x = torch.randn(batch, seqlen, *trailing, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpad_input(t, mask)[0], (x,))
    _, indices, *_ = unpad_input(x.detach(), mask)
    packed = torch.randn(indices.numel(), *trailing, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: pad_input(p, indices, batch, seqlen), (packed,))
    assert torch.autograd.gradgradcheck(lambda p: pad_input(p, indices, batch, seqlen), (packed,))


def _random_lengths_in_rows(batch, seqlen):
    """(batch, seqlen) int tensor: each row lists random sequence lengths summing to at most
    seqlen, placed at random positions of the row with zeros between (zeros are skipped)."""
    rows = []
    for _ in range(batch):
        total = _randint(0, seqlen)
        lengths = []
        while total > 0:
            n = _randint(1, total)
            lengths.append(n)
            total -= n
        slots = sorted(torch.randperm(seqlen)[: len(lengths)].tolist())
        row = [0] * seqlen
        for slot, n in zip(slots, lengths):
            row[slot] = n
        rows.append(row)
    if not any(any(r) for r in rows):
        rows[0][0] = 1
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_unpad_concatenated_sequences(dtype):
    batch, seqlen, trailing = _sizes()
    lengths = _random_lengths_in_rows(batch, seqlen).to(dtype)
    x = torch.randn(batch, seqlen, *trailing)
    out = unpad_input_for_concatenated_sequences(x, lengths)
    assert len(out) == 4
    packed, indices, cu_seqlens, max_seqlen = out
    # hand-built: each row keeps its first sum(row) tokens; every nonzero entry is one sequence
    exp_rows, exp_idx, exp_lens = [], [], []
    for b in range(batch):
        row = lengths[b].tolist()
        for s in range(sum(row)):
            exp_rows.append(x[b, s])
            exp_idx.append(b * seqlen + s)
        exp_lens += [n for n in row if n != 0]
    assert torch.equal(indices, torch.tensor(exp_idx, dtype=torch.long))
    assert torch.equal(packed, torch.stack(exp_rows))
    cu = [0]
    for n in exp_lens:
        cu.append(cu[-1] + n)
    assert cu_seqlens.dtype == torch.int32
    assert torch.equal(cu_seqlens, torch.tensor(cu, dtype=torch.int32))
    assert type(max_seqlen) is int and max_seqlen == max(exp_lens)
    assert int(cu_seqlens[-1]) == packed.shape[0]
    # the official docstring's example
    example = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    y = torch.randn(3, 6, 2)
    packed, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(y, example)
    assert torch.equal(indices, torch.tensor([0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]))
    assert torch.equal(cu_seqlens, torch.tensor([0, 2, 5, 8, 10, 16], dtype=torch.int32))
    assert max_seqlen == 6
    assert torch.equal(pad_input(packed, indices, 3, 6)[:, :5], y[:, :5])


def test_concatenated_sequences_gradient():
    batch, seqlen, trailing = _sizes()
    lengths = _random_lengths_in_rows(batch, seqlen)
    x = torch.randn(batch, seqlen, *trailing, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: unpad_input_for_concatenated_sequences(t, lengths)[0], (x,)
    )


@pytest.mark.cuda
def test_cuda():
    device = "cuda"
    batch, seqlen, trailing = _sizes()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(batch, seqlen, *trailing, device=device).to(dtype).requires_grad_()
        mask = _random_mask(batch, seqlen).to(device)
        unused = (~mask) & (torch.rand(batch, seqlen, device=device) < 0.3)
        packed, indices, cu, max_seqlen, used = unpad_input(x, mask, unused)
        keep = mask | unused
        for t in (packed, indices, cu, used):
            assert t.device.type == "cuda"
        assert torch.equal(indices, torch.nonzero(keep.flatten()).flatten())
        assert torch.equal(cu.cpu()[1:], keep.sum(1).cumsum(0).int().cpu())
        assert cu.dtype == torch.int32 and cu[0] == 0
        assert max_seqlen == int(keep.sum(1).max()) and torch.equal(used, mask.sum(1).int())
        assert torch.equal(packed, x[keep])
        restored = pad_input(packed, indices, batch, seqlen)
        assert torch.equal(restored[keep], x[keep]) and not restored[~keep].any()
        weight = torch.randn_like(restored)
        (restored.float() * weight.float()).sum().backward()
        expected = torch.zeros_like(x)
        expected[keep] = weight[keep]
        assert torch.equal(x.grad, expected)
    lengths = _random_lengths_in_rows(batch, seqlen)
    y = torch.randn(batch, seqlen, *trailing, device=device)
    packed, indices, cu, _ = unpad_input_for_concatenated_sequences(y, lengths.to(device))
    ref = unpad_input_for_concatenated_sequences(y.cpu(), lengths)
    assert torch.equal(packed.cpu(), ref[0]) and torch.equal(indices.cpu(), ref[1])
    assert torch.equal(cu.cpu(), ref[2])
