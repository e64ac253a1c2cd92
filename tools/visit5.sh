#!/usr/bin/env bash
# Issue 5 visit: kvcache tests first (the new kernel), then the decode benchmark, then the rest.
set -uo pipefail
out=${OUT:-device-out}; mkdir -p "$out"
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest tests/test_kvcache.py -x -q -p no:cacheprovider > "$out/kv.log" 2>&1; echo "kvcache tests rc=$?"; tail -25 "$out/kv.log"
timeout 150 python3 benchmark/run.py --decode --out "$out/bench" > "$out/decode.log" 2>&1; echo "bench rc=$?"
timeout 200 python3 -m pytest tests -x -q -p no:cacheprovider --ignore=tests/test_kvcache.py > "$out/all.log" 2>&1; echo "all tests rc=$?"; tail -6 "$out/all.log"
tail -40 "$out/decode.log"
