#!/usr/bin/env bash
# Where flash_cute's backward kernel spends shared-memory wavefronts, against the official FA2
# kernel (torch's aten op), bf16 d128 batch 4 seqlen 4k 16 heads (dropout 0.1 with DROPOUT=1):
# ncu's shared-memory table (instructions, wavefronts, bank conflicts per access kind) and the
# per-SASS-instruction source counters as CSV ($OUT/ncu-src-*.csv, for tools/ncu_segments.py or a
# look at the "L1 Wavefronts Shared Excessive" column). Dev aid.
# Usage: bash tools/bwd_ncu_smem.sh
out=${OUT:-/tmp}
p=$([ "${DROPOUT:-0}" = 1 ] && echo 0.1 || echo 0.0)
ncu --clock-control none -k regex:"bwd_kernel|dq_dk_dv" -c 2 --section MemoryWorkloadAnalysis_Tables \
  --section SourceCounters --section WarpStateStats -f -o /tmp/bwd_smem python3 -c "
import torch, flash_cute
b, s, h, d = 4, 4096, 16, 128
q, k, v, do = (torch.randn(b, s, h, d, device='cuda', dtype=torch.bfloat16) for _ in range(4))
qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
o = flash_cute.flash_attn_func(qq, kk, vv, dropout_p=$p)
torch.autograd.grad(o, (qq, kk, vv), do)
o2, lse, ra, rb, _ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, s, s, $p, False, False)
torch.ops.aten._flash_attention_backward(do, q, k, v, o2, lse, None, None, s, s, $p, False, ra, rb)
" > /dev/null 2>&1
ncu -i /tmp/bwd_smem.ncu-rep --page details --print-details all --section MemoryWorkloadAnalysis_Tables \
  --section WarpStateStats > $out/ncu-smem-tables.txt 2>&1
for k in bwd_kernel dq_dk_dv; do
  ncu -i /tmp/bwd_smem.ncu-rep -k regex:$k --page source --csv --print-source sass > $out/ncu-src-$k.csv 2>&1
done
grep -vE "^\s+(OPT|INF|WRN)|----|^\s{10,}\S" $out/ncu-smem-tables.txt | cut -c1-150
