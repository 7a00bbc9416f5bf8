"""Where a whole-layer decode step spends its GPU time: torch.profiler over CUDA-graph-free eager steps of
`attention_layer` on the kernels (V4-Flash, CSA and HCA layers), top kernels by device time.

Usage: python -m bench.layer_profile_dev [batch] [context]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.configs import Case
from bench.run import setup_layer


def main() -> None:
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
    dev = torch.device("cuda")
    for op in ("layer_csa", "layer_hca"):
        bench = setup_layer(Case(op, "flash", "decode", b, ctx), dev)
        step = bench.make("triton", False)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"== {op} flash decode b={b} ctx={ctx}: per step, top kernels by CUDA time (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
