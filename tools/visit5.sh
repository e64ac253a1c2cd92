#!/usr/bin/env bash
# Issue 5 visit, part 2 (after `bash tools/device-check.sh test`): the decode benchmark, the
# kernel-time table and the self-test.
set -uo pipefail
out=${OUT:-device-out}; mkdir -p "$out"
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
timeout 60 python3 -m flash_cute > "$out/selftest.log" 2>&1; echo "selftest rc=$?"; tail -4 "$out/selftest.log"
timeout 150 python3 benchmark/run.py --decode --out "$out/bench" > "$out/decode.log" 2>&1; echo "bench rc=$?"
timeout 120 python3 tools/decode_sweep.py 2>&1 | grep -v -i warn | tee "$out/kernel_times.log"
grep -E "^ +[0-9]+ +[0-9]+k|^decode" "$out/decode.log"
