# The benchmark suite of docs/performance.md, split into device visits of at most 10 minutes, on
# the full default wheel (../shared/tools/gpu-build, unpacked in .gpu/site).
# Device tool, carry .gpu:  bash tools/visit-bench.sh fwd|bwd|fwdbwd   (results in $OUT/<part>)
#   fwd     the forward grid; then the varlen and decode sections (in $OUT/varlen-decode)
#   bwd     the backward grid with the GQA and peak-memory sections
#   fwdbwd  the forward+backward grid
# At the time limit SIGINT makes run.py write what it measured so far.
part=${1:?usage: tools/visit-bench.sh fwd|bwd|fwdbwd}
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
bench() {  # seconds, then run.py's arguments
  local limit=$1; shift
  echo "+ python3 benchmark/run.py $*"
  timeout -s INT "$limit" python3 benchmark/run.py "$@" > "$OUT/$part.stdout" 2>&1
  echo "rc $?"; grep -A40 "^SUMMARY\|^VARLEN\|^DECODE" "$OUT/$part.stdout" | tail -40; tail -3 "$OUT/$part.stdout"
}
case $part in
  fwd) bench 390 --pass fwd --no-varlen --no-decode --out "$OUT/fwd"
       part=varlen-decode bench 170 --varlen --decode --out "$OUT/varlen-decode" ;;
  bwd) bench 570 --pass bwd --no-varlen --no-decode --out "$OUT/bwd" ;;
  fwdbwd) bench 570 --pass fwdbwd --no-varlen --no-decode --no-memory --out "$OUT/fwdbwd" ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
