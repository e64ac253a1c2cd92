"""Development check of the backward pass on the GPU host: a few gradients against the fp32
oracle (the 2x rule) and backward timings beside torch's flash backend. The full checks are
tests/test_bwd_gpu.py and benchmark/run.py; this is the fast loop while tuning the kernel."""
import sys, time, torch, torch.nn.functional as F
import flash_cute
from flash_cute.reference import naive_attention

def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout)

def check(b, sq, sk, h, hk, d, causal, dtype=torch.bfloat16, deterministic=False):
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    got = grads(lambda q, k, v: flash_cute.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic), q, k, v, dout)
    ref = grads(lambda q, k, v: naive_attention(q, k, v, None, causal, dtype=torch.float32)[0], q.float(), k.float(), v.float(), dout.float())
    pt = grads(lambda q, k, v: naive_attention(q, k, v, None, causal, dtype=dtype)[0], q, k, v, dout)
    msg = []
    ok = True
    for name, g, r, e in zip("qkv", got, ref, pt):
        err = (g.float() - r).abs().max().item()
        errpt = (e.float() - r).abs().max().item()
        good = err <= 2 * errpt + 1e-4 and not g.isnan().any()
        ok &= good
        msg.append(f"d{name} {err:.2e}/{errpt:.2e}{'' if good else ' FAIL'}")
    print(f"{'ok  ' if ok else 'FAIL'} b{b} sq{sq} sk{sk} h{h}/{hk} d{d} causal={causal} det={deterministic}: " + ", ".join(msg), flush=True)
    return ok

def bench(fn, iters=20):
    """Median over 5 batches of `iters` back-to-back calls (launches queue up as in training),
    in ms per call."""
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    times = []
    for _ in range(5):
        s.record()
        for _ in range(iters): fn()
        e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e) / iters)
    times.sort()
    return times[len(times) // 2]

def timing(d, seqlen, causal, dtype=torch.bfloat16):
    b, h = 16384 // seqlen, 2048 // d
    q, k, v, dout = (torch.randn(b, seqlen, h, d, device="cuda", dtype=dtype) for _ in range(4))
    flops = 2.5 * 4 * b * h * seqlen * seqlen * d / (2 if causal else 1)
    res = {}
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_cute.flash_attn_func(qq, kk, vv, causal=causal)
    res["fc"] = bench(lambda: torch.autograd.grad(out, (qq, kk, vv), dout, retain_graph=True))
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        o2 = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dt = dout.transpose(1, 2)
    res["tf"] = bench(lambda: torch.autograd.grad(o2, (qt, kt, vt), dt, retain_graph=True))
    tf = {k_: flops / t / 1e9 for k_, t in res.items()}
    print(f"bwd d{d} s{seqlen} causal={int(causal)}: flash_cute {tf['fc']:.0f} TFLOP/s, torch-flash {tf['tf']:.0f}, ratio {tf['fc']/tf['tf']:.3f}", flush=True)
    return tf["fc"] / tf["tf"]

def deterministic_cost(d, seqlen, causal, nheads_k=None, dtype=torch.bfloat16):
    """Backward time with deterministic=True over the default (atomic) mode."""
    b, h = 16384 // seqlen, 2048 // d
    hk = nheads_k or h
    q, dout = (torch.randn(b, seqlen, h, d, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, seqlen, hk, d, device="cuda", dtype=dtype) for _ in range(2))
    times = {}
    for det in (False, True):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = flash_cute.flash_attn_func(qq, kk, vv, causal=causal, deterministic=det)
        times[det] = bench(lambda: torch.autograd.grad(out, (qq, kk, vv), dout, retain_graph=True))
    print(f"deterministic d{d} s{seqlen} heads {h}/{hk} causal={int(causal)}: {times[False]:.3f} ms -> "
          f"{times[True]:.3f} ms ({times[True] / times[False]:.3f}x)", flush=True)

if __name__ == "__main__":
    torch.manual_seed(0)
    ok = True
    dims = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "64,128").split(",")]
    for d in dims:
        for (sq, sk) in ((1, 1), (97, 113), (113, 97), (300, 300), (257, 1025)):
            for causal in (False, True):
                ok &= check(2, sq, sk, 4, 2, d, causal)
        ok &= check(2, 1000, 1000, 8, 1, d, True)
        ok &= check(1, 700, 900, 8, 8, d, True, deterministic=True)
    print("CORRECTNESS", "PASS" if ok else "FAIL", flush=True)
    ratios = []
    for d in [x for x in dims if x in (64, 128)]:
        for seqlen in (2048, 8192, 16384):
            for causal in (False, True):
                ratios.append(timing(d, seqlen, causal))
    for d in [x for x in dims if x in (64, 128)]:
        for seqlen in (2048, 16384):
            for causal in (False, True):
                deterministic_cost(d, seqlen, causal)
        deterministic_cost(d, 4096, True, nheads_k=2048 // d // 4)
    if ratios:
        import math
        print(f"geomean ratio {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")
