# A/B of backward wheels in one device visit: benchmark/run.py --pass bwd (bf16, head dims $HDIMS,
# default 256; seqlen 2k and 8k; torch's flash backend as the anchor) on each wheel in turn, two
# rounds, then the backward tests on each wheel but the first (TESTS: the test files, or none). OPTIONS=1:
# also benchmark/run.py --options at each of $HDIMS on each wheel (the kernels with options).
# Each argument is a directory holding site/ or site.tar.gz. Device tool, carry the wheel dirs;
# logs in $OUT.
#   bash tools/visit-bwd-rounds.sh .gpu/A .gpu/B
export PYTHONUNBUFFERED=1
out=${OUT:-device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
for w in "$@"; do
  [ -d "$w/site" ] || tar -C "$w" -xzf "$w/site.tar.gz"
  cp python/flash_cute/*.py "$w/site/flash_cute/"
done
args="--pass bwd --dtype bf16 --hdim ${HDIMS:-256} --seqlen 2048,8192 --no-varlen --no-decode --only flash_cute,torch-flash --no-plot --no-memory"
for round in 1 2; do
  for w in "$@"; do
    n=$(basename "$w")
    PYTHONPATH=$PWD/$w/site timeout 120 python3 benchmark/run.py $args --out "/tmp/bench/$n-$round" >> "$out/bench.txt" 2>&1
    echo "== $n, round $round" | tee -a "$out/table.txt"
    grep -E "^bwd +bf16 +[0-9]+ +(no|yes) +[0-9]+k +[0-9]" "/tmp/bench/$n-$round/log.txt" | tee -a "$out/table.txt"
  done
done
if [ "${OPTIONS:-0}" = 1 ]; then
  for h in ${HDIMS//,/ }; do
    for w in "$@"; do
      echo "== options d$h, $(basename "$w")" | tee -a "$out/options.txt"
      PYTHONPATH=$PWD/$w/site timeout 120 python3 benchmark/run.py --options --hdim "$h" --only flash_cute,torch-flash \
        2>&1 | grep -E "^(variant|plain|causal|window|sliding|softcap|alibi|dropout|combined) " | tee -a "$out/options.txt"
    done
  done
fi
shift
[ "${TESTS:-}" = none ] && exit 0
for w in "$@"; do
  PYTHONPATH=$PWD/$w/site timeout ${TEST_TIMEOUT:-150} python3 -m pytest ${TESTS:-tests/test_bwd_gpu.py tests/test_varlen.py} -q -m "not slow" \
    -p no:cacheprovider --tb=line > "$out/test-$(basename "$w").log" 2>&1
  echo "tests on $w: $(tail -1 "$out/test-$(basename "$w").log")"
done
