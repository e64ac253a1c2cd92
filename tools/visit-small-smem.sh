# One device visit for the small-shared-memory tiles (what sm_86, sm_89 and sm_120 run), forced on
# this GPU by FLASH_CUTE_FORCE_SMALL_SMEM_TILE: compute-sanitizer memcheck and racecheck of
# tools/device-check.sh's sweep plus the buckets it leaves out (d32, d192, with options and dropout),
# then the backward on the benchmark's grid (bf16, seqlen 2k and 8k) with the default and the
# small tiles, each against torch's flash backend in the same run. Full wheel in .gpu/site; device
# tool, carry .gpu/site:
#   bash tools/visit-small-smem.sh [sanitize|bench]   (logs in $OUT; default both)
# SMALL_DIMS (default "32 192"): the head dims of the extra sanitizer calls; BENCH_HDIMS (default
# 64,128,192): the benchmark's; a wheel built with fewer head dims names its own.
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
out=${OUT:-device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu-small.txt"
mode=${1:-all}
export FLASH_CUTE_FORCE_SMALL_SMEM_TILE=1
[ "$mode" != bench ] && SANITIZER_TOOLS=${SANITIZER_TOOLS:-memcheck racecheck} OUT=$out/small timeout 200 bash tools/device-check.sh sanitize \
  2>&1 | grep compute-sanitizer
[ "$mode" = bench ] || for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
  timeout 90 compute-sanitizer --tool $tool --error-exitcode 1 python3 tools/sanitize_dims.py > "$out/sanitizer-small-$tool.log" 2>&1
  echo "compute-sanitizer $tool (d ${SMALL_DIMS:-32 192} with options): rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer-small-$tool.log" | tail -1)"
done
unset FLASH_CUTE_FORCE_SMALL_SMEM_TILE
[ "$mode" = sanitize ] && exit 0
args="--pass bwd --dtype bf16 --hdim ${BENCH_HDIMS:-64,128,192} --seqlen 2048,8192 --no-varlen --no-decode --only flash_cute,torch-flash --no-plot"
timeout 80 python3 benchmark/run.py $args --out "$out/bwd-default" > "$out/bwd-default.txt" 2>&1
FLASH_CUTE_FORCE_SMALL_SMEM_TILE=1 timeout 80 python3 benchmark/run.py $args --out "$out/bwd-small" > "$out/bwd-small.txt" 2>&1
for f in default small; do echo "== backward, $f tiles"; grep -E 'bwd|fc/tf|seqlen' "$out/bwd-$f.txt" | tail -14; done
