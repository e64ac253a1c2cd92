#!/usr/bin/env bash
# Issue 5 visit: kvcache tests first (the new kernel), then the decode sweep and benchmark;
# `all` also runs the rest of the test suite.
set -uo pipefail
out=${OUT:-device-out}; mkdir -p "$out"
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest tests/test_kvcache.py -x -q -p no:cacheprovider > "$out/kv.log" 2>&1; echo "kvcache tests rc=$?"; tail -25 "$out/kv.log"
if [ "${1:-}" = sweep ]; then timeout 150 python3 tools/decode_sweep.py > "$out/sweep.log" 2>&1; echo "sweep rc=$?"; fi
timeout 150 python3 benchmark/run.py --decode --out "$out/bench" > "$out/decode.log" 2>&1; echo "bench rc=$?"
if [ "${1:-}" = all ]; then
  timeout 200 python3 -m pytest tests -x -q -p no:cacheprovider --ignore=tests/test_kvcache.py > "$out/all.log" 2>&1; echo "all tests rc=$?"; tail -6 "$out/all.log"
fi
[ -f "$out/sweep.log" ] && cat "$out/sweep.log"
tail -22 "$out/decode.log"
