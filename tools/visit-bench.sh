# The benchmark suite of docs/performance.md in one device visit (about 6 minutes on an H200), on
# the full default wheel (../shared/tools/gpu-build, unpacked in .gpu/site).
# Device tool, carry .gpu:  bash tools/visit-bench.sh [PART...]   (default: all four parts)
#   fwd            the forward grid
#   varlen-decode  the varlen and decode sections
#   bwd            the backward grid with the GQA and peak-memory sections
#   fwdbwd         the forward+backward grid
#   options        the options section (softcap, windows, ALiBi, dropout; bf16 d128 4k)
# Each part is one benchmark/run.py command; its outputs come back as $OUT/<part>.tar (the device
# tool returns at most 8 files). At a part's time limit SIGINT makes run.py write what it measured.
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(fwd varlen-decode bwd fwdbwd)
cp python/flash_cute/*.py .gpu/site/flash_cute/
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
for part in "${parts[@]}"; do
  case $part in
    fwd) args=(--pass fwd --no-varlen --no-decode); limit=200 ;;
    varlen-decode) args=(--varlen --decode); limit=60 ;;
    bwd) args=(--pass bwd --no-varlen --no-decode); limit=200 ;;
    fwdbwd) args=(--pass fwdbwd --no-varlen --no-decode --no-memory); limit=180 ;;
    options) args=(--options); limit=150 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  echo "+ python3 benchmark/run.py ${args[*]} --out /tmp/bench/$part"
  timeout -s INT $limit python3 benchmark/run.py "${args[@]}" --out /tmp/bench/$part > /tmp/bench-$part.stdout 2>&1
  echo "rc $?"; cp /tmp/bench-$part.stdout /tmp/bench/$part/stdout.txt 2>/dev/null
  tar -C /tmp/bench -cf "$OUT/$part.tar" "$part"
  sed -n '/^SUMMARY/,$p' /tmp/bench-$part.stdout | grep -v "^# wrote"
done
