"""Where the eager (no CUDA graph) host time of the public steps goes, on one GPU.

For each step and backend at one V4-Flash decode shape: the host time per call (calls queued back to back,
no synchronisation), the L2-flushed `do_bench` time (the harness's `us(L2)`), and a cProfile of the Triton
calls (top functions by own time). Usage: python -m bench.host_dev [batch]
"""

import cProfile
import io
import pstats
import sys

import torch
import triton
import triton.testing

from bench.configs import Case
from bench.launch_dev import host_us
from bench.run import SETUPS


def profile(fn, n: int = 200, top: int = 28) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> None:
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    profiles = []
    for op in ("attend", "index_logits", "index_topk"):
        bench = SETUPS[op](Case(op, "flash", "decode", b, 65536), dev)
        for backend in ("triton", "tilelang"):
            fn = bench.make(backend, False)
            h = host_us(fn)
            l2 = triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3
            print(f"{op:14s} {backend:9s} b={b:<4d} host {h:7.1f} us/call   do_bench(L2) {l2:7.1f} us")
            if backend == "triton":
                profiles.append((op, profile(fn)))
    for op, text in profiles:
        print(f"\n===== cProfile {op} triton (200 calls) =====\n{text}")


if __name__ == "__main__":
    main()
