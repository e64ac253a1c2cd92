# The test files after tests/test_options_kernels.py (a rerun after a failure stopped the full
# suite there), then tools/visit.sh. Logs in $OUT.
export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
timeout 250 python3 -m pytest tests/test_options_kernels.py tests/test_packed.py tests/test_reference_cpu.py tests/test_selfcheck.py tests/test_validation.py tests/test_varlen.py -q -p no:cacheprovider > $OUT/rest.log 2>&1
tail -4 $OUT/rest.log
bash tools/visit.sh
