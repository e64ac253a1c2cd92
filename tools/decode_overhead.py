"""Host cost per flash_attn_with_kvcache call (exploration): a tiny decode step whose GPU time is
negligible, timed on the CPU over many calls; each layer of the call path separately."""
import time

import torch

import flash_cute
from flash_cute import _ops

torch.manual_seed(0)
b, H, HK, D, L = 1, 32, 8, 128, 256
q = torch.randn(b, 1, H, D, device="cuda", dtype=torch.bfloat16)
kc = torch.randn(b, L, HK, D, device="cuda", dtype=torch.bfloat16)
vc = torch.randn_like(kc)
kn = torch.randn(b, 1, HK, D, device="cuda", dtype=torch.bfloat16)
vn = torch.randn_like(kn)
seqlens = torch.full((b,), L - 1, dtype=torch.int32, device="cuda")
scale = D ** -0.5


def per_call(f, n=2000):
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


out = torch.empty_like(q)
lse = torch.empty(b, H, 1, device="cuda")
stream = torch.cuda.current_stream().cuda_stream
C = _ops._C()
raw = lambda: C.decode(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), kn.data_ptr(), vn.data_ptr(), out.data_ptr(),
                       lse.data_ptr(), 0, 0, b, 1, H, HK, D, 0, 1, q.stride()[:3], kc.stride()[:3], vc.stride()[:3],
                       kn.stride()[:3], vn.stride()[:3], out.stride()[:3], lse.stride()[:2], seqlens.data_ptr(), 0, 0,
                       0, 0, 0, scale, True, 1, C.kDTypeBFloat16, 0, stream)
cases = {
    "flash_attn_with_kvcache": lambda: flash_cute.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens,
                                                                          causal=True, num_splits=1),
    "_ops.decode (custom op)": lambda: _ops.decode(q, kc, vc, kn, vn, scale, True, 0, 1, seqlens, None, None, None, 1),
    "_ops.decode_eager": lambda: _ops.decode_eager(q, kc, vc, kn, vn, scale, True, 0, 1, seqlens, None, None, None, 1),
    "_C.decode (raw binding)": raw,
    "torch.empty x2": lambda: (torch.empty_like(q), torch.empty(b, H, 1, device="cuda")),
    "torch sdpa flash": lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True),
}
for name, f in cases.items():
    print(f"{name:<28} {per_call(f):7.1f} us per call (host)", flush=True)

import cProfile
import pstats

f = cases["flash_attn_with_kvcache"]
prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    f()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
