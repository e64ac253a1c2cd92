export PYTHONPATH=$PWD/.gpu/site
cp python/flash_cute/*.py .gpu/site/flash_cute/
python3 -c "import flash_cute; print(flash_cute.build_info())" > $OUT/build.txt 2>&1
timeout 420 python3 -m pytest tests/test_options_kernels.py tests/test_options.py -q -p no:cacheprovider > $OUT/optk-full.log 2>&1
tail -4 $OUT/optk-full.log
timeout 100 python3 -m flash_cute > $OUT/selfcheck.log 2>&1
tail -6 $OUT/selfcheck.log
