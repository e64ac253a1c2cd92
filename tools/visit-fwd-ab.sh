# A/B of two full wheels on the forward, one device visit: the GPU tests (not slow) on the second,
# compute-sanitizer racecheck on small masked forward calls, tools/fixed_cost_probe.py on both
# (head dims $HDIMS, default "64 256"), then the bf16 forward grid (benchmark/run.py --pass fwd --dtype bf16) on both.
# Device tool, carry the wheel dirs; logs in $OUT.
#   bash tools/visit-fwd-ab.sh .gpu/N .gpu/V2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# A wheel dir may come as site.tar.gz (two full wheels exceed what a visit carries): unpack it.
for w in "$@"; do [ -d $w/site ] || tar -C $w -xzf $w/site.tar.gz; done
for w in "$@"; do cp python/flash_cute/*.py $w/site/flash_cute/; done
B=$PWD/$2/site
PYTHONPATH=$B timeout 250 python3 -m pytest tests -q -m "not slow" -p no:cacheprovider --tb=line > $OUT/test.log 2>&1
echo "tests: $(tail -1 $OUT/test.log)"; grep -E "^(/|E |FAILED)" $OUT/test.log | head -10
cat > /tmp/race.py <<'PY'
import torch, flash_cute
for s, d, kw in [(300, 128, dict(causal=True)), (700, 64, dict(window_size=(100, 50))), (333, 256, dict(causal=True, softcap=20.0)),
                 (257, 128, dict(dropout_p=0.1)), (129, 32, {})]:
    q, k, v = (torch.randn(2, s, 4, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    flash_cute.flash_attn_func(q, k, v, **kw)
torch.cuda.synchronize(); print("ok")
PY
PYTHONPATH=$B timeout 90 compute-sanitizer --tool racecheck python3 /tmp/race.py > $OUT/racecheck.txt 2>&1; tail -2 $OUT/racecheck.txt
for hd in ${HDIMS:-64 256}; do for w in "$@"; do
  echo "== $w d$hd" | tee -a $OUT/probes.txt
  PYTHONPATH=$PWD/$w/site timeout 60 python3 tools/fixed_cost_probe.py $hd 2>&1 | tee -a $OUT/probes.txt | tail -3
done; done
for w in "$@"; do
  n=$(basename $w)
  PYTHONPATH=$PWD/$w/site timeout -s INT 70 python3 benchmark/run.py --pass fwd --dtype bf16 --no-varlen --no-decode --out /tmp/bench/fwd-$n > /tmp/fwd-$n.stdout 2>&1
  cp /tmp/fwd-$n.stdout /tmp/bench/fwd-$n/stdout.txt 2>/dev/null; tar -C /tmp/bench -cf $OUT/fwd-$n.tar fwd-$n
  echo "== $n"; sed -n '/^SUMMARY/,$p' /tmp/fwd-$n.stdout | grep -v "^# wrote"
done
