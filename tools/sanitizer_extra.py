"""A second compute-sanitizer sweep (memcheck, racecheck), for what the sweep in
tools/device-check.sh does not reach: tiny and padded head dims (8, 4), the packed functions
(their backward writes dq, dk, dv into strided views of one gradient buffer), the decoding kernel
at its packed-row limit (64 rows: seqlen_q 16 x group 4) and with group 8, no append, an int or no
cache_seqlens, appends of 5 rows crossing 16-row pages, rows with no cached key, more splits than
key blocks, the long-query route of flash_attn_with_kvcache (the forward kernel over cache rows,
contiguous and in 64-row pages) and the split-KV kernel on more than 64 packed rows (paged 16),
a grid with batch x heads above 65,535, and index values out of range that the host does not
check (FLASH_CUTE_CHECK_INDICES off): cu_seqlens past the tensors or decreasing, block-table
entries that are not pages, cache_seqlens past the capacity or negative, cache_batch_idx and
cache_leftpad out of range, on every route (the kernels must touch nothing outside the tensors).
Small shapes: memcheck slows kernels ~100x.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitizer_extra.py
"""

import torch

import flash_cute

torch.manual_seed(0)
dev, bf16 = "cuda", torch.bfloat16


def randn(*shape, grad=False):
    return torch.randn(*shape, device=dev, dtype=bf16).requires_grad_(grad)


def skip_unbuilt(fn):
    try:
        fn()
    except (RuntimeError, NotImplementedError) as e:
        if "FLASH_CUTE_HEAD_DIMS" not in str(e) and "FLASH_CUTE_OPTION_KERNELS" not in str(e):
            raise


def cu(lens):
    return torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)


# Head dims 8 (in place) and 4 (zero-padded): forward and backward, padded and varlen.
for d in (8, 4):
    def small_head_dim():
        q, k, v = randn(2, 77, 4, d, grad=True), randn(2, 130, 2, d, grad=True), randn(2, 130, 2, d, grad=True)
        for causal in (False, True):
            out = flash_cute.flash_attn_func(q, k, v, causal=causal)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        qv, kv = randn(77, 4, d, grad=True), randn(135, 2, d, grad=True)
        out = flash_cute.flash_attn_varlen_func(qv, kv, kv, cu([30, 0, 47]), cu([64, 5, 66]), 47, 66, causal=True)
        torch.autograd.grad(out, (qv, kv), torch.randn_like(out))
    skip_unbuilt(small_head_dim)

# The packed functions: one gradient buffer, strided views written by the backward kernel.
for d in (64, 128):
    def packed():
        qkv = randn(2, 113, 3, 4, d, grad=True)
        out = flash_cute.flash_attn_qkvpacked_func(qkv, causal=True)
        torch.autograd.grad(out, qkv, torch.randn_like(out))
        q, kv = randn(2, 113, 4, d, grad=True), randn(2, 203, 2, 2, d, grad=True)
        out = flash_cute.flash_attn_kvpacked_func(q, kv, deterministic=True)
        torch.autograd.grad(out, (q, kv), torch.randn_like(out))
        qkv = randn(190, 3, 4, d, grad=True)
        out = flash_cute.flash_attn_varlen_qkvpacked_func(qkv, cu([0, 1, 120, 69]), 120, causal=True)
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    skip_unbuilt(packed)

# flash_attn_with_kvcache
for d in (64, 128):
    def kvcache():
        k_cache, v_cache = randn(4, 300, 2, d), randn(4, 300, 2, d)
        seqlens = torch.tensor([0, 1, 150, 295], dtype=torch.int32, device=dev)
        # 64 packed rows (16 query rows x group 4), group 8, no append, an int / no cache_seqlens
        flash_cute.flash_attn_with_kvcache(randn(4, 16, 8, d), k_cache, v_cache, cache_seqlens=seqlens, causal=True)
        flash_cute.flash_attn_with_kvcache(randn(4, 2, 16, d), k_cache, v_cache, cache_seqlens=seqlens, num_splits=128)
        flash_cute.flash_attn_with_kvcache(randn(4, 1, 8, d), k_cache, v_cache, cache_seqlens=37, causal=True)
        flash_cute.flash_attn_with_kvcache(randn(4, 1, 8, d), k_cache, v_cache)
        # rows with no cached key and no new key
        flash_cute.flash_attn_with_kvcache(randn(4, 1, 8, d), k_cache, v_cache,
                                           cache_seqlens=torch.zeros(4, dtype=torch.int32, device=dev))
        # appends of 5 rows crossing 16-row pages, rotary, several splits
        pages = [randn(80, 16, 2, d) for _ in range(2)]
        table = torch.randperm(80, device=dev)[:76].view(4, 19).to(torch.int32)
        angles = torch.rand(310, 16, device=dev)
        for splits in (1, 3):
            flash_cute.flash_attn_with_kvcache(randn(4, 5, 8, d), *pages, randn(4, 5, 2, d), randn(4, 5, 2, d),
                                               angles.cos().to(bf16), angles.sin().to(bf16), cache_seqlens=seqlens,
                                               block_table=table, causal=True, num_splits=splits)
        # long queries: the forward kernel over cache rows (contiguous; pages of 64 rows), and the
        # split-KV kernel on 160 packed rows (pages of 16 rows, which the forward kernel would gather)
        flash_cute.flash_attn_with_kvcache(randn(4, 40, 8, d), k_cache, v_cache, randn(4, 3, 2, d), randn(4, 3, 2, d),
                                           cache_seqlens=seqlens, causal=True)
        pages64 = [randn(24, 64, 2, d) for _ in range(2)]
        table64 = torch.randperm(24, device=dev)[:20].view(4, 5).to(torch.int32)
        flash_cute.flash_attn_with_kvcache(randn(4, 40, 8, d), *pages64, cache_seqlens=seqlens, block_table=table64,
                                           causal=True)
        flash_cute.flash_attn_with_kvcache(randn(4, 40, 8, d), *pages, cache_seqlens=seqlens, block_table=table)
    skip_unbuilt(kvcache)

# batch x heads above 65,535 (1100 x 64), each grid dimension below it; small sequences.
def wide_grid():
    q, k, v = randn(1100, 3, 64, 64, grad=True), randn(1100, 5, 8, 64, grad=True), randn(1100, 5, 8, 64, grad=True)
    out = flash_cute.flash_attn_func(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    flash_cute.flash_attn_with_kvcache(randn(1100, 1, 64, 64), randn(1100, 40, 8, 64), randn(1100, 40, 8, 64),
                                       randn(1100, 1, 8, 64), randn(1100, 1, 8, 64),
                                       cache_seqlens=torch.randint(0, 39, (1100,), dtype=torch.int32, device=dev))
skip_unbuilt(wide_grid)

# Index values out of range, unchecked on CUDA: the kernels hold them to the tensors (NaN rows).
def bad_index_values():
    for d in (64, 128):
        lens = [40, 130, 70]
        q, k, v = randn(sum(lens), 4, d, grad=True), randn(sum(lens), 2, d, grad=True), randn(sum(lens), 2, d, grad=True)
        total = sum(lens)
        for cu_q, cu_k in (([0, 40, 170, total + 500], [0, 40, 170, total]),   # q's last end past q
                           ([0, 40, 170, total], [0, 40, 20, total]),          # decreasing k
                           ([-9, 40, 170, total], [0, 40, 170, total + 99])):  # negative start, k past k
            cq, ck = (torch.tensor(c, device=dev, dtype=torch.int32) for c in (cu_q, cu_k))
            out = flash_cute.flash_attn_varlen_func(q, k, v, cq, ck, 200, 200, causal=True)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for page in (256, 16):  # in place, gathered
            pages = randn(6 * 256 // page, page, 2, d)
            table = torch.tensor([[0, 1, 99], [-3, 2, 3], [4, 5, 1 << 30]], device=dev, dtype=torch.int32)
            table = table.repeat_interleave(256 // page, dim=1)
            ck = torch.tensor([0, 300, 600, 1300], device=dev, dtype=torch.int32)  # the last needs 6 pages of 256
            flash_cute.flash_attn_varlen_func(q, pages, pages, cu(lens), ck, 200, 700, block_table=table)
        # kvcache: decode route (seqlen_q 1) and forward route (seqlen_q 80), contiguous and paged
        cache = lambda: (randn(3, 96, 2, d), randn(3, 96, 2, d))
        seqlens = torch.tensor([95, -4, 60], device=dev, dtype=torch.int32)
        for sq in (1, 80):
            for splits in (1, 4):
                kc, vc = cache()
                flash_cute.flash_attn_with_kvcache(randn(3, sq, 4, d), kc, vc, randn(3, 2, 2, d), randn(3, 2, 2, d),
                                                   cache_seqlens=seqlens, num_splits=splits, causal=True)
                kc, vc = cache()
                flash_cute.flash_attn_with_kvcache(
                    randn(3, sq, 4, d), kc, vc, randn(3, 1, 2, d), randn(3, 1, 2, d), num_splits=splits,
                    cache_seqlens=torch.tensor([10, 20, 30], device=dev, dtype=torch.int32),
                    cache_batch_idx=torch.tensor([2, 0, -1], device=dev, dtype=torch.int32),
                    cache_leftpad=torch.tensor([11, 5, 0], device=dev, dtype=torch.int32))
                pk, pv = randn(4, 16, 2, d), randn(4, 16, 2, d)
                flash_cute.flash_attn_with_kvcache(
                    randn(3, sq, 4, d), pk, pv, randn(3, 1, 2, d), randn(3, 1, 2, d), num_splits=splits,
                    cache_seqlens=torch.tensor([15, 31, 40], device=dev, dtype=torch.int32),
                    block_table=torch.tensor([[0, 4], [1, -2], [2, 3]], device=dev, dtype=torch.int32))
skip_unbuilt(bad_index_values)

torch.cuda.synchronize()
print("extra sweep done")
