# One device visit for issue 6's options: kernel tests, then the options benchmark (logs in $OUT).
export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
timeout 240 python3 -m pytest tests/test_options_kernels.py tests/test_options.py -q -x -p no:cacheprovider > $OUT/optk.log 2>&1
tail -5 $OUT/optk.log
timeout 200 python3 benchmark/run.py --options --out $OUT/bench > $OUT/bench.log 2>&1
grep -A12 "^variant" $OUT/bench.log
