"""Summarise `ncu --page source --print-source sass --csv` output: the SASS instructions with the most warp stall
samples, with neighbours (usage: python ncu_src_parse.py file.csv [top])."""

import csv
import sys

rows = list(csv.reader(open(sys.argv[1], errors="replace")))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
hdr_i = next(i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r))
hdr = rows[hdr_i]
body = [r for r in rows[hdr_i + 1 :] if len(r) == len(hdr)]
print("columns:", [h for h in hdr][:25])
src = hdr.index("Source")
cand = [i for i, h in enumerate(hdr) if "Sampling" in h and "All" in h]
col = cand[0] if cand else next(i for i, h in enumerate(hdr) if "Sampling" in h)
print("sample column:", hdr[col])


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


total = sum(num(r[col]) for r in body)
order = sorted(range(len(body)), key=lambda i: -num(body[i][col]))[:top]
print(f"instructions {len(body)}, samples {total:.0f}")
for i in sorted(order):
    r = body[i]
    print(f"{i:5d} {num(r[col]) / total * 100:5.1f}%  {r[src].strip()[:110]}")
# stall reasons per instruction (columns containing 'stall' in the top 8 rows)
reason_cols = [j for j, h in enumerate(hdr) if h.startswith("stall_") or ("Stall" in h and j != col)]
print("reason columns:", [hdr[j] for j in reason_cols][:30])
