"""Where the eager (no CUDA graph) host time of one Triton attention call goes, on one GPU.

Times, per call on the host (the GPU work is tiny: b=1, 64 heads, 640 keys): the public `attend`, the
backend adapter, the `dsv4fn::sparse_attn` custom op, and the raw Triton launches the op makes.
Usage: python -m bench.launch_dev
"""

import time

import torch
import triton

from bench.attend_dev import make_inputs
from dsv4fn import attend
from dsv4fn.attend import triton as at


def host_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    q, main_c, idx, lens, kw = make_inputs(1, 64, 128, 512)
    ec = kw["extra_cache"]
    scale = 512**-0.5
    args = (q, main_c.data, idx, lens, ec.data, kw["extra_indices"], kw["extra_lens"], kw["sink"], scale,
            128, 64, 448, 64, 64, 1, 64)  # fmt: skip
    o = torch.empty_like(q)
    lse = torch.empty((1, 64, 1), device="cuda")

    def raw():
        at._sparse_attn_fwd[(1,)](
            q, q.stride(0), q.stride(1), q.stride(2), main_c.data, main_c.data.stride(0), idx, lens, 128, 128,
            ec.data, ec.data.stride(0), kw["extra_indices"], kw["extra_lens"], 512, 64, kw["sink"], o, lse, 64, 1,
            scale * 1.4426950408889634, 1, 10, NOPE=448, ROPE=64, TILE=64, NT=7, NT_P=8, REC=576, SB=8,
            BLOCK_H=64, BLOCK_N=64, HAS_LEN1=True, HAS_EXTRA=True, HAS_LEN2=True, HAS_SINK=True, SINGLE=True,
            PREFETCH=False, DEQ_BF16=False, INTERPRET=False, num_warps=8, num_stages=1,
        )  # fmt: skip

    rows = {
        "public attend(backend='triton')": lambda: attend(q, main_c, idx, lens, scale=scale, backend="triton", **kw),
        "adapter sparse_attention_triton": lambda: at.sparse_attention_triton(q, main_c, idx, lens, scale=scale, **kw),
        "op torch.ops.dsv4fn.sparse_attn (1 split)": lambda: at.sparse_attn(*args),
        "raw Triton launch (1 kernel)": raw,
        "torch.empty x2 (allocations)": lambda: (torch.empty_like(q), torch.empty((1, 64, 1), device="cuda")),
    }
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for name, fn in rows.items():
        print(f"{name:45s} {host_us(fn):8.1f} us host time per call")


if __name__ == "__main__":
    main()
