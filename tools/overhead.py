#!/usr/bin/env python3
"""Per-call overhead of flash_cute on a tiny shape, beside PyTorch's SDPA flash backend and the
official flash_attn (when it imports): where the GPU work is a few microseconds, the host cost of
a call (argument checks, dispatch, allocations, the launch) is what one pays.

Shape: batch 1, seqlen 128, 4 heads, head dim 64, bf16 (--batch, --seqlen, --heads, --hdim,
--dtype); decoding: one query row against a cache of --seqlen rows, one new k/v row appended in
place (into the same slot at every call), cache_seqlens an int32 tensor.

Cases (rows): fwd, fwd+bwd (torch.autograd.grad of q, k, v), varlen fwd (one sequence,
cu_seqlens on the GPU), decode (flash_attn_with_kvcache; SDPA: the attention over the cache rows
alone, no append). Columns per implementation:
  host us   the CPU time to issue one call, with the GPU kept busy by torch.cuda._sleep so that
            the calls only queue (the time a Python training or decoding loop spends per call);
  wall us   back-to-back calls, synchronised at the end: max(host, GPU) per call;
  graph us  the same call captured in a CUDA graph, per replay (the GPU time with no host cost);
  allocs    CUDA caching-allocator allocations per call (torch.cuda.memory_stats);
  syncs     host syncs per call (torch.cuda.set_sync_debug_mode("warn") warnings; 0 expected).

    python tools/overhead.py                # the table, with the GPU's name
    python tools/overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hdim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=100,
                   help="calls per measurement (default 100: few enough kernels to fit CUDA's launch queue)")
    p.add_argument("--sleep-cycles", type=float, default=2e8,
                   help="GPU cycles of the sleep kernel that keeps the GPU busy while the host time is taken "
                        "(default 2e8, ~0.1 s; it must outlast issuing --calls calls)")
    p.add_argument("--repeats", type=int, default=7, help="measurements per cell; the median is printed (default 7)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Implementations: name -> {case: a zero-argument callable making one call}


def api_calls(api, x):
    """The calls of a module with flash_attn's interface (flash_cute, or the official flash_attn)."""

    def fwd():
        return api.flash_attn_func(x["q"], x["k"], x["v"], causal=True)

    def fwd_bwd():
        out = api.flash_attn_func(x["qg"], x["kg"], x["vg"], causal=True)
        return torch.autograd.grad(out, (x["qg"], x["kg"], x["vg"]), x["dout"])

    def varlen():
        return api.flash_attn_varlen_func(x["q1"], x["k1"], x["v1"], x["cu"], x["cu"], x["s"], x["s"], causal=True)

    def decode():
        return api.flash_attn_with_kvcache(x["qd"], x["kc"], x["vc"], x["kn"], x["vn"], cache_seqlens=x["seqlens"],
                                           causal=True)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "varlen fwd": varlen, "decode": decode}


def sdpa_flash_calls(x):
    """SDPA's calls; main() measures them inside sdpa_kernel(FLASH_ATTENTION), so the context
    manager's own cost is not counted."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = {n: x[n].transpose(1, 2) for n in ("q", "k", "v", "qd", "kc", "vc")}  # (batch, heads, seqlen, d) views
    tg = {n: x[n].transpose(1, 2) for n in ("qg", "kg", "vg")}
    dout = x["dout"].transpose(1, 2)

    def fwd():
        return sdpa(t["q"], t["k"], t["v"], is_causal=True)

    def fwd_bwd():
        out = sdpa(tg["qg"], tg["kg"], tg["vg"], is_causal=True)
        return torch.autograd.grad(out, (x["qg"], x["kg"], x["vg"]), dout)

    def decode():  # the attention over the visible cache rows; no append
        return sdpa(t["qd"], t["kc"], t["vc"])

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "decode": decode}


def backend_context(name):
    if name != "sdpa-flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def make_inputs(args):
    dev, dtype = "cuda", DTYPES[args.dtype]
    b, s, h, d = args.batch, args.seqlen, args.heads, args.hdim

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype)

    x = {"q": randn(b, s, h, d), "k": randn(b, s, h, d), "v": randn(b, s, h, d), "dout": randn(b, s, h, d), "s": s}
    for n in ("q", "k", "v"):
        x[n + "g"] = x[n].clone().requires_grad_()
    x["q1"], x["k1"], x["v1"] = (randn(s, h, d) for _ in range(3))
    x["cu"] = torch.tensor([0, s], dtype=torch.int32, device=dev)
    x["qd"] = randn(b, 1, h, d)
    x["kc"], x["vc"] = randn(b, s, h, d), randn(b, s, h, d)
    x["kn"], x["vn"] = randn(b, 1, h, d), randn(b, 1, h, d)
    x["seqlens"] = torch.full((b,), s - 1, dtype=torch.int32, device=dev)
    return x


# ------------------------------------------------------------------------------------------------
# Measurements


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def host_us(call, calls, sleep_cycles):
    """CPU time per call while the GPU is busy (the calls queue behind a sleep kernel)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(sleep_cycles))
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def wall_us(call, calls):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def graph_us(call, calls):
    """Per replay of the call captured in a CUDA graph (None if it cannot be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
    except Exception:  # noqa: BLE001 - not capturable: no number
        torch.cuda.synchronize()
        return None
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def allocs_per_call(call, calls=20):
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (torch.cuda.memory_stats().get("allocation.all.allocated", 0) - before) / calls


def syncs_per_call(call):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # (not torch's one-time "Synchronization debug mode is a prototype feature" warning, which the
    # first measured case used to count as a sync)
    return sum("synchroniz" in str(w.message) and "debug mode" not in str(w.message) for w in caught)


def measure(call, args):
    for _ in range(10):  # warm-up: lazy initialisation, caches, the allocator's pools
        call()
    torch.cuda.synchronize()
    return {
        "host_us": median([host_us(call, args.calls, args.sleep_cycles) for _ in range(args.repeats)]),
        "wall_us": median([wall_us(call, args.calls) for _ in range(args.repeats)]),
        "graph_us": graph_us(call, args.calls),
        "allocs": allocs_per_call(call),
        "syncs": syncs_per_call(call),
    }


def version_of(module_name):
    try:
        module = __import__(module_name)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return None, f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"
    return module, getattr(module, "__version__", "?")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tools/overhead.py needs a CUDA GPU", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    fc, fc_version = version_of("flash_cute")
    fa, fa_version = version_of("flash_attn")
    env = {"gpu": props.name, "capability": f"sm_{props.major}{props.minor}", "torch": torch.__version__,
           "cuda": torch.version.cuda, "flash_cute": fc_version, "flash_attn": fa_version,
           "shape": dict(batch=args.batch, seqlen=args.seqlen, heads=args.heads, hdim=args.hdim, dtype=args.dtype)}
    if fc is not None:
        try:
            env["flash_cute_build"] = {k: v for k, v in fc.build_info().items() if k != "fwd_kernels"}
        except Exception as exc:  # noqa: BLE001
            env["flash_cute_build"] = f"unavailable: {exc}"
    print(f"GPU: {props.name} ({env['capability']}), torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"flash_cute {fc_version}; flash_attn {fa_version}")
    print(f"shape: batch {args.batch}, seqlen {args.seqlen}, {args.heads} heads, head dim {args.hdim}, {args.dtype}; "
          f"decode: 1 query row against {args.seqlen} cache rows (+1 appended; SDPA: no append)")
    torch.manual_seed(0)
    x = make_inputs(args)
    impls = {}
    if fc is not None:
        impls["flash_cute"] = api_calls(fc, x)
    impls["sdpa-flash"] = sdpa_flash_calls(x)
    if fa is not None:
        impls["flash_attn"] = api_calls(fa, x)
    results = []
    header = f"{'case':<11} {'impl':<11} {'host us':>8} {'wall us':>8} {'graph us':>9} {'allocs':>7} {'syncs':>6}"
    print()
    print(header)
    print("-" * len(header))
    for case in ("fwd", "fwd+bwd", "varlen fwd", "decode"):
        for name, calls in impls.items():
            if case not in calls:
                continue
            try:
                with backend_context(name):
                    r = measure(calls[case], args)
            except Exception as exc:  # noqa: BLE001 - one failing cell does not stop the table
                print(f"{case:<11} {name:<11} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                results.append({"case": case, "impl": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            graph = "-" if r["graph_us"] is None else f"{r['graph_us']:9.1f}"
            print(f"{case:<11} {name:<11} {r['host_us']:8.1f} {r['wall_us']:8.1f} {graph:>9} {r['allocs']:7.1f} "
                  f"{r['syncs']:6d}")
            results.append({"case": case, "impl": name, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
