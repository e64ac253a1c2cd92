# One device visit on the full wheel (../shared/tools/gpu-build with the defaults), under 10 minutes:
# every test (slow ones apart), then the compute-sanitizer sweeps (memcheck and racecheck of
# tools/device-check.sh's sweep and of tools/sanitizer_extra.py), then, with arguments, those
# parts of tools/visit-bench.sh. Device tool, carry .gpu:
#   [SANITIZER_TOOLS=memcheck] bash tools/visit-session.sh [BENCH_PART...]      (logs in $OUT)
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import flash_cute; print(flash_cute.build_info())" | tee -a $OUT/gpu.txt
timeout 330 python3 -m pytest tests -q -m "not slow" -p no:cacheprovider > $OUT/pytest.log 2>&1
echo "pytest (not slow): rc $?"; grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head -20; tail -2 $OUT/pytest.log
SANITIZER_TOOLS=${SANITIZER_TOOLS:-memcheck racecheck} timeout 200 bash tools/device-check.sh sanitize 2>&1 | grep compute-sanitizer
[ $# -gt 0 ] && bash tools/visit-bench.sh "$@"
