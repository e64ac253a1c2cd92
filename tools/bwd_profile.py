"""Kernel-time breakdown of one backward call (flash_cute and torch's flash backend), from the
torch profiler: which kernels run and how long each takes. Development aid for tuning."""
import sys, torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
import flash_cute

def run(d, seqlen, causal, dtype=torch.bfloat16):
    b, h = 16384 // seqlen, 2048 // d
    q, k, v, dout = (torch.randn(b, seqlen, h, d, device="cuda", dtype=dtype) for _ in range(4))
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_cute.flash_attn_func(qq, kk, vv, causal=causal)
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        o2 = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dt = dout.transpose(1, 2)
    for name, fn in (("flash_cute", lambda: torch.autograd.grad(out, (qq, kk, vv), dout, retain_graph=True)),
                     ("torch-flash", lambda: torch.autograd.grad(o2, (qt, kt, vt), dt, retain_graph=True))):
        for _ in range(3): fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fn()
            torch.cuda.synchronize()
        print(f"== {name} d{d} s{seqlen} causal={causal}")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
            print(f"   {e.device_time_total / 5:9.1f} us  x{e.count // 5}  {e.key[:110]}")

if __name__ == "__main__":
    for spec in sys.argv[1:]:
        d, s, c = spec.split(":")
        run(int(d), int(s), c == "1")
