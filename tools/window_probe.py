"""Where the masked variants' time per visited tile goes (issue 6's windows bar), for kernel work:
forward and backward times of plain attention on short key ranges (no mask, fewer tiles per CTA)
against causal and windowed attention on the same number of tiles, bf16 d128, 16 heads.

    PYTHONPATH=.gpu/site python3 tools/window_probe.py [fwd]     (fwd: the forward only, 5 shapes)
"""

import pathlib
import sys

import torch
from triton.testing import do_bench

import flash_cute
from flash_cute import _ops

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmark"))
from run import visited_tiles  # noqa: E402

d, heads = 128, 16
fwd_tile = _ops._C().fwd_tile(d, False)[:2]
bwd_tile = _ops._C().bwd_tile(d)[:2]

cases = [
    ("plain 4k", 4, 4096, 4096, False, (-1, -1)),
    ("plain q4k k1152", 4, 4096, 1152, False, (-1, -1)),
    ("plain q4k k2176", 4, 4096, 2176, False, (-1, -1)),
    ("plain q1152 k4k", 4, 1152, 4096, False, (-1, -1)),
    ("causal 4k", 4, 4096, 4096, True, (-1, -1)),
    ("window 1024,1024", 4, 4096, 4096, False, (1024, 1024)),
    ("sliding 1024,0", 4, 4096, 4096, True, (1024, 0)),
    ("sliding b16", 16, 4096, 4096, True, (1024, 0)),
    ("plain b16 k1152", 16, 4096, 1152, False, (-1, -1)),
    ("window 1023,1024", 4, 4096, 4096, False, (1023, 1024)),
]
fwd_only = len(sys.argv) > 1 and sys.argv[1] == "fwd"
if fwd_only:
    cases = [c for c in cases if c[0] in ("plain 4k", "plain q4k k1152", "causal 4k", "window 1024,1024", "sliding 1024,0")]
base = None
print(f"bf16 d{d} heads {heads}; fwd tile {fwd_tile}, bwd tile {bwd_tile}; per tile: time / tiles over plain 4k's")
for name, b, sq, sk, causal, window in cases:
    q = torch.randn(b, sq, heads, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k, v = (torch.randn(b, sk, heads, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(2))
    kw = dict(causal=causal, window_size=window)
    fwd = do_bench(lambda: flash_cute.flash_attn_func(q, k, v, **kw), warmup=50, rep=300)
    bwd = 1.0
    if not fwd_only:
        out = flash_cute.flash_attn_func(q, k, v, **kw)
        dout = torch.randn_like(out)
        bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=50, rep=300)
    tf = b * visited_tiles(sq, sk, causal, window, *fwd_tile)
    tb = b * visited_tiles(sq, sk, causal, window, *bwd_tile)
    base = base or (fwd / tf, bwd / tb)
    print(f"{name:18s} fwd {fwd:7.3f} ms {tf:6d} tiles {fwd / tf / base[0]:6.3f}x/tile   "
          f"bwd {bwd:7.3f} ms {tb:6d} tiles {bwd / tb / base[1]:6.3f}x/tile")
