"""Where the host time of a tiny flash_cute call goes: the first host sync of a forward call (its
traceback), then cProfile of forward and of forward + backward calls (top functions by own time).

    PYTHONPATH=.gpu/site python3 tools/host_profile.py
"""

import cProfile
import pstats
import traceback

import torch

import flash_cute

q, k, v = (torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn_like(q)


def fwd():
    return flash_cute.flash_attn_func(q.detach(), k.detach(), v.detach())


def fwd_bwd():
    out = flash_cute.flash_attn_func(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout)


for f in (fwd, fwd_bwd):
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        f()
        print(f"{f.__name__}: no host sync")
    except RuntimeError:
        print(f"{f.__name__}: host sync at")
        traceback.print_exc(limit=-8)
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        f()
    prof.disable()
    torch.cuda.synchronize()
    print(f"--- {f.__name__}: 200 calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
