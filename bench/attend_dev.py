"""Dev timing of the Triton sparse-attention decode kernel (dsv4fn.attend.triton) on one GPU.

V4-Flash decode shape: h = 64, d = 512 (448 e4m3 + 64 bf16), window 128 (page 128) + 512 extra keys
(page 64), s_q = 1. Times CUDA-graph replays with triton.testing.do_bench (L2 flushed before each, median), and
the default path eagerly. Sweeps launch configs (splits, BLOCK_N, warps, stages) and prints every row.

    python bench/attend_dev.py [--quick] [--b 1,32,64,128,256] [--h 64] [--k2 512]
"""

import argparse
import itertools
import sys
import time

import torch
import triton

from bench.timing import graphflush_us
from dsv4fn.attend.reference import sparse_attention
from dsv4fn.attend.triton import ATTN_CONFIG, default_num_splits, sparse_attention_triton, sparse_attn
from dsv4fn.formats import model1
from dsv4fn.state import PagedKVCache


def make_cache(n_slots: int, page: int, dev: str) -> PagedKVCache:
    pages = triton.cdiv(n_slots, page)
    c = PagedKVCache.allocate(pages, page, device=dev)
    x = torch.randn(pages * page, 512, device=dev).to(torch.bfloat16)
    return model1.store(c, x, torch.arange(pages * page, dtype=torch.int32, device=dev))


def make_inputs(b: int, h: int, k1: int, k2: int, dev: str = "cuda", seed: int = 0):
    torch.manual_seed(seed)
    main = make_cache(max(b * k1 * 2, 256), 128, dev)
    extra = make_cache(max(b * k2 * 2, 256), 64, dev)
    q = torch.randn(b, 1, h, 512, device=dev).to(torch.bfloat16)
    idx = torch.rand(b, main.num_slots, device=dev).argsort(dim=1)[:, :k1].to(torch.int32).view(b, 1, k1)
    eidx = torch.rand(b, extra.num_slots, device=dev).argsort(dim=1)[:, :k2].to(torch.int32).view(b, 1, k2)
    lens = torch.full((b,), k1, dtype=torch.int32, device=dev)
    elens = torch.full((b,), k2, dtype=torch.int32, device=dev)
    sink = torch.randn(h, device=dev)
    return q, main, idx, lens, dict(extra_cache=extra, extra_indices=eidx, extra_lens=elens, sink=sink)


def graph_time_us(fn) -> float:
    """Median time of `fn` captured in a CUDA graph, replayed under do_bench (L2 flushed before each
    replay): the kernels' own time without Python launch overhead (the harness's `graphflush` timer)."""
    return graphflush_us(fn, rep_ms=50)


def exact_check(deq_bf16: bool) -> None:
    """One valid key per row: o must equal the dequantized record bit for bit (softmax weight 1)."""
    torch.manual_seed(1)
    c = PagedKVCache.allocate(8, 64, device="cuda")
    x = torch.randn(512, 512, device="cuda")
    x[:, :64] *= 1e-3  # other scales; e4m3 subnormals everywhere anyway
    c = model1.store(c, x.to(torch.bfloat16), torch.arange(512, dtype=torch.int32, device="cuda"))
    b = 512
    idx = torch.full((b, 1, 64), -1, dtype=torch.int32, device="cuda")
    idx[:, 0, 17] = torch.randperm(512, device="cuda").to(torch.int32)
    q = torch.randn(b, 1, 16, 512, device="cuda").to(torch.bfloat16)
    o, _ = sparse_attn(
        q, c.data, idx, None, None, None, None, None, 0.05, 64, 1, 448, 64, 64, 1, 64, 8, 1, 0, False, deq_bf16
    )
    want = model1.gather(c, idx[:, 0, 17]).view(b, 1, 1, 512).expand_as(o)
    diff = (o != want).sum().item()  # exact values (-0 == +0: the accumulator adds to +0)
    print(
        f"exact dequant (deq_bf16={deq_bf16}): {diff} of {o.numel()} values differ -> {'OK' if diff == 0 else 'FAIL'}"
    )


def print_kernels() -> None:
    """Registers / spills / shared memory of every compiled forward kernel."""
    from dsv4fn.attend.triton import _sparse_attn_fwd

    try:
        for entry in _sparse_attn_fwd.device_caches.values():
            for k in entry[0].values():
                cst = getattr(getattr(k, "src", None), "constants", {}) or {}
                names = ("BLOCK_N", "BLOCK_H", "SINGLE", "PREFETCH", "HAS_EXTRA")
                tag = {n: v for n, v in cst.items() if (n if isinstance(n, str) else str(n)) in names}
                md = k.metadata
                print(
                    f"kernel warps={md.num_warps} stages={md.num_stages} regs={k.n_regs} spills={k.n_spills} "
                    f"smem={md.shared} {tag}"
                )
    except Exception as ex:
        print(f"kernel introspection failed: {type(ex).__name__}: {ex}")


def check(b: int, h: int, k1: int, k2: int) -> None:
    q, main, idx, lens, kw = make_inputs(b, h, k1, k2, seed=b + h)
    # ragged lengths and some -1 entries
    lens = torch.randint(1, k1 + 1, (b,), dtype=torch.int32, device="cuda")
    kw["extra_lens"] = torch.randint(0, k2 + 1, (b,), dtype=torch.int32, device="cuda")
    idx = torch.where(torch.rand(idx.shape, device="cuda") < 0.05, -1, idx)
    scale = 512**-0.5
    o_ref, lse_ref = sparse_attention(q, main, idx, lens, scale=scale, **kw)
    for splits in sorted({1, default_num_splits(b, h, triton.cdiv(k1, 64) + triton.cdiv(k2, 64), q.device), 4}):
        o, lse = sparse_attention_triton(q, main, idx, lens, scale=scale, num_splits=splits, **kw)
        e, g = o_ref.double(), o.double()
        err = (e - g).abs()
        rel = (err.square().mean().sqrt() / e.square().mean().sqrt()).item()
        fin = torch.isfinite(lse_ref)
        lerr = (lse[fin] - lse_ref[fin]).abs().max().item()
        inf_ok = torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
        ok = rel <= 5e-3 and lerr <= 1e-4 and inf_ok and torch.isfinite(o).all().item()
        print(
            f"check b={b} h={h} k={k1}+{k2} splits={splits}: o relRMS {rel:.2e} (worst abs {err.max().item():.3e}) "
            f"lse max abs {lerr:.2e} inf-pos-equal {inf_ok} -> {'OK' if ok else 'FAIL'}",
            flush=True,
        )


def bench(bs: list[int], h: int, k1: int, k2: int, quick: bool) -> None:
    scale = 512**-0.5
    # (BLOCK_N, warps, stages, BLOCK_H, prefetch)
    cfgs = [
        (64, 8, 1, 64, False),
        (64, 8, 1, 64, True),
        (32, 8, 1, 64, False),
        (32, 8, 1, 64, True),
    ]
    if quick:
        cfgs = cfgs[:2]
    for b in bs:
        bench_one(b, h, k1, k2, cfgs, scale)
        torch.cuda.empty_cache()


def bench_one(b: int, h: int, k1: int, k2: int, cfgs: list, scale: float) -> None:
    q, main, idx, lens, kw = make_inputs(b, h, k1, k2, seed=b)
    ec = kw["extra_cache"]
    bytes_ = b * ((k1 + k2) * (576 + 8 + 4) + h * 512 * 2 * 2 + h * 4)
    flops = b * h * (k1 + k2) * 2 * 1024
    tiles = triton.cdiv(k1, 64) + triton.cdiv(k2, 64)
    dflt = default_num_splits(b, h, tiles, q.device)
    split_opts = sorted({1, 2, dflt}) if cfgs else []
    best = None
    for (bn, nw, ns, bh, pf), sp in itertools.product(cfgs, split_opts):

        def fn(bn=bn, nw=nw, ns=ns, sp=sp, bh=bh, pf=pf):
            return sparse_attn(
                q, main.data, idx, lens, ec.data, kw["extra_indices"], kw["extra_lens"], kw["sink"], scale,
                128, 64, 448, 64, 64, sp, bn, nw, ns, bh, pf,
            )  # fmt: skip

        try:
            t0 = time.time()
            fn()
            torch.cuda.synchronize()
            ct = time.time() - t0
            us = graph_time_us(fn)
        except Exception as ex:
            print(f"b={b} bn={bn} warps={nw} bh={bh} pf={pf} splits={sp}: FAILED {type(ex).__name__}: {ex}"[:300])
            continue
        tag = " (default splits)" if sp == dflt else ""
        print(
            f"b={b:4d} h={h} bn={bn} warps={nw:2d} bh={bh} pf={pf:d} splits={sp:2d}: {us:8.2f} us  "
            f"{bytes_ / us / 1e3:7.1f} GB/s  {flops / us / 1e6:6.1f} TFLOP/s  (first call {ct:.1f}s){tag}",
            flush=True,
        )
        if best is None or us < best[0]:
            best = (us, bn, nw, ns, bh, pf, sp)
    if best:
        print(f"BEST b={b} h={h}: {best[0]:.2f} us  (bn, warps, stages, bh, prefetch, splits) = {best[1:]}")
    us = graph_time_us(lambda: sparse_attention_triton(q, main, idx, lens, scale=scale, **kw))
    ms = triton.testing.do_bench(
        lambda: sparse_attention_triton(q, main, idx, lens, scale=scale, **kw), rep=50, return_mode="median"
    )
    print(f"DEFAULT b={b} h={h}: graph+flush {us:.2f} us, eager do_bench {ms * 1e3:.2f} us (host-bound when small)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", default="1,32,64,128,256")
    ap.add_argument("--h", type=int, default=64)
    ap.add_argument("--k2", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} SMs {p.multi_processor_count} torch {torch.__version__} triton {triton.__version__}")
    print(f"python {sys.version.split()[0]}")
    if not a.no_check:
        for pf in (0, 1):
            ATTN_CONFIG["prefetch"] = pf
            print(f"-- checks with prefetch={pf}")
            check(1, 64, 128, 512)
            check(32, 64, 128, 512)
            check(8, 128, 128, 1024)
        ATTN_CONFIG["prefetch"] = 0
    exact_check(False)
    exact_check(True)
    bench([int(x) for x in a.b.split(",")], a.h, 128, a.k2, a.quick)
    print_kernels()
    for b in (1, 32, 128):  # V4-Pro: 128 heads, 1024 extra keys, default launch
        bench_one(b, 128, 128, 1024, [], 512**-0.5)


if __name__ == "__main__":
    main()
