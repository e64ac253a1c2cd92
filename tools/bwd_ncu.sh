#!/usr/bin/env bash
# Counter comparison of flash_cute's backward kernel and the official FA2 one (torch's flash
# backend) on one shape: instructions, stalls, shared-memory bank conflicts, atomics. Dev aid.
# Usage: bash tools/bwd_ncu.sh [d] [seqlen]   or   bash tools/bwd_ncu.sh varlen [d] [causal 0/1]
# (varlen: 16 sequences, lengths uniform in 128..4096, 16 heads; the official kernel through
# torch.ops.aten._flash_attention_backward).
if [ "${1:-}" = varlen ]; then
  d=${2:-128}; causal=${3:-1}
  program="
import torch, flash_cute
lens=torch.randint(128,4097,(16,),generator=torch.Generator().manual_seed(0))
cu=torch.cat([torch.zeros(1,dtype=torch.int64),lens.cumsum(0)]).to('cuda',torch.int32); t,m=int(lens.sum()),int(lens.max())
q,k,v,do=(torch.randn(t,16,$d,device='cuda',dtype=torch.bfloat16) for _ in range(4))
qq,kk,vv=(x.detach().requires_grad_() for x in (q,k,v))
o=flash_cute.flash_attn_varlen_func(qq,kk,vv,cu,cu,m,m,causal=bool($causal)); torch.autograd.grad(o,(qq,kk,vv),do)
o2,lse,a,b,_=torch.ops.aten._flash_attention_forward(q,k,v,cu,cu,m,m,0.0,bool($causal),False)
torch.ops.aten._flash_attention_backward(do,q,k,v,o2,lse,cu,cu,m,m,0.0,bool($causal),a,b)"
else
d=${1:-128}; s=${2:-4096}
program="
import torch, torch.nn.functional as F, flash_cute
b,s,h,d=16384//$s,$s,2048//$d,$d
q,k,v,do=(torch.randn(b,s,h,d,device='cuda',dtype=torch.bfloat16) for _ in range(4))
qq,kk,vv=(t.detach().requires_grad_() for t in (q,k,v))
o=flash_cute.flash_attn_func(qq,kk,vv); torch.autograd.grad(o,(qq,kk,vv),do)
qt,kt,vt=(t.detach().transpose(1,2).requires_grad_() for t in (q,k,v))
with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
    o2=F.scaled_dot_product_attention(qt,kt,vt)
torch.autograd.grad(o2,(qt,kt,vt),do.transpose(1,2))"
fi
metrics=smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_red.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_op_red.sum,lts__t_sectors_op_read.sum,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_st.sum,smsp__inst_executed_op_ldsm.sum,gpu__time_duration.sum
ncu --clock-control none -k regex:"bwd_kernel|dq_dk_dv" -c 2 --metrics $metrics,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__cycles_active.avg python3 -c "$program" 2>&1 | grep -vE "^==PROF==|Warning" | sed -e 's/smsp__average_warps_issue_stalled_//' -e 's/_per_issue_active.ratio//' | grep -E "bwd_kernel|dq_dk_dv|  [a-z]" | cut -c1-140
