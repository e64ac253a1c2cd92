"""Decode timing experiments (exploration; benchmark/run.py makes the claims).
python3 tools/decode_sweep.py: repeated timings per (batch, cache, layout, splits), and the GPU
kernels of one call (torch.profiler) with their durations."""
import torch
import flash_cute
from triton.testing import do_bench

torch.manual_seed(0)
H, HK, D = 32, 8, 128


def inputs(batch, cache, layout):
    q = torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16)
    kn = torch.randn(batch, 1, HK, D, device="cuda", dtype=torch.bfloat16)
    vn = torch.randn_like(kn)
    seqlens = torch.full((batch,), cache - 1, dtype=torch.int32, device="cuda")
    if layout == "contiguous":
        kc = torch.randn(batch, cache, HK, D, device="cuda", dtype=torch.bfloat16)
        table = None
    else:
        page = int(layout[5:])
        kc = torch.randn(batch * cache // page, page, HK, D, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(batch * cache // page, device="cuda", dtype=torch.int32).view(batch, -1)
    return q, kc, torch.randn_like(kc), kn, vn, seqlens, table


def run(batch, cache, layout, splits_list, repeats=1):
    q, kc, vc, kn, vn, seqlens, table = inputs(batch, cache, layout)
    gb = 2 * batch * cache * HK * D * 2 / 1e9
    for r in range(repeats):
        for s in splits_list:
            f = lambda: flash_cute.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table,
                                                           causal=True, num_splits=s)
            ms = do_bench(f, warmup=50, rep=200, return_mode="median")
            print(f"b{batch:<4} cache {cache:>6} {layout:<10} splits {s:>3} (rep {r}): {ms * 1e3:8.1f} us "
                  f"{gb / ms * 1e3:7.0f} GB/s", flush=True)
    return q, kc, vc, kn, vn, seqlens, table


def kernel_times(f, flush: bool, n=20):
    """GPU time per call of each kernel of f, with or without an L2 flush (256 MB zeroed) before each call."""
    buf = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            if flush:
                buf.zero_()
            f()
        torch.cuda.synchronize()
    return {e.key[:40]: e.device_time_total / n for e in prof.key_averages() if e.device_time_total > 0}


if __name__ == "__main__":
    for batch, cache, layout in ((32, 4096, "contiguous"), (32, 4096, "paged16"), (1, 131072, "contiguous"),
                                 (1, 131072, "paged16"), (8, 32768, "contiguous")):
        q, kc, vc, kn, vn, seqlens, table = inputs(batch, cache, layout)
        f = lambda: flash_cute.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table,
                                                       causal=True)
        for flush in (False, True, False, True):
            t = kernel_times(f, flush)
            print(f"b{batch} {cache} {layout} flush={flush}: " + ", ".join(f"{k}: {v:.1f} us" for k, v in t.items()),
                  flush=True)
        if layout == "contiguous":
            kt, vt = kc[:, :cache - 1].transpose(1, 2), vc[:, :cache - 1].transpose(1, 2)
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                g = lambda: torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, enable_gqa=True)
                for flush in (False, True):
                    t = kernel_times(g, flush)
                    print(f"  torch-flash flush={flush}: " + ", ".join(f"{k}: {v:.1f} us" for k, v in t.items()), flush=True)
        del q, kc, vc
