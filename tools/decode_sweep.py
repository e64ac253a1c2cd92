"""Decode timing sweep over num_splits (exploration; benchmark/run.py makes the claims).
python3 tools/decode_sweep.py -> per (batch, cache, layout, splits): us and GB/s of K/V read."""
import torch
import flash_cute
from triton.testing import do_bench

torch.manual_seed(0)
H, HK, D = 32, 8, 128
for batch, cache, splits_list in ((1, 131072, (0, 16, 32, 48, 64, 96)), (8, 32768, (0, 1, 2, 4, 8)),
                                   (32, 4096, (0, 1, 2, 3)), (128, 2048, (0, 1, 2))):
    for layout in ("contiguous", "paged16"):
        q = torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16)
        kn = torch.randn(batch, 1, HK, D, device="cuda", dtype=torch.bfloat16)
        vn = torch.randn_like(kn)
        seqlens = torch.full((batch,), cache - 1, dtype=torch.int32, device="cuda")
        if layout == "contiguous":
            kc = torch.randn(batch, cache, HK, D, device="cuda", dtype=torch.bfloat16)
            table = None
        else:
            kc = torch.randn(batch * cache // 16, 16, HK, D, device="cuda", dtype=torch.bfloat16)
            table = torch.randperm(batch * cache // 16, device="cuda", dtype=torch.int32).view(batch, -1)
        vc = torch.randn_like(kc)
        gb = 2 * batch * cache * HK * D * 2 / 1e9
        for s in splits_list:
            f = lambda: flash_cute.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table,
                                                           causal=True, num_splits=s)
            ms = do_bench(f, warmup=50, rep=200)
            print(f"b{batch:<4} cache {cache:>6} {layout:<10} splits {s:>3}: {ms * 1e3:8.1f} us {gb / ms * 1e3:7.0f} GB/s",
                  flush=True)
        del kc, vc
