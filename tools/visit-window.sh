# One device visit comparing two development wheels on the masked variants (windows, causal): the
# GPU tests of the forward paths on the second wheel, then tools/window_probe.py on both wheels,
# twice, alternating. Device tool, carry the wheel dirs; logs in $OUT.
#   bash tools/visit-window.sh .gpu/N .gpu/W      (TESTS=0: probes only)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for w in "$@"; do cp python/flash_cute/*.py $w/site/flash_cute/; done
export PYTHONPATH=$PWD/$2/site
if [ "${TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest ${TEST_FILES:-tests/test_fwd_gpu.py tests/test_options_kernels.py tests/test_varlen.py tests/test_packed.py} \
    -q -m "not slow" -p no:cacheprovider --tb=line > $OUT/test.log 2>&1
  echo "tests: $(tail -1 $OUT/test.log)"
  grep -E "^(/|E |FAILED)" $OUT/test.log | grep -v "FLASH_CUTE_HEAD_DIMS\|FLASH_CUTE_DTYPES\|FLASH_CUTE_CUDA_ARCHS" | head -20
fi
for round in 1 2; do
  for w in "$@"; do
    PYTHONPATH=$PWD/$w/site timeout 100 python3 tools/window_probe.py > $OUT/probe-$(basename $w)-$round.log 2>&1
    echo "== $w (round $round)"; cat $OUT/probe-$(basename $w)-$round.log
  done
done
