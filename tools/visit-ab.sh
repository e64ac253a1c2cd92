# One device visit comparing development wheels on issue 6's options: tools/options_probe.py on each
# wheel directory given (each holds site/), then tests/test_options_kernels.py (d128) and
# benchmark/run.py --options on the first. Device tool, carry the wheel dirs; logs in $OUT.
#   bash tools/visit-ab.sh .gpu .gpuA      (PROBE_ONLY=1: the probes only; PROBE_VARIANTS=a,b: which;
#                                           PROBE_HDIMS="192 256": head dims, 128 by default)
set -x
export PYTHONPATH=$PWD/$1/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for w in "$@"; do
  cp python/flash_cute/*.py $w/site/flash_cute/
  for hd in ${PROBE_HDIMS:-128}; do
    PYTHONPATH=$PWD/$w/site timeout 100 python3 tools/options_probe.py 4096 $hd ${PROBE_VARIANTS:-dropout,dropout-any,softcap,softcap-any} > $OUT/probe-$(basename $w)-d$hd.log 2>&1
    echo "== $w"; cat $OUT/probe-$(basename $w)-d$hd.log
  done
done
[ -n "$PROBE_ONLY" ] && exit 0
timeout 240 python3 -m pytest tests/test_options_kernels.py -x -q -k "not hdim64 and not d64" > $OUT/test.log 2>&1
tail -5 $OUT/test.log
timeout 200 python3 benchmark/run.py --options --out $OUT/bench-options > $OUT/bench-options.log 2>&1
grep -B2 -A14 "^variant" $OUT/bench-options.log
