"""Dev timing of the Triton indexer kernels (dsv4fn/index_topk/triton.py) on one GPU.

Logits vs DeepGEMM's `fp8_paged_mqa_logits` on identical inputs (checked against each other first), top-k vs
`torch.topk`. Sweeps the kernels' tuning knobs. Timer: `triton.testing.do_bench` (L2 flushed), median µs.
Usage: python bench/index_dev.py [seconds budget]
"""

import itertools
import sys
import time

import torch
import triton
from triton.testing import do_bench

from dsv4fn.formats import indexer_fp8
from dsv4fn.index_topk import reference as ref
from dsv4fn.index_topk import triton as tri
from dsv4fn.state import IndexerKeyCache

HI, DI, PAGE = 64, 128, 64
T0 = time.time()
BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 200.0
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":  # dry run of the script under TRITON_INTERPRET=1, tiny sizes, no timing

    def do_bench(fn, **_):
        fn()
        return 1.0


_deadline = [0.0]


def phase(seconds: float) -> None:
    """The next sweep stops starting configurations after `seconds` (or when the budget runs out)."""
    _deadline[0] = time.time() + seconds


def left() -> float:
    return min(BUDGET - (time.time() - T0), _deadline[0] - time.time())


def decode_case(b: int, keys: int, seed: int = 0) -> dict:
    """b requests, one query token each, every one seeing `keys` entries; pages permuted."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    blocks = keys // PAGE
    num_pages = b * blocks
    cache = IndexerKeyCache.allocate(num_pages, PAGE, dim=DI, device=DEV)
    for s in range(0, num_pages * PAGE, 1 << 20):
        n = min(1 << 20, num_pages * PAGE - s)
        k = torch.randn(n, DI, device=DEV, generator=g)
        cache = indexer_fp8.store(cache, k, torch.arange(s, s + n, device=DEV))
    pt = torch.randperm(num_pages, device=DEV, generator=g).view(b, blocks).to(torch.int32).contiguous()
    q8, sq = indexer_fp8.quantize_rows(torch.randn(b, HI, DI, device=DEV, generator=g))
    w = (torch.randn(b, HI, device=DEV, generator=g) * sq * DI**-0.5).contiguous()
    return {
        "q8": q8.contiguous(),
        "w": w,
        "cache": cache,
        "pt": pt,
        "treq": torch.arange(b, dtype=torch.int32, device=DEV),
        "vis": torch.full((b,), keys, dtype=torch.int32, device=DEV),
        "keys": keys,
    }


def ours(c: dict) -> torch.Tensor:
    return tri.paged_logits(c["q8"], c["w"], c["cache"], c["pt"], c["treq"], c["vis"], c["keys"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def bench_logits(b: int, keys: int) -> torch.Tensor:
    c = decode_case(b, keys)
    kv_bytes = b * keys * (DI + 4)
    print(f"\n== logits b={b} keys={keys} (KV {kv_bytes / 1e6:.1f} MB) ==")
    # reference on 2 rows
    sub = (c["q8"][:2], c["w"][:2], c["cache"], c["pt"], c["treq"][:2], c["vis"][:2], keys)
    exp = ref.paged_logits(*sub)
    got = ours(c)
    print(f"ours vs fp64 reference (2 rows): max rel err {rel_err(got[:2], exp):.3e}")
    # error in units of s_k·Σ_h|w_h|·Σ_d|q_hd·k_d| (the fp8 MMA accumulation bound the GPU test uses)
    data = c["cache"].data.clone()
    data[:, : PAGE * DI] &= 0x7F
    abs_cache = IndexerKeyCache(data=data, page_size=PAGE, dim=DI)
    q_abs = c["q8"][:2].float().abs().to(torch.float8_e4m3fn)
    bound = ref.paged_logits(q_abs, c["w"][:2].abs(), abs_cache, *sub[3:])
    print(f"fp8 MMA error / abs-magnitude: max {((got[:2] - exp).abs() / bound).nan_to_num(0).max().item():.3e}")
    dg_out = None
    try:
        import deep_gemm

        if DEV == "cpu":
            raise RuntimeError("no GPU")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        ctx = c["vis"].view(b, 1).contiguous()  # [b, next_n]
        meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, PAGE, sms)

        def dg():
            return deep_gemm.fp8_paged_mqa_logits(
                c["q8"].view(b, 1, HI, DI), c["cache"].as_deepgemm(), c["w"], ctx, c["pt"], meta, keys, False
            )

        dg_out = dg()
        print(f"DeepGEMM out {tuple(dg_out.shape)}; vs reference {rel_err(dg_out[:2, :keys], exp):.3e}; ", end="")
        print(f"vs ours {rel_err(got, dg_out[:, :keys]):.3e}")
        t_dg = do_bench(dg, warmup=10, rep=40)
        t_meta = do_bench(lambda: deep_gemm.get_paged_mqa_logits_metadata(ctx, PAGE, sms), warmup=5, rep=20)
        gbs = kv_bytes / t_dg / 1e9
        print(f"DeepGEMM fp8_paged_mqa_logits: {t_dg * 1e3:.1f} us ({gbs:.0f} GB/s); metadata {t_meta * 1e3:.1f} us")
    except Exception as e:
        print(f"DeepGEMM unavailable: {type(e).__name__}: {e}")
        t_dg = float("nan")
    results = []
    base = dict(tri.LOGITS_CONFIG)
    combos = list(itertools.product([64, 128], [1, 2, 4, 8], [4, 8], [3, 4], [0]))
    combos += [(64, 8, 4, 3, 1), (128, 4, 8, 3, 1), (64, 4, 4, 4, 1), (128, 2, 4, 4, 1), (64, 2, 8, 4, 1)]
    for rows, iters, warps, stages, fp16 in combos:
        if left() < 0:
            print("budget: stopping the sweep")
            break
        tri.LOGITS_CONFIG.update(
            rows=rows, iters=iters, num_warps=warps, num_stages=stages, mma_fp16=fp16, imprecise_acc=0
        )
        try:
            out = ours(c)
            err = rel_err(out[:2], exp)
            ms = do_bench(lambda: ours(c), warmup=5, rep=25)
        except Exception as e:
            print(f"  {tri.LOGITS_CONFIG}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        results.append((ms, rows, iters, warps, stages, fp16))
        print(
            f"  rows={rows} iters={iters} warps={warps} stages={stages} fp16={fp16}: {ms * 1e3:7.1f} us"
            f" {kv_bytes / ms / 1e6:5.0f} GB/s  x{t_dg / ms:.2f} of DeepGEMM  err {err:.1e}"
        )
    if results:
        for fp in (0, 1):
            sub_r = [r for r in results if r[5] == fp]
            if sub_r:
                ms, rows, iters, warps, stages, _ = min(sub_r)
                print(f"best fp16={fp}: rows={rows} iters={iters} warps={warps} stages={stages} ", end="")
                print(f"{ms * 1e3:.1f} us = x{t_dg / ms:.2f} DeepGEMM")
        ms, rows, iters, warps, stages, _ = min(r for r in results if r[5] == 0)
        for acc in (32,):
            tri.LOGITS_CONFIG.update(
                rows=rows, iters=iters, num_warps=warps, num_stages=stages, mma_fp16=0, imprecise_acc=acc
            )
            try:
                out = ours(c)
                ms2 = do_bench(lambda: ours(c), warmup=5, rep=25)
                print(f"  imprecise_acc={acc}: {ms2 * 1e3:.1f} us err vs ref {rel_err(out[:2], exp):.1e}")
            except Exception as e:
                print(f"  imprecise_acc={acc}: FAILED {type(e).__name__}: {str(e)[:200]}")
    tri.LOGITS_CONFIG.clear()
    tri.LOGITS_CONFIG.update(base)
    return ours(c)


def bench_topk(logits: torch.Tensor, topk: int) -> None:
    t, n = logits.shape
    vis = torch.full((t,), n, dtype=torch.int32, device=DEV)
    blocks = -(-n // PAGE)
    pt = torch.arange(t * blocks, dtype=torch.int32, device=DEV).view(t, blocks)
    treq = torch.arange(t, dtype=torch.int32, device=DEV)
    print(f"\n== topk rows={t} n={n} k={topk} ==")
    t_torch = do_bench(lambda: torch.topk(logits, topk, dim=-1), warmup=5, rep=25)
    print(f"torch.topk: {t_torch * 1e3:.1f} us")
    exp = ref.select_topk(logits, vis, topk, topk, pt, treq, PAGE)[0].sort(-1).values
    base = dict(tri.TOPK_CONFIG)
    res = []
    for block, bits, warps in itertools.product([0, 1024, 2048, 4096, 8192, 16384], [8], [8, 16, 32]):
        if left() < 0:
            print("budget: stopping the sweep")
            break
        tri.TOPK_CONFIG.update(block=block, radix_bits=bits, num_warps=warps)

        def run():
            return tri.select_topk(logits, vis, topk, topk, pt, treq, PAGE)

        try:
            got = run()[0].sort(-1).values
            ok = torch.equal(got, exp)
            ms = do_bench(run, warmup=5, rep=25)
        except Exception as e:
            print(f"  block={block} bits={bits} warps={warps}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        res.append((ms, block, bits, warps))
        verdict = "OK" if ok else "DIFFER"
        print(f"  block={block} bits={bits} warps={warps}: {ms * 1e3:7.1f} us x{t_torch / ms:.2f} topk sets {verdict}")
    if res:
        ms, block, bits, warps = min(res)
        print(f"best: block={block} bits={bits} warps={warps} {ms * 1e3:.1f} us = x{t_torch / ms:.2f} torch.topk")
    tri.TOPK_CONFIG.clear()
    tri.TOPK_CONFIG.update(base)


def main() -> None:
    if DEV == "cpu":
        phase(1e9)
        l16 = bench_logits(2, 256)
        bench_topk(l16, 32)
        return
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    phase(0.40 * BUDGET)
    l16 = bench_logits(32, 16384)
    phase(0.15 * BUDGET)
    l64 = bench_logits(32, 65536)
    phase(0.15 * BUDGET)
    bench_topk(l16, 512)
    phase(0.08 * BUDGET)
    bench_topk(l64, 512)
    phase(0.06 * BUDGET)
    bench_topk(l64, 1024)
    phase(0.06 * BUDGET)
    bench_topk(torch.cat([l64] * 4), 512)
    print(f"\ntotal {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
