"""How far softcap's forward and gradients are from a float64 oracle, beside PyTorch's error for the
same computation in bf16 (the tests' 2x rule) and the lse's deviation; issue 6 dev aid for the
tanh the kernels use. Scores are made large (q scaled) so that tanh saturates on many of them.

    PYTHONPATH=.gpu/site python3 tools/softcap_error.py
"""

import sys

import torch

sys.path.insert(0, "tests")
from helpers import options_oracle  # noqa: E402

import flash_cute  # noqa: E402

torch.manual_seed(0)
b, s, h, d = 2, 1024, 8, 128
dtype = torch.bfloat16
print(f"bf16 d{d} seqlen {s} batch {b} heads {h}; max abs errors against the float64 oracle")
print(f"{'softcap':>7} {'q scale':>7} {'out fc':>9} {'out pt':>9} {'ratio':>6} {'lse fc':>9} {'dq fc':>9} {'dq pt':>9} {'ratio':>6} {'dk ratio':>8} {'dv ratio':>8}")
for softcap in (5.0, 30.0, 50.0):
    for q_scale in (1.0, 8.0):
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
        q = (q * q_scale).to(dtype)
        dout = torch.randn_like(q)
        scale = d**-0.5
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse, _ = flash_cute.flash_attn_func(*leaves, softcap=softcap, return_attn_probs=True)
        grads = torch.autograd.grad(out, leaves, dout)

        def oracle(dt):
            ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
            o, l = options_oracle(*ls, scale, False, softcap, (-1, -1), None)
            return o, l, torch.autograd.grad(o, ls, dout.to(dt))

        ref_o, ref_l, ref_g = oracle(torch.float64)
        pt_o, _, pt_g = oracle(dtype)
        err = lambda a, r: (a.double() - r).abs().max().item()  # noqa: E731
        eo, po = err(out, ref_o), err(pt_o, ref_o)
        el = err(lse, ref_l)
        eg = [err(g, r) for g, r in zip(grads, ref_g)]
        pg = [err(g, r) for g, r in zip(pt_g, ref_g)]
        print(f"{softcap:7.0f} {q_scale:7.0f} {eo:9.2e} {po:9.2e} {eo / po:6.2f} {el:9.2e} {eg[0]:9.2e} {pg[0]:9.2e}"
              f" {eg[0] / pg[0]:6.2f} {eg[1] / pg[1]:8.2f} {eg[2] / pg[2]:8.2f}")
