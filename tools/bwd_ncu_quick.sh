#!/usr/bin/env bash
# A few ncu counters of flash_cute's backward kernel (plain, or dropout 0.1 with DROPOUT=1), bf16
# d128 batch 4 seqlen 4k 16 heads, for each wheel directory given (its site/): time, instructions,
# shared-load bank conflicts, barrier / LG / MIO throttle stalls per issue, registers. Dev aid.
# Usage: bash tools/bwd_ncu_quick.sh .gpu/A .gpu/B
p=$([ "${DROPOUT:-0}" = 1 ] && echo 0.1 || echo 0.0)
m=gpu__time_duration.sum,smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,launch__registers_per_thread
for s in barrier lg_throttle mio_throttle long_scoreboard short_scoreboard wait; do
  m=$m,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio
done
for w in "$@"; do
  echo "== $w"
  PYTHONPATH=$PWD/$w/site ncu --clock-control none -k regex:bwd_kernel -c 1 --metrics $m python3 -c "
import torch, flash_cute
q, k, v, do = (torch.randn(4, 4096, 16, 128, device='cuda', dtype=torch.bfloat16) for _ in range(4))
qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
torch.autograd.grad(flash_cute.flash_attn_func(qq, kk, vv, dropout_p=$p), (qq, kk, vv), do)
" 2>&1 | grep -E "^\s+(gpu__|smsp__|l1tex__|launch__)" | sed -e 's/smsp__average_warps_issue_stalled_//' -e 's/_per_issue_active.ratio//'
done
