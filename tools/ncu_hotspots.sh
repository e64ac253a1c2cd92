#!/usr/bin/env bash
# The SASS instructions of flash_cute's backward kernel with the most shared-memory bank conflicts
# ("excessive" shared wavefronts) and the most warp stalls, from ncu's source page. Dev aid.
# Usage: bash tools/ncu_hotspots.sh [d] [seqlen]   (writes $OUT/hotspots.csv when $OUT is set)
d=${1:-128}; s=${2:-4096}
rep=${OUT:-/tmp}/bwd_source
ncu --clock-control none -k regex:bwd_kernel -c 1 --section SourceCounters --section WarpStateStats \
  -f -o "$rep" python3 -c "
import torch, flash_cute
b,s,h,d=16384//$s,$s,2048//$d,$d
q,k,v,do=(torch.randn(b,s,h,d,device='cuda',dtype=torch.bfloat16) for _ in range(4))
qq,kk,vv=(t.detach().requires_grad_() for t in (q,k,v))
o=flash_cute.flash_attn_func(qq,kk,vv); torch.autograd.grad(o,(qq,kk,vv),do)
" > /dev/null 2>&1
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv" 2>&1
python3 - "$rep.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if any("Source" == c or "Address" == c for c in r))
cols = rows[head]
data = rows[head + 1:]
def col(name):
    return next((i for i, c in enumerate(cols) if name.lower() in c.lower()), None)
src, exc, stall = col("Source"), col("Shared Excessive"), col("Warp Stall Sampling (All")
print("columns:", [c for c in cols][:40])
def num(x):
    try: return float(x.replace(",", ""))
    except Exception: return 0.0
for key, name in ((exc, "bank-conflict wavefronts"), (stall, "stall samples")):
    if key is None: continue
    print(f"== top instructions by {name}")
    for r in sorted(data, key=lambda r: -num(r[key]))[:15]:
        print(f"{num(r[key]):12.0f}  {r[src][:110]}")
PY
