"""Dev: the ws attention with each dequantization route (tilelang.WS_DQ) against FlashMLA, one GPU (graphflush us).
Usage: python -m bench.attend_dq_dev [flash|pro] ROUTE..."""

import sys

import torch

from bench.configs import Case
from bench.run import SETUPS
from bench.timing import graphflush_us
from dsv4fn.attend import tilelang as tla

BATCHES = {"flash": (1, 32, 64, 128, 256), "pro": (1, 4, 32, 64, 128, 256)}


def main() -> None:
    config = sys.argv[1]
    routes = sys.argv[2:]
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}; V4-{config}; graphflush us")
    for b in BATCHES[config]:
        bench = SETUPS["attend"](Case("attend", config, "decode", b, 65536), dev)
        run_peer, check_peer = bench.peers["flashmla"]()
        assert check_peer(run_peer())[0]
        peer = graphflush_us(run_peer, rep_ms=20)
        line = [f"b={b:<4d} FlashMLA {peer:6.1f}"]
        for route in routes:
            tla.WS_DQ = route
            fn = bench.make("tilelang", False)
            ok, _ = bench.check(bench.make("tilelang", True)())
            t = graphflush_us(fn, rep_ms=20)
            line.append(f"{route} {t:6.1f} ({peer / t:.2f}x){'' if ok else ' FAIL'}")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
