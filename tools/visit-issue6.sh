# One device visit for issue 6 on a development wheel: the options probe, the options tests and the
# plain forward/backward tests, the options benchmark. Device tool, carry .gpu; logs in $OUT.
set -x
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 100 python3 tools/options_probe.py > $OUT/probe.log 2>&1
cat $OUT/probe.log
timeout 240 python3 -m pytest tests/test_options_kernels.py -x -q -k "not hdim64 and not d64" > $OUT/test.log 2>&1
tail -15 $OUT/test.log
timeout 150 python3 -m pytest tests/test_bwd_gpu.py tests/test_fwd_gpu.py -x -q > $OUT/test-plain.log 2>&1; tail -3 $OUT/test-plain.log
timeout 200 python3 benchmark/run.py --options --out $OUT/bench-options > $OUT/bench-options.log 2>&1
grep -B2 -A14 "^variant" $OUT/bench-options.log
