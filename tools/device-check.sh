#!/usr/bin/env bash
# One visit to the GPU host: tests, a compute-sanitizer sweep and the benchmark, on the wheel that
# ../shared/tools/gpu-build unpacked into .gpu/site. Logs go to $OUT (or ./device-out); the short
# tables come last. Usage (device tool, carry .gpu):  bash tools/device-check.sh [quick|full|bench|test|sanitize]
# (test: the tests and the sanitizer sweep only; sanitize: the sweep only; bench: the benchmark only)
set -uo pipefail
mode=${1:-quick}
out=${OUT:-device-out}
mkdir -p "$out"
# Python sources travel with the checkout: refresh them so a Python-only change needs no rebuild.
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import flash_cute; print(flash_cute.__version__, flash_cute.build_info())" | tee -a "$out/gpu.txt"

if [ "$mode" != bench ]; then
  [ "$mode" = sanitize ] || python3 -m pytest tests -x -q -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -n 25
  # Small ragged sweep (forward and backward, atomic and deterministic) under memcheck and racecheck
  # (SANITIZER_TOOLS overrides the list).
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    compute-sanitizer --tool $tool --error-exitcode 1 python3 - <<'PY' > "$out/sanitizer-$tool.log" 2>&1
import torch, flash_cute
torch.manual_seed(0)
for d in (40, 96, 128, 224, 256):
    for sq, sk in ((1, 1), (113, 203), (257, 97)):
        for causal in (False, True):
            q = torch.randn(2, sq, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, sk, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(2, sk, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            try:
                for deterministic in (False, True):
                    out = flash_cute.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
                    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            except RuntimeError as e:
                if "FLASH_CUTE_HEAD_DIMS" not in str(e): raise
# Varlen: empty and length-1 sequences, max_seqlen hints too small (the kernels loop), paged K/V.
lens_q, lens_k = [0, 1, 130, 7, 300, 65], [5, 0, 97, 7, 301, 200]
cu = lambda lens: torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
for d in (64, 128):
    q = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    try:
        for causal in (False, True):
            for deterministic in (False, True):
                for max_q, max_k in ((300, 301), (64, 64)):
                    out = flash_cute.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max_q, max_k,
                                                            causal=causal, deterministic=deterministic)
                    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        pages = torch.randn(40, 64, 2, d, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(40, device="cuda")[:36].view(6, 6).to(torch.int32)
        flash_cute.flash_attn_varlen_func(q.detach(), pages, pages, cu(lens_q), cu(lens_k), 300, 301, block_table=table)
    except RuntimeError as e:
        if "FLASH_CUTE_HEAD_DIMS" not in str(e): raise
# flash_attn_with_kvcache: appends crossing pages (16: gathered; 64: read in place), rotary, GQA.
for d in (64, 128):
    try:
        for page in (16, 64):
            q = torch.randn(3, 2, 8, d, device="cuda", dtype=torch.bfloat16)
            k_cache, v_cache = (torch.randn(4 * 256 // page, page, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            table = torch.randperm(k_cache.shape[0], device="cuda")[:3 * 256 // page].view(3, -1).to(torch.int32)
            k, v = (torch.randn(3, 2, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            angles = torch.rand(258, 16, device="cuda")
            seqlens = torch.tensor([0, 63, 200], dtype=torch.int32, device="cuda")
            for splits in (0, 1, 3):
                flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, angles.cos().bfloat16(), angles.sin().bfloat16(),
                                                   cache_seqlens=seqlens, block_table=table, causal=True, num_splits=splits)
        # Contiguous rows through cache_batch_idx, left padding, split-KV with the combine pass.
        k_cache, v_cache = (torch.randn(5, 300, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        idx = torch.tensor([4, 0, 2], dtype=torch.int32, device="cuda")
        pad = torch.tensor([0, 5, 17], dtype=torch.int32, device="cuda")
        for splits in (1, 4):
            flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, cache_batch_idx=idx,
                                               cache_leftpad=pad, causal=False, num_splits=splits)
    except RuntimeError as e:
        if "FLASH_CUTE_HEAD_DIMS" not in str(e): raise
# The options: windows (plain kernels), softcap + ALiBi + window (options kernels), dropout with
# S_dmask (dropout kernels), varlen and deterministic; the decoding kernel with every option.
for d in (64, 128, 160):
    try:
        q = torch.randn(2, 257, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, 113, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        slopes = torch.rand(2, 4, device="cuda")
        for kw in (dict(window_size=(20, 5)), dict(causal=True, window_size=(30, 0), softcap=5.0, alibi_slopes=slopes),
                   dict(dropout_p=0.3, window_size=(50, 50), alibi_slopes=slopes)):
            for deterministic in (False, True):
                out = flash_cute.flash_attn_func(q, k, v, deterministic=deterministic, return_attn_probs=True, **kw)[0]
                torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        qv = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = flash_cute.flash_attn_varlen_func(qv, kv, kv, cu(lens_q), cu(lens_k), 64, 64, dropout_p=0.2,
                                                softcap=3.0, window_size=(40, 7), alibi_slopes=torch.rand(6, 4, device="cuda"))
        torch.autograd.grad(out, (qv, kv), torch.randn_like(out))
        k_cache, v_cache = (torch.randn(5, 300, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for splits in (1, 4):
            flash_cute.flash_attn_with_kvcache(q[:, :3].detach(), k_cache, v_cache, cache_seqlens=torch.tensor([7, 290], dtype=torch.int32, device="cuda"),
                                               causal=True, window_size=(50, 0), softcap=4.0, alibi_slopes=slopes, num_splits=splits)
    except (RuntimeError, NotImplementedError) as e:
        if "FLASH_CUTE_HEAD_DIMS" not in str(e) and "FLASH_CUTE_OPTION_KERNELS" not in str(e): raise
torch.cuda.synchronize()
print("sweep done")
PY
    echo "compute-sanitizer $tool: exit $? ($(grep -E 'ERROR SUMMARY|sweep done' "$out/sanitizer-$tool.log" | tr '\n' ' '))"
    # What the sweep above does not reach: tiny head dims, the packed functions, the decoding
    # kernel's limits and the long-query route of the kvcache, a grid with batch x heads > 65,535.
    compute-sanitizer --tool $tool --error-exitcode 1 python3 tools/sanitizer_extra.py > "$out/sanitizer-extra-$tool.log" 2>&1
    echo "compute-sanitizer $tool (tools/sanitizer_extra.py): exit $? ($(grep -E 'ERROR SUMMARY|sweep done' "$out/sanitizer-extra-$tool.log" | tr '\n' ' '))"
  done
fi

if [ "$mode" = test ] || [ "$mode" = sanitize ]; then
  exit 0
elif [ "$mode" = full ]; then
  python3 benchmark/run.py --out "$out/bench" 2>&1 | tee "$out/bench.log" | tail -n 60
else
  python3 benchmark/run.py --quick --out "$out/bench" 2>&1 | tee "$out/bench.log" | tail -n 60
fi
