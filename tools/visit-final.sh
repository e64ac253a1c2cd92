export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
timeout 250 python3 -m pytest tests/test_options_kernels.py tests/test_packed.py tests/test_reference_cpu.py tests/test_selfcheck.py tests/test_validation.py tests/test_varlen.py -q -p no:cacheprovider > $OUT/rest.log 2>&1
tail -4 $OUT/rest.log
# One device visit for issue 6's options: the options benchmark, decoding benchmark (regression
# check of the decoding kernel, which now takes the options), the probe. Logs in $OUT.
export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 200 python3 benchmark/run.py --options --out $OUT/bench-options > $OUT/bench-options.log 2>&1
timeout 150 python3 benchmark/run.py --decode --out $OUT/bench-decode > $OUT/bench-decode.log 2>&1
timeout 100 python3 tools/options_probe.py > $OUT/probe.log 2>&1
tail -4 $OUT/bench-decode.log
grep -B2 -A14 "^variant" $OUT/bench-options.log
cat $OUT/probe.log
