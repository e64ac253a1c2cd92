set -x
export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
timeout 200 python3 -m pytest tests/test_options_kernels.py -q --maxfail=15 -p no:cacheprovider > $OUT/optk.log 2>&1
tail -40 $OUT/optk.log
timeout 150 python3 benchmark/run.py --options --out $OUT/bench > $OUT/bench.log 2>&1
tail -30 $OUT/bench.log
timeout 180 python3 -m pytest tests/test_options.py tests/test_kvcache.py tests/test_validation.py -q --maxfail=10 -p no:cacheprovider > $OUT/other.log 2>&1
tail -15 $OUT/other.log
