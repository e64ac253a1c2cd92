"""Forward and backward calls for compute-sanitizer at the head dims in $SMALL_DIMS (default
"32 192"): bf16, GQA 4/2 heads, 113 queries over 203 keys (partial blocks on both axes), causal,
deterministic, a window with softcap, dropout with ALiBi; and a varlen batch of three sequences
(one empty) with a max_seqlen hint smaller than the longest. The tiles are what this GPU runs
(the small ones under FLASH_CUTE_FORCE_SMALL_SMEM_TILE=1).

    compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/sanitize_dims.py
"""

import os

import torch

import flash_cute

torch.manual_seed(0)
for d in map(int, os.environ.get("SMALL_DIMS", "32 192").split()):
    q = torch.randn(2, 113, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 203, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    for kw in (dict(causal=True), dict(deterministic=True), dict(window_size=(40, 7), softcap=5.0),
               dict(dropout_p=0.2, alibi_slopes=torch.rand(4, device="cuda"))):
        out = flash_cute.flash_attn_func(q, k, v, **kw)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    cu_q = torch.tensor([0, 70, 70, 183], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 150, 161, 300], device="cuda", dtype=torch.int32)
    qv = torch.randn(183, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(300, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    vv = torch.randn_like(kv, requires_grad=True)
    for kw in (dict(causal=True), dict(deterministic=True)):
        out = flash_cute.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, 64, 64, **kw)
        torch.autograd.grad(out, (qv, kv, vv), torch.randn_like(out))
print("done")
