"""Dev sweep: the TileLang attention's KV-split count per batch against FlashMLA, one GPU.

For V4-Flash (or V4-Pro) decode at 64k (the harness's `attend` case), each batch is timed with the split
heuristic (`choose_splits`) and with forced split counts around it (`dsv4fn.attend.tilelang.FORCE_SPLITS`),
every variant checked against the reference first. Timer: `graphflush` (one call replayed from a CUDA graph, L2
flushed before each replay). Usage: python -m bench.tilelang_splits_dev [flash|pro]
       python -m bench.tilelang_splits_dev pair [B...]   # V4-Pro with the ws kernel's pair mode off / on
"""

import sys

import torch

from bench.configs import Case
from bench.run import SETUPS
from bench.timing import graphflush_us
from dsv4fn.attend import tilelang as tla

CANDIDATES = {
    "flash": {1: (4, 6, 8, 10), 32: (2, 3, 4, 5, 6), 64: (1, 2, 3), 128: (1, 2, 3), 256: (1, 2)},
    # V4-Pro: 128 heads = two 64-head CTAs a row, 128 + 1024 keys (18 blocks)
    "pro": {1: (4, 6, 9, 12, 16, 18), 4: (8, 9, 16, 18), 32: (1, 2, 3), 64: (1, 2)},
}


def compare(config: str, b: int, knob: str, values: tuple, names: list[str], head: str = "") -> None:
    """One line: FlashMLA, then the TileLang op with module knob `knob` of dsv4fn.attend.tilelang set to each of
    `values` (restored after), each checked against the reference before it is timed."""
    bench = SETUPS["attend"](Case("attend", config, "decode", b, 65536), torch.device("cuda"))
    run_peer, check_peer = bench.peers["flashmla"]()
    assert check_peer(run_peer())[0]
    peer = graphflush_us(run_peer, rep_ms=20)
    line = [f"b={b:<4d} {head}FlashMLA {peer:6.1f}"]
    old = getattr(tla, knob)
    try:
        for value, name in zip(values, names, strict=True):
            setattr(tla, knob, value)
            fn = bench.make("tilelang", False)
            ok, detail = bench.check(bench.make("tilelang", True)())
            t = graphflush_us(fn, rep_ms=20)
            line.append(f"{name} {t:6.1f} ({peer / t:.2f}x){'' if ok else ' FAIL ' + str(detail)[:80]}")
    finally:
        setattr(tla, knob, old)
    print(" | ".join(line), flush=True)


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "flash"
    print(f"device {torch.cuda.get_device_name()}; graphflush us")
    if config == "pair":  # V4-Pro: the ws kernel's 2-CTA cluster mode off / on every path (tla.WS_PAIR)
        for b in [int(a) for a in sys.argv[2:]] or (1, 32, 64, 128, 256):
            head = f"splits={tla.choose_splits(b, 1, 128, 128, 1024, 'ws')} "
            compare("pro", b, "WS_PAIR", ("off", "all"), ["pair=0", "pair=1"], head)
        return
    for b, cands in CANDIDATES[config].items():  # heuristic = choose_splits, then forced split counts
        compare(config, b, "FORCE_SPLITS", (None, *cands), ["heur", *(f"s={c}" for c in cands)])


if __name__ == "__main__":
    main()
