# One device visit for a backward change, development wheel .gpu/site against a baseline wheel
# (its site/ under the directory given): tools/options_probe.py on both (the options' cost over
# plain at PROBE_HDIMS), the small-shared-memory backward (forced by FLASH_CUTE_FORCE_SMALL_SMEM_TILE)
# on both through benchmark/run.py with torch's flash backend as the anchor, then on .gpu/site the
# backward, options and varlen tests and the compute-sanitizer sweep of tools/device-check.sh under
# the hook (the default tiles' sweep is tools/visit-session.sh's). Device tool, carry .gpu/site and
# the baseline; logs in $OUT.
#   bash tools/visit-bwd-ab.sh .gpu/A        (PROBE_HDIMS="128 256", SMALL_HDIMS=128 by default)
base=$1
export PYTHONUNBUFFERED=1
out=${OUT:-device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
for w in "$base" .gpu; do cp python/flash_cute/*.py $w/site/flash_cute/; done
for hd in ${PROBE_HDIMS:-128 256}; do
  for w in "$base" .gpu; do
    PYTHONPATH=$PWD/$w/site timeout 100 python3 tools/options_probe.py 4096 $hd ${PROBE_VARIANTS:-softcap,alibi,dropout,sliding} \
      > "$out/probe-$(basename $w)-d$hd.log" 2>&1
    echo "== $w"; cat "$out/probe-$(basename $w)-d$hd.log"
  done
done
args="--pass bwd --dtype bf16 --hdim ${SMALL_HDIMS:-128} --seqlen 2048,8192 --no-varlen --no-decode --only flash_cute,torch-flash --no-plot --no-memory"
for w in "$base" .gpu; do
  FLASH_CUTE_FORCE_SMALL_SMEM_TILE=1 PYTHONPATH=$PWD/$w/site timeout 80 python3 benchmark/run.py $args \
    > "$out/small-$(basename $w).txt" 2>&1
  echo "== small tiles, $w"; grep -E 'bwd|fc/tf|seqlen' "$out/small-$(basename $w).txt" | tail -8
done
export PYTHONPATH=$PWD/.gpu/site
timeout 200 python3 -m pytest tests/test_bwd_small_smem.py tests/test_bwd_gpu.py tests/test_options_kernels.py \
  tests/test_varlen.py -q -m "not slow" -p no:cacheprovider --tb=line > "$out/test.log" 2>&1
echo "tests: $(tail -1 "$out/test.log")"
grep -E "^(/|E |FAILED)" "$out/test.log" | grep -v "FLASH_CUTE_HEAD_DIMS\|FLASH_CUTE_DTYPES" | head -10
FLASH_CUTE_FORCE_SMALL_SMEM_TILE=1 OUT=$out/small timeout ${SANITIZE_S:-200} bash tools/device-check.sh sanitize 2>&1 |
  grep compute-sanitizer
