"""`python -m bench.plot [CSV] [--out DIR]`: PNGs from the benchmark CSV.

For each (op[/variant], model, mode, context) with decode rows: time vs batch (log-log, one line per
implementation, the roofline time dashed) and % of roofline vs batch. Default CSV: every
bench/results/*/results.csv; the PNGs go next to it. Needs matplotlib (`pip install matplotlib`,
or the `bench` extra); without it the script says so and exits with status 2.
"""

import argparse
import csv
import glob
import math
import os
import sys
from collections import defaultdict


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def load(path: str, timer: str) -> list[dict[str, str]]:
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("timer") == timer and r.get("status") == "ok"]
    # the newest run of a (case, impl) wins
    latest: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        latest[(r["case"], r["impl"])] = r
    return list(latest.values())


def plot(path: str, out_dir: str, timer: str) -> list[str]:
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        print("bench.plot: matplotlib is not installed (pip install matplotlib); no plots drawn", file=sys.stderr)
        raise SystemExit(2) from None
    rows = load(path, timer)
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r["mode"] == "prefill":
            continue
        op = r["op"] + (f"-{r['variant']}" if r["variant"] else "")
        groups[(op, r["config"], r["mode"], r["context"])].append(r)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (op, model, mode, ctx), grp in sorted(groups.items()):
        by_impl: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
        for r in grp:
            by_impl[r["impl"]].append(
                (int(r["batch"]), _float(r["time_us"]), _float(r["pct_roofline"]), _float(r["roofline_us"]))
            )
        fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5))
        roof: dict[int, float] = {}
        for impl, pts in sorted(by_impl.items()):
            pts.sort()
            b = [p[0] for p in pts]
            ax_t.plot(b, [p[1] for p in pts], marker="o", label=impl)
            ax_p.plot(b, [p[2] for p in pts], marker="o", label=impl)
            roof.update({p[0]: p[3] for p in pts if not math.isnan(p[3])})
        if roof:
            rb = sorted(roof)
            ax_t.plot(rb, [roof[x] for x in rb], "k--", label="roofline")
        ctx_s = f"{int(ctx) // 1024}k" if int(ctx) < 1 << 20 else f"{int(ctx) >> 20}M"
        title = f"{op} {model} {mode} ctx {ctx_s} ({timer})"
        ax_t.set(xscale="log", yscale="log", xlabel="batch", ylabel="median time (µs)", title=title)
        ax_p.set(xscale="log", xlabel="batch", ylabel="% of roofline", title=title)
        ax_p.axhline(100, color="k", ls="--", lw=0.8)
        for ax in (ax_t, ax_p):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = os.path.join(out_dir, f"{op}_{model}_{mode}_ctx{ctx_s}_{timer}.png")
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("csv", nargs="*", help="results.csv files (default: bench/results/*/results.csv)")
    p.add_argument("--out", default=None, help="output folder (default: <csv folder>/plots)")
    p.add_argument("--timer", default="graphflush", help="graphflush, l2flush, cudagraph or cpu")
    args = p.parse_args(argv)
    paths = args.csv or sorted(glob.glob(os.path.join(os.path.dirname(__file__), "results", "*", "results.csv")))
    if not paths:
        print("bench.plot: no results.csv found; run python -m bench.run first", file=sys.stderr)
        return 1
    for path in paths:
        out = args.out or os.path.join(os.path.dirname(path), "plots")
        names = plot(path, out, args.timer)
        print(f"bench.plot: {len(names)} PNGs from {path} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
