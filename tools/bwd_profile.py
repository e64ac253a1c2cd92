"""Kernel-time breakdown of one backward call (flash_cute and torch's flash backend), from the
torch profiler: which kernels run and how long each takes. Development aid for tuning."""
import sys, torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
import flash_cute

def profile_calls(label, calls):
    for name, fn in calls:
        for _ in range(3): fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fn()
            torch.cuda.synchronize()
        print(f"== {name} {label}")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
            print(f"   {e.device_time_total / 5:9.1f} us  x{e.count // 5}  {e.key[:110]}")


def run_varlen(d, causal, dtype=torch.bfloat16):
    """The benchmark's varlen batch: 64 sequences, lengths uniform in [128, 4096] (seed 0), 16 heads."""
    lens = torch.randint(128, 4097, (64,), generator=torch.Generator().manual_seed(0))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to("cuda", torch.int32)
    total, mx = int(lens.sum()), int(lens.max())
    q, k, v, dout = (torch.randn(total, 16, d, device="cuda", dtype=dtype) for _ in range(4))
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_cute.flash_attn_varlen_func(qq, kk, vv, cu, cu, mx, mx, causal=causal)
    o2, lse, s1, s2, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, False)
    profile_calls(f"varlen d{d} causal={causal}", (
        ("flash_cute", lambda: torch.autograd.grad(out, (qq, kk, vv), dout, retain_graph=True)),
        ("torch-flash", lambda: torch.ops.aten._flash_attention_backward(dout, q, k, v, o2, lse, cu, cu, mx, mx, 0.0, causal, s1, s2)),
    ))


def run(d, seqlen, causal, dtype=torch.bfloat16):
    b, h = 16384 // seqlen, 2048 // d
    q, k, v, dout = (torch.randn(b, seqlen, h, d, device="cuda", dtype=dtype) for _ in range(4))
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_cute.flash_attn_func(qq, kk, vv, causal=causal)
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        o2 = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dt = dout.transpose(1, 2)
    profile_calls(f"d{d} s{seqlen} causal={causal}", (
        ("flash_cute", lambda: torch.autograd.grad(out, (qq, kk, vv), dout, retain_graph=True)),
        ("torch-flash", lambda: torch.autograd.grad(o2, (qt, kt, vt), dt, retain_graph=True)),
    ))

if __name__ == "__main__":
    for spec in sys.argv[1:]:  # d:seqlen:causal, or varlen:d:causal
        a, b, c = spec.split(":")
        if a == "varlen":
            run_varlen(int(b), c == "1")
        else:
            run(int(a), int(b), c == "1")
