# ruff: noqa: B023
"""Dev experiment (session 8): do staggered row changes make a multi-row CTA pay off? V4-Flash b=256 / V4-Pro b=256
with requests paired so that each pair (2c, 2c+1) holds the keys of two standard rows, split unevenly: request 2c
has 64 k compressed keys (k = c mod 9 / c mod 17), request 2c+1 the rest. rows=2 (Flash) / 4 (Pro) puts one pair in
a CTA (equal work per CTA, row changes at staggered blocks); rows=1 runs one row a CTA (two waves). The equal-row
case (every request standard) for comparison. graphflush us, each variant checked against the reference first.

Needs session 7's rows-a-CTA kernel (FORCE_ROWS; git 2a755a4 + c816a9b, reverted): run it in a checkout of c816a9b
with this file copied in (results: bench/results/h100/tilelang_profile_2026-11-25_session8.txt section 3)."""

import torch

from bench import tilelang_dev as td
from bench.timing import graphflush_us
from dsv4fn import _backend
from dsv4fn.attend import tilelang as tla
from dsv4fn.attend.reference import sparse_attention as ref_attention
from tests import test_tilelang_gpu as gpu_tests


def case(b: int, h: int, std_extra: int, staggered: bool):
    q, c1, i1, l1, c2, i2, l2, s = gpu_tests._attn_inputs(b, h, 128, 2 * std_extra, seed=b)
    l1.fill_(128)
    i1.copy_(torch.randint(0, b * 128, i1.shape, device="cuda", dtype=torch.int32))
    i2.copy_(torch.randint(0, b * 1024, i2.shape, device="cuda", dtype=torch.int32))
    if staggered:
        nk = 2 * std_extra // 64 + 1  # k in 0 .. 2 std / 64
        c = torch.arange(b // 2, device="cuda")
        a = 64 * (c % nk)
        l2.view(b // 2, 2)[:, 0] = a
        l2.view(b // 2, 2)[:, 1] = 2 * std_extra - a
    else:
        l2.fill_(std_extra)
    return q, c1, i1, l1, dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=td.SCALE)


def main() -> None:
    print(f"device {torch.cuda.get_device_name()}; graphflush us")
    for name, b, h, std, rows in (("flash", 256, 64, 512, 2), ("pro", 256, 128, 1024, 4), ("flash", 200, 64, 512, 2)):
        for staggered in (False, True):
            q, c1, i1, l1, kw = case(b, h, std, staggered)
            expect = ref_attention(q, c1, i1, l1, **kw)
            line = [f"{name} b={b} {'staggered' if staggered else 'equal    '}"]
            for forced in (1, rows):
                tla.FORCE_ROWS = forced
                ok = _backend.default_compare(expect, tla.sparse_attention(q, c1, i1, l1, **kw))
                t = graphflush_us(lambda: tla.sparse_attention(q, c1, i1, l1, **kw), rep_ms=20)
                line.append(f"rows={forced} {t:6.1f}{'' if ok is None else ' FAIL'}")
            tla.FORCE_ROWS = None
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
