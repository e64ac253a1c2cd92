#!/usr/bin/env bash
# ncu's per-instruction source counters (stall samples, executed instructions) of one flash_cute
# kernel (bf16, d128, seqlen 4k, batch 4, 16 heads) with one option, as CSV in $OUT. Dev aid.
# Usage: bash tools/ncu_source.sh fwd|bwd plain|softcap|dropout|alibi ...
kind=$1; shift
for variant in "$@"; do
  rep=${OUT:-/tmp}/src-$kind-$variant
  ncu --clock-control none -k regex:${kind}_kernel -c 1 --section SourceCounters --section WarpStateStats \
    -f -o "$rep" python3 -c "
import torch, flash_cute
b, s, h, d = 4, 4096, 16, 128
q, k, v, do = (torch.randn(b, s, h, d, device='cuda', dtype=torch.bfloat16) for _ in range(4))
qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
kw = dict(plain={}, softcap=dict(softcap=30.0), dropout=dict(dropout_p=0.1),
          alibi=dict(alibi_slopes=torch.rand(h, device='cuda')))['$variant']
o = flash_cute.flash_attn_func(qq, kk, vv, **kw)
if '$kind' == 'bwd':
    torch.autograd.grad(o, (qq, kk, vv), do)
" > /dev/null 2>&1
  ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv" 2>&1
  rm -f "$rep.ncu-rep"
  echo "$variant: $(wc -l < "$rep.csv") lines"
done
