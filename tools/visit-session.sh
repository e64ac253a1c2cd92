# One device visit on the full wheel (../shared/tools/gpu-build with the defaults): every test
# (slow ones apart), the tensors over 2^31 elements, the per-call overhead, the compute-sanitizer memcheck sweeps.
# Device tool, carry .gpu:  bash tools/visit-session.sh   (logs in $OUT)
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import flash_cute; print(flash_cute.build_info())" | tee -a $OUT/gpu.txt
timeout 330 python3 -m pytest tests -q -m "not slow" -p no:cacheprovider > $OUT/pytest.log 2>&1
echo "pytest (not slow): rc $?"; grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head -20; tail -2 $OUT/pytest.log
timeout 120 python3 -m pytest tests -q -m slow -k over_2g -p no:cacheprovider > $OUT/pytest-slow.log 2>&1
echo "pytest (slow): rc $?"; grep -E "^(FAILED|ERROR)" $OUT/pytest-slow.log | head; tail -2 $OUT/pytest-slow.log
timeout 40 python3 tools/overhead.py > $OUT/overhead.log 2>&1; tail -25 $OUT/overhead.log
SANITIZER_TOOLS=memcheck timeout 100 bash tools/device-check.sh sanitize 2>&1 | grep compute-sanitizer
