"""Helpers to move between padded ``(batch, seqlen, ...)`` tensors and the packed ("unpadded")
``(total_tokens, ...)`` layout that the varlen attention functions take; the same names,
arguments and return values as ``flash_attn.bert_padding`` (v2.8).

The varlen workflow: drop the padding once, run attention on the packed tokens, and scatter the
result back into the padded shape::

    from flash_cute.bert_padding import pad_input, unpad_input
    from flash_cute.flash_attn_interface import flash_attn_varlen_func

    # q, k, v: (batch, seqlen, nheads, headdim); mask: (batch, seqlen), 1 = real token
    batch, seqlen = mask.shape
    q_u, indices, cu_seqlens, max_seqlen, _ = unpad_input(q, mask)
    k_u, _, _, _, _ = unpad_input(k, mask)
    v_u, _, _, _, _ = unpad_input(v, mask)
    out_u = flash_attn_varlen_func(q_u, k_u, v_u, cu_seqlens, cu_seqlens,
                                   max_seqlen, max_seqlen, causal=True)
    out = pad_input(out_u, indices, batch, seqlen)  # (batch, seqlen, nheads, headdim), 0 at pads

Everything here is plain torch: it runs on CPU and CUDA tensors of any dtype, and gradients flow
through the gathers and scatters (``index_first_axis`` and ``index_put_first_axis`` are each
other's backward).
"""

from __future__ import annotations

import torch

__all__ = [
    "IndexFirstAxis",
    "IndexPutFirstAxis",
    "IndexFirstAxisResidual",
    "index_first_axis",
    "index_put_first_axis",
    "index_first_axis_residual",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
    "pad_input",
]


def _as_index(indices: torch.Tensor) -> torch.Tensor:
    """The index tensor as 1-D int64 (the dtype every torch indexing op accepts)."""
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    return indices if indices.dtype == torch.long else indices.long()


class IndexFirstAxis(torch.autograd.Function):
    """``input[indices]`` along dim 0. Backward writes the incoming gradient into a zero tensor of
    the input's shape at the selected rows (rows selected twice get the sum of their grads)."""

    @staticmethod
    def forward(ctx, input, indices):
        indices = _as_index(indices)
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        return torch.index_select(input, 0, indices)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad_input = grad_output.new_zeros((ctx.first_axis_dim, *grad_output.shape[1:]))
        grad_input.index_put_((indices,), grad_output, accumulate=True)
        return grad_input, None


index_first_axis = IndexFirstAxis.apply


class IndexPutFirstAxis(torch.autograd.Function):
    """A zero tensor of ``first_axis_dim`` rows with ``values`` written at rows ``indices``
    (indices are expected to be distinct). Backward reads the gradient back at those rows."""

    @staticmethod
    def forward(ctx, values, indices, first_axis_dim):
        indices = _as_index(indices)
        ctx.save_for_backward(indices)
        output = values.new_zeros((first_axis_dim, *values.shape[1:]))
        output[indices] = values
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return torch.index_select(grad_output, 0, indices), None, None


index_put_first_axis = IndexPutFirstAxis.apply


class IndexFirstAxisResidual(torch.autograd.Function):
    """Like :class:`IndexFirstAxis`, but also returns the whole input (detached) as a second
    output, so a caller can keep using it as a residual; the gradients reaching both outputs
    are summed into the input's gradient."""

    @staticmethod
    def forward(ctx, input, indices):
        indices = _as_index(indices)
        ctx.save_for_backward(indices)
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output, grad_residual):
        (indices,) = ctx.saved_tensors
        if grad_residual.shape[1:] != grad_output.shape[1:]:
            raise ValueError("gradient shapes of the gathered rows and of the residual differ")
        grad_input = grad_residual.index_put((indices,), grad_output, accumulate=True)
        return grad_input, None


index_first_axis_residual = IndexFirstAxisResidual.apply


def _cu_seqlens(seqlens: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum with a leading zero, int32: (n,) -> (n + 1,)."""
    zero = torch.zeros(1, dtype=torch.int32, device=seqlens.device)
    return torch.cat([zero, torch.cumsum(seqlens, dim=0, dtype=torch.int32)])


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Packs the tokens a mask keeps into one ``(total_tokens, ...)`` tensor.

    Arguments:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)``, bool or int; nonzero marks a real token.
        unused_mask: optional ``(batch, seqlen)``, bool or int; nonzero marks a slot that is
            allocated but holds no real token. Such slots are packed too (they count in
            ``cu_seqlens`` and ``max_seqlen_in_batch``) but not in ``used_seqlens_in_batch``.

    Returns a 5-tuple:
        hidden_states_unpadded: ``(total_tokens, ...)``, the kept tokens in row-major order.
        indices: ``(total_tokens,)`` int64, their positions in the flattened ``batch * seqlen``.
        cu_seqlens: ``(batch + 1,)`` int32, 0 then the running sum of kept tokens per sequence.
        max_seqlen_in_batch: python int, the largest number of kept tokens in one sequence.
        used_seqlens_in_batch: ``(batch,)`` int32, the number of real tokens (attention_mask
            alone) per sequence.
    """
    keep = attention_mask.bool()
    if unused_mask is not None:
        keep = keep | unused_mask.bool()
    seqlens_in_batch = keep.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    cu_seqlens = _cu_seqlens(seqlens_in_batch)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return (
        index_first_axis(flat, indices),
        indices,
        cu_seqlens,
        max_seqlen_in_batch,
        used_seqlens_in_batch,
    )


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Packs rows that each hold several short sequences laid end to end (sequence packing for
    fine-tuning), so that each short sequence becomes its own varlen sequence.

    Arguments:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask_in_length: ``(batch, seqlen)``, int. Row ``b`` lists the lengths of the
            sequences packed into row ``b``, in order; zeros are skipped. For example, with
            ``seqlen = 6`` the row ``[2, 3, 0, 0, 0, 0]`` says that tokens 0-1 are one sequence,
            tokens 2-4 a second one, and token 5 is padding. Each row's lengths add up to at
            most ``seqlen``, and the packed tokens start at position 0.

    Returns a 4-tuple:
        hidden_states_unpadded: ``(total_tokens, ...)``, the first ``sum(row)`` tokens of each row.
        indices: ``(total_tokens,)`` int64, their positions in the flattened ``batch * seqlen``.
        cu_seqlens: ``(num_sequences + 1,)`` int32, boundaries of every short sequence.
        max_seqlen_in_batch: python int, the longest short sequence.
    """
    lengths = attention_mask_in_length
    seqlen = lengths.shape[-1]
    total_per_row = lengths.sum(dim=-1)
    positions = torch.arange(seqlen, device=lengths.device)
    keep = positions.unsqueeze(0) < total_per_row.unsqueeze(1)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    flat_lengths = lengths.flatten()
    seqlens_in_batch = flat_lengths[flat_lengths != 0]
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    cu_seqlens = _cu_seqlens(seqlens_in_batch)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch


def pad_input(hidden_states, indices, batch, seqlen):
    """The inverse of :func:`unpad_input`: scatters packed tokens back into a padded tensor.

    Arguments:
        hidden_states: ``(total_tokens, ...)``, packed tokens.
        indices: ``(total_tokens,)``, each token's position in the flattened ``batch * seqlen``
            (as returned by :func:`unpad_input`).
        batch: int, batch size of the padded result.
        seqlen: int, sequence length of the padded result.

    Returns ``(batch, seqlen, ...)``, zero wherever no token was placed.
    """
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.reshape(batch, seqlen, *output.shape[1:])
