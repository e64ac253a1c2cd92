"""Forward and backward times of flash_attn_func's options against plain attention on one shape
(bf16, d128, seqlen 4k, batch 4, 16 heads by default), for kernel work on issue 6. 'options-base'
is the ALiBi kernel running with nothing to do (slopes of 0): its cost over plain is the price of
the kernel itself; 'softcap-any' runs softcap in the kernel that takes both softcap and ALiBi at run
time (slopes 0), against 'softcap' in the kernel made for softcap alone; 'dropout-any' runs the
dropout kernel through its run-time ALiBi branch (slopes 0). The numbers that count come from benchmark/run.py --options.

    PYTHONPATH=.gpu/site python3 tools/options_probe.py [seqlen] [head_dim] [variant,...]
"""

import sys

import torch
from triton.testing import do_bench

import flash_cute

seqlen = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
d = int(sys.argv[2]) if len(sys.argv) > 2 else 128
batch, heads = max(1, 16384 // seqlen), 2048 // d
q, k, v = (torch.randn(batch, seqlen, heads, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device="cuda") / heads)
variants = {
    "plain": {},
    "options-base": dict(alibi_slopes=torch.zeros(heads, device="cuda")),  # the ALiBi kernel, slopes 0
    "softcap": dict(softcap=30.0),
    "softcap-any": dict(softcap=30.0, alibi_slopes=torch.zeros(heads, device="cuda")),  # the kernel for both
    "alibi": dict(alibi_slopes=slopes),
    "dropout": dict(dropout_p=0.1),
    "dropout-any": dict(dropout_p=0.1, alibi_slopes=torch.zeros(heads, device="cuda")),  # dropout's ALiBi branch
    "window": dict(window_size=(1024, 1024)),
    "causal": dict(causal=True),
    "causal-window": dict(causal=True, window_size=(4095, 0)),  # the options kernel doing plain causal
    "sliding": dict(causal=True, window_size=(1024, 0)),
}
if len(sys.argv) > 3:
    variants = {name: variants[name] for name in ["plain", *sys.argv[3].split(",")]}
base = None
print(f"bf16 d{d} seqlen {seqlen} batch {batch} heads {heads}")
for name, kw in variants.items():
    fwd = do_bench(lambda: flash_cute.flash_attn_func(q, k, v, **kw), warmup=50, rep=300)
    out = flash_cute.flash_attn_func(q, k, v, **kw)
    dout = torch.randn_like(out)
    bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=50, rep=300)
    base = base or (fwd, bwd)
    print(f"{name:14s} fwd {fwd:7.3f} ms {fwd / base[0]:5.3f}x   bwd {bwd:7.3f} ms {bwd / base[1]:5.3f}x")
