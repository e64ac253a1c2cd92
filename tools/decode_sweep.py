"""GPU time of the decoding kernels alone, beside torch's flash backend (torch.profiler; no host
overhead in the numbers). benchmark/run.py --decode makes the claims (whole calls); this tells
how much of a call is kernel. python3 tools/decode_sweep.py"""
import torch

import flash_cute

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
    # GPU time of the kernels alone (torch.profiler), L2 flushed before each call as do_bench does:
    # the issue-5 decode shapes, flash_cute's layouts beside torch's flash backend (contiguous).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"# {torch.cuda.get_device_name()}; us per call of the GPU kernels (decode + combine), L2 flushed")
    for batch, cache in ((1, 131072), (8, 32768), (32, 4096), (128, 2048)):
        row = {}
        for layout in ("contiguous", "paged256", "paged16"):
            q, kc, vc, kn, vn, seqlens, table = inputs(batch, cache, layout)
            f = lambda: flash_cute.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=table,
                                                           causal=True)
            t = kernel_times(f, True)
            row[layout] = sum(v for k, v in t.items() if "flash_cute" in k)
            if layout == "contiguous":
                kt, vt = kc[:, :cache - 1].transpose(1, 2), vc[:, :cache - 1].transpose(1, 2)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    g = lambda: torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kt, vt,
                                                                                 enable_gqa=True)
                    t = kernel_times(g, True)
                row["torch-flash"] = sum(v for k, v in t.items() if "flash" in k)
            del q, kc, vc
        tf = row["torch-flash"]
        print(f"b{batch:<4} cache {cache:>6}: torch-flash {tf:6.1f}  " +
              "  ".join(f"{k} {v:6.1f} ({tf / v:.2f}x)" for k, v in row.items() if k != "torch-flash"), flush=True)
