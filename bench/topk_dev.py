"""Dev timing of the Triton top-k paths (one program per row vs (row, chunk) programs) against torch.topk.

CUDA-graph replay with the L2 flushed (`bench.attend_dev.graph_time_us`), median µs, on rows of n logits
(n = context / 4: 2k, 16k, 64k, 256k entries), k = 512. Each path is checked against the other (bitwise).
Usage: python -m bench.topk_dev [chunk,...]
"""

import sys

import torch

from bench.attend_dev import graph_time_us
from dsv4fn.index_topk import triton as tri


def main() -> None:
    chunks = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "2048,4096,8192").split(",")]
    print(f"device {torch.cuda.get_device_name()}; k = 512; times in us (graph replay, L2 flushed)")
    print(f"{'t':>4} {'n':>7} {'one/row':>8} " + " ".join(f"{'split' + str(c):>10}" for c in chunks) + "  torch.topk")
    for n in (2048, 16384, 65536, 262144):
        for t in (1, 8, 32, 128, 256):
            g = torch.Generator(device="cuda").manual_seed(t + n)
            logits = torch.randn(t, n, device="cuda", generator=g)
            vis = torch.full((t,), n, dtype=torch.int32, device="cuda")
            pt = torch.arange(t * n // 64, dtype=torch.int32, device="cuda").view(t, n // 64)
            treq = torch.arange(t, dtype=torch.int32, device="cuda")

            def run(split, chunk=4096, logits=logits, vis=vis, pt=pt, treq=treq):
                tri.TOPK_CONFIG.update(split=split, chunk=chunk)
                return tri.select_topk(logits, vis, 512, 512, pt, treq, 64)

            base = run(0)
            line = f"{t:4d} {n:7d} {graph_time_us(lambda: run(0)):8.1f} "
            for c in chunks:
                got = run(1, c)
                same = torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
                line += f"{graph_time_us(lambda c=c: run(1, c)):9.1f}{' ' if same else '!'}"
            line += f" {graph_time_us(lambda x=logits: torch.topk(x, 512, dim=-1)):9.1f}"
            print(line, flush=True)
    tri.TOPK_CONFIG.update(split=-1, chunk=4096)
    print("(! = split output differs from one/row)")


if __name__ == "__main__":
    main()
