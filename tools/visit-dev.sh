# One device visit for development wheels (built with a reduced kernel set): the GPU tests of the
# backward, options and varlen paths on the first wheel (failures that only say a kernel was not
# built are counted apart), then tools/options_probe.py on every wheel, twice, alternating.
# Device tool, carry the wheel dirs; logs in $OUT.
#   bash tools/visit-dev.sh .gpuA .gpuB     (TESTS=0: probes only; PROBE_VARIANTS=a,b: which)
export PYTHONPATH=$PWD/$1/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
for w in "$@"; do cp python/flash_cute/*.py $w/site/flash_cute/; done
if [ "${TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest ${TEST_FILES:-tests/test_bwd_gpu.py tests/test_options_kernels.py tests/test_varlen.py} \
    -q -m "not slow" -p no:cacheprovider --tb=line > $OUT/test.log 2>&1
  echo "tests: $(tail -1 $OUT/test.log)"
  echo "failures not about a kernel missing from the reduced build:"
  grep -E "^(/|E |FAILED)" $OUT/test.log | grep -v "FLASH_CUTE_HEAD_DIMS\|FLASH_CUTE_DTYPES\|FLASH_CUTE_CUDA_ARCHS" | head -20
fi
for round in 1 2; do
  for w in "$@"; do
    PYTHONPATH=$PWD/$w/site timeout 100 python3 tools/options_probe.py 4096 128 ${PROBE_VARIANTS:-softcap,dropout} \
      > $OUT/probe-$(basename $w)-$round.log 2>&1
    echo "== $w (round $round)"; cat $OUT/probe-$(basename $w)-$round.log
  done
done
