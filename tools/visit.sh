# One device visit for issue 6's options: kernel tests, the probe, ncu (logs in $OUT).
export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
timeout 240 python3 -m pytest tests/test_options_kernels.py -q -x -p no:cacheprovider > $OUT/optk.log 2>&1
tail -3 $OUT/optk.log
timeout 120 python3 tools/options_probe.py > $OUT/probe.log 2>&1
cat $OUT/probe.log
timeout 200 bash tools/options_ncu.sh fwd > $OUT/ncu.log 2>&1
cat $OUT/ncu.log
