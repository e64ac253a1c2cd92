"""A forward CTA's fixed cost (prologue, epilogue), ours and torch's FA2 (the flash backend of
scaled_dot_product_attention): bf16, 4096 queries, batch 4, 2048 / d heads, against seqlen_k. The
slope of time over seqlen_k is the cost of the keys; the intercept the fixed cost of the grid.

    PYTHONPATH=.gpu/site python3 tools/fixed_cost_probe.py [head_dim]
"""

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flash_cute

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
b, h, sq = 4, 2048 // d, 4096
print(f"bf16 d{d}, {sq} queries, batch {b}, {h} heads")
rows = []
for sk in (32, 64, 128, 256, 512, 1024, 2048, 4096):
    q = torch.randn(b, sq, h, d, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(b, sk, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    fc = do_bench(lambda: flash_cute.flash_attn_func(q, k, v), warmup=50, rep=300)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        tf = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), warmup=50, rep=300)
    rows.append((sk, fc, tf))
    print(f"seqlen_k {sk:5d}  flash_cute {fc * 1e3:8.1f} us  torch-flash {tf * 1e3:8.1f} us  fc/tf {tf / fc:5.3f}", flush=True)
# least squares of time over seqlen_k on the points >= 256: time = fixed + per_key * seqlen_k
for name, i in (("flash_cute", 1), ("torch-flash", 2)):
    pts = [(r[0], r[i]) for r in rows if r[0] >= 256]
    n = len(pts); mx = sum(p[0] for p in pts) / n; my = sum(p[1] for p in pts) / n
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    print(f"{name}: {slope * 1e3 * 1024:.1f} us per 1024 keys, intercept {(my - slope * mx) * 1e3:.1f} us (the grid's fixed cost)")
