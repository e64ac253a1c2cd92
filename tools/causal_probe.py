"""Causal forward and backward times over seqlens (16k tokens per batch, bf16, 16 heads), and at 4k
with GQA, softcap, a sliding window and deterministic mode, for kernel work: run it on two wheels
and compare (docs/logs/windows-h200-2026-11-30/cta-order.txt).

    PYTHONPATH=.gpu/site python3 tools/causal_probe.py [head_dim]
"""

import sys

import torch
from triton.testing import do_bench

import flash_cute

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
heads = 16
cases = [(s, 16384 // s, heads, heads, {}) for s in (512, 1024, 2048, 4096, 8192, 16384)]
cases += [(4096, 4, heads, 4, {}), (4096, 4, heads, heads, {"softcap": 30.0}),
          (4096, 4, heads, heads, {"window_size": (1024, 0)}), (4096, 4, heads, heads, {"deterministic": True})]
for s, b, h, hk, kw in cases:
    q = torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k, v = (torch.randn(b, s, hk, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(2))
    fwd = do_bench(lambda: flash_cute.flash_attn_func(q, k, v, causal=True, **kw), warmup=50, rep=300)
    out = flash_cute.flash_attn_func(q, k, v, causal=True, **kw)
    dout = torch.randn_like(out)
    bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=50, rep=300)
    print(f"seqlen {s:5d} batch {b:2d} heads {h}/{hk} {str(kw):28s} fwd {fwd:7.3f} ms  bwd {bwd:7.3f} ms", flush=True)
