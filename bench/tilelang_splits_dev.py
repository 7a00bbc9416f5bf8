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


def pair(batches: list[int]) -> None:
    """V4-Pro: the ws kernel with and without its 2-CTA cluster mode (tla.WS_PAIR), heuristic splits, against
    FlashMLA; each variant checked first."""
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}; V4-pro; graphflush us; ws pair mode off / on vs FlashMLA")
    for b in batches or (1, 32, 64, 128, 256):
        bench = SETUPS["attend"](Case("attend", "pro", "decode", b, 65536), dev)
        run_peer, check_peer = bench.peers["flashmla"]()
        assert check_peer(run_peer())[0]
        peer = graphflush_us(run_peer, rep_ms=20)
        line = [f"b={b:<4d} splits={tla.choose_splits(b, 1, 128, 128, 1024, 'ws')} FlashMLA {peer:6.1f}"]
        for on in (False, True):
            tla.WS_PAIR = "all" if on else "off"
            fn = bench.make("tilelang", False)
            ok, detail = bench.check(bench.make("tilelang", True)())
            t = graphflush_us(fn, rep_ms=20)
            line.append(f"pair={int(on)} {t:6.1f} ({peer / t:.2f}x){'' if ok else ' FAIL ' + str(detail)[:80]}")
        tla.WS_PAIR = "direct"
        print(" | ".join(line), flush=True)


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "flash"
    if config == "pair":
        pair([int(a) for a in sys.argv[2:]])
        return
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}; V4-{config}; graphflush us; heuristic = choose_splits")
    for b, cands in CANDIDATES[config].items():
        bench = SETUPS["attend"](Case("attend", config, "decode", b, 65536), dev)
        run_peer, check_peer = bench.peers["flashmla"]()
        assert check_peer(run_peer())[0]
        peer = graphflush_us(run_peer, rep_ms=20)
        line = [f"b={b:<4d} FlashMLA {peer:6.1f}"]
        for forced in (None, *cands):
            tla.FORCE_SPLITS = forced
            fn = bench.make("tilelang", False)
            ok, _ = bench.check(bench.make("tilelang", True)())
            t = graphflush_us(fn, rep_ms=20)
            name = "heur" if forced is None else f"s={forced}"
            line.append(f"{name} {t:6.1f} ({peer / t:.2f}x){'' if ok else ' FAIL'}")
        tla.FORCE_SPLITS = None
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
