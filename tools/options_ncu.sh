#!/usr/bin/env bash
# ncu's warp-state and instruction statistics of the forward kernel, plain against the kernel
# with options (with nothing to do: ALiBi slopes of 0) and with dropout; issue 6 dev aid.
# Usage: bash tools/options_ncu.sh [fwd|bwd] [N]   (bf16, d128, seqlen 4k; N: how many of plain,
# ALiBi 0, dropout, softcap to profile, in that order, default 3)
kind=${1:-fwd}
variants=${2:-3}
ncu --clock-control none -k regex:${kind}_kernel -c $variants --section WarpStateStats --section InstructionStats \
  --section LaunchStats --section SpeedOfLight python3 -c "
import torch, flash_cute
b, s, h, d = 4, 4096, 16, 128
q, k, v, do = (torch.randn(b, s, h, d, device='cuda', dtype=torch.bfloat16) for _ in range(4))
qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
for kw in ({}, dict(alibi_slopes=torch.zeros(h, device='cuda')), dict(dropout_p=0.1), dict(softcap=30.0))[:$variants]:
    o = flash_cute.flash_attn_func(qq, kk, vv, **kw)
    if '$kind' == 'bwd':
        torch.autograd.grad(o, (qq, kk, vv), do)
" 2>&1 | grep -E "fwd_kernel|bwd_kernel|Duration|Executed Instructions |Registers Per|Stall|Warp Cycles Per Issued|Issue Slot|Local Memory|Compute \(SM\) Thr" | grep -v -E "^\s*$"
