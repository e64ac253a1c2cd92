"""Summary of tools/ncu_source.sh CSVs: a kernel's warp stall samples and executed instructions per
segment between BAR.SYNC instructions (in address order), with each segment's most executed
opcodes and largest stall reasons (in % of the kernel's samples). Dev aid.
Usage: python3 tools/ncu_segments.py src-bwd-plain.csv src-bwd-softcap.csv ..."""
import collections
import csv
import re
import sys


def load(path):
    rows = list(csv.reader(open(path)))
    head, data = rows[1], rows[2:]
    ix = {c: i for i, c in enumerate(head)}

    def num(r, c):
        try:
            return float(r[ix[c]].replace(",", ""))
        except ValueError:
            return 0.0

    stall_cols = [c for c in head if c.startswith("stall_") and "(Not" not in c]
    return [dict(src=r[ix["Source"]].strip(), samples=num(r, "Warp Stall Sampling (All Samples)"),
                 ex=num(r, "Instructions Executed"), stalls={c[6:]: num(r, c) for c in stall_cols})
            for r in data if len(r) >= len(head)]


def opcode(src):
    return re.sub(r"^@!?U?P\w+\s+", "", src).split(" ")[0]


def segments(instructions):
    segs, cur = [], []
    for i in instructions:
        if opcode(i["src"]).startswith("BAR") and cur:
            segs.append(cur)
            cur = []
        cur.append(i)
    return segs + [cur] if cur else segs


for path in sys.argv[1:]:
    ins = load(path)
    total = sum(i["samples"] for i in ins)
    print(f"== {path.split('/')[-1]}: samples {total:.0f}, warp instructions executed "
          f"{sum(i['ex'] for i in ins) / 1e6:.1f}M")
    for seg in segments(ins):
        samples = sum(i["samples"] for i in seg)
        if samples < 0.01 * total:
            continue
        ops, stalls = collections.Counter(), collections.Counter()
        for i in seg:
            ops[opcode(i["src"]).split(".")[0]] += i["ex"]
            stalls.update(i["stalls"])
        print(f"  {seg[0]['src'][:30]:30s} n={len(seg):4d} samples {samples / total * 100:5.1f}%  "
              f"ex {sum(i['ex'] for i in seg) / 1e6:6.1f}M  "
              f"top ops {[(k, round(v / 1e6, 1)) for k, v in ops.most_common(5)]}  "
              f"stalls {[(k, round(v / total * 100, 1)) for k, v in stalls.most_common(4)]}")
