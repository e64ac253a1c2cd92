# One device visit for issue 6's options: kernel tests, the probe (logs in $OUT).
export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
timeout 300 python3 -m pytest tests/test_options_kernels.py tests/test_fwd_gpu.py tests/test_bwd_gpu.py -q -x -p no:cacheprovider > $OUT/optk.log 2>&1
tail -3 $OUT/optk.log
timeout 120 python3 tools/options_probe.py > $OUT/probe.log 2>&1
cat $OUT/probe.log
