# ruff: noqa: B023
"""Dev timing of the TileLang kernels on one GPU: old (legacy) vs new (warp-specialised) attention decode,
indexer logits, logits + torch.topk and the fused indexer top-k. Every case is checked against the torch
reference first (a FAIL is printed, the timing still runs). Times: CUDA-graph replay of the op, L2 flushed
before every replay (256 MB write), median of `--reps` replays, in µs.

Usage (repo root, GPU host; ~3-4 min on an H100 including the parallel compiles):
    python bench/tilelang_dev.py                 # everything
    python bench/tilelang_dev.py --only attn     # attention only (or: --only index)
"""

import argparse
import importlib
import sys
import time

import torch

sys.path.insert(0, "tests")
gpu_tests = importlib.import_module("test_tilelang_gpu")
compat = importlib.import_module("dsv4fn._tilelang_compat")
attn = importlib.import_module("dsv4fn.attend.tilelang")
idx = importlib.import_module("dsv4fn.index_topk.tilelang")

from bench.timing import graphflush_us  # noqa: E402
from dsv4fn import _backend  # noqa: E402
from dsv4fn.attend.reference import sparse_attention as ref_attention  # noqa: E402

SCALE = 512**-0.5
HBM = 3.0e12  # measured H100 copy rate, B/s
PEERS_ATTN = {1: 12, 32: 23, 64: 47, 128: 47, 256: 93}  # FlashMLA DSV4 decode on this H100 (issue 6)
PEERS_INDEX = {(32, 16384): 39, (32, 65536): 114}  # DeepGEMM fp8_paged_mqa_logits (issue 6)


def graph_us(fn, reps: int) -> float:
    """Median µs of replaying a CUDA graph of `fn()` with a cold L2 before each replay (the harness's
    `graphflush` timer, measuring for about `reps` replays' worth of time: ~0.1 ms each)."""
    return graphflush_us(fn, rep_ms=max(10.0, reps * 0.1))


def compile_all(do_attn: bool, do_index: bool) -> None:
    jobs = []
    if do_attn:
        jobs += [lambda i=i, s=s: attn._kernels(i, 64, 448, 64, 64, 64, 64, SCALE, s) for i in ("ws", "legacy")
                 for s in (False, True)]  # fmt: skip
    if do_index:
        jobs.append(lambda: idx._logits_kernel(64, 128, 64, *idx._LOGITS_TILING))
        tilings = (idx.CHUNK_SMALL, idx.CHUNK_LARGE)  # the two `chunk_tiling` picks, with their merges
        jobs += [lambda c=c: idx._chunk_topk_kernel(64, 128, 64, 512, *c) for c in tilings]
        jobs += [lambda c=c: idx._topk_merge_kernel(512, 64, c[0], idx.MERGE_THREADS) for c in tilings]
    t0 = time.time()
    compat.precompile(jobs)
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s")


def _attn_case(b: int, extra: int = 512, h: int = 64):
    """Batch b of V4-Flash (h 64; V4-Pro: h 128) decode rows: 128 window keys + `extra` compressed keys, every one
    valid, sink."""
    q, c1, i1, l1, c2, i2, l2, s = gpu_tests._attn_inputs(b, h, 128, max(512, extra), seed=b)
    l1.fill_(128)
    l2.fill_(extra)
    i1.copy_(torch.randint(0, b * 128, i1.shape, device="cuda", dtype=torch.int32))
    i2.copy_(torch.randint(0, b * 1024, i2.shape, device="cuda", dtype=torch.int32))
    return q, c1, i1, l1, dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)


def bench_attention(reps: int) -> None:
    print("attention decode: 64 heads, d 512, window 128 + extra 512 (all valid), sink; graph replay, L2 flushed")
    print(f"  {'b':>4} {'impl':>8} {'splits':>6} {'check':>5} {'us':>9} {'GB/s':>7} {'floor us':>9} {'FlashMLA':>9}")
    for b in (1, 32, 64, 128, 256):
        q, c1, i1, l1, kw = _attn_case(b)
        expect = ref_attention(q, c1, i1, l1, **kw)
        byts = b * 640 * 584 + 2 * q.numel() * 2  # keys + q + o
        variants = [("legacy", None), ("ws", None)] + ([("ws", 1), ("ws", 2)] if b == 64 else [])
        for impl, force in variants:
            attn.ATTN_IMPL, attn.FORCE_SPLITS = impl, force
            try:
                splits = attn.choose_splits(b, 1, 64, 128, 512, impl)
                report = _backend.default_compare(expect, attn.sparse_attention(q, c1, i1, l1, **kw))
                t = graph_us(lambda: attn.sparse_attention(q, c1, i1, l1, **kw), reps)
                print(
                    f"  {b:4d} {impl + ('' if force is None else f'/{force}'):>8} {splits:6d} "
                    f"{'ok' if report is None else 'FAIL':>5} {t:9.1f} {byts / t / 1e3:7.0f} "
                    f"{byts / HBM * 1e6:9.1f} {PEERS_ATTN[b]:9d}"
                )
                if report is not None:
                    print(f"        {report}")
            except Exception as exc:  # keep timing the other variants
                print(f"  {b:4d} {impl:>8} ERROR {type(exc).__name__}: {str(exc)[:200]}")
            finally:
                attn.ATTN_IMPL, attn.FORCE_SPLITS = "ws", None


def bench_index(reps: int) -> None:
    print("indexer: 64 heads x 128, page 64, all keys visible, top-512; graph replay, L2 flushed")
    print(
        f"  {'t':>4} {'keys':>6} {'check':>9} {'logits':>8} {'GB/s':>6} {'DeepGEMM':>8} {'topk':>7} "
        f"{'lg+topk':>8} {'fused':>8} {'floor':>6}"
    )
    for t_, n in ((32, 16384), (32, 65536), (128, 16384)):
        q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(t_, n, seed=1)
        vis.fill_(n)
        checks = []
        try:
            expect = gpu_tests.ref_logits(q8, w, cache, pt, req, vis, n)
            got = idx.paged_logits(q8, w, cache, pt, req, vis, n)
            err = (expect - got).abs().amax(-1) / expect.abs().amax(-1)
            checks.append("ok" if bool((err <= gpu_tests.FP8_MMA_RTOL).all()) else f"FAIL({err.max().item():.1e})")
            del expect
            g_idx, g_len = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=n)
            try:
                gpu_tests._check_topk_sets(q8, w, cache, pt, req, vis, n, 512, 512, g_idx, g_len)
                checks.append("ok")
            except AssertionError as exc:
                checks.append("FAIL")
                print(f"        fused top-k: {str(exc)[:200]}")
        except Exception as exc:
            checks.append("ERR")
            print(f"        check: {type(exc).__name__}: {str(exc)[:200]}")
        torch.cuda.empty_cache()
        t_lg = graph_us(lambda: idx.paged_logits(q8, w, cache, pt, req, vis, n), reps)
        logits = idx.paged_logits(q8, w, cache, pt, req, vis, n)
        t_tk = graph_us(lambda: torch.topk(logits, 512, dim=-1), reps)
        t_f = graph_us(lambda: idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=n), reps)
        byts = t_ * n * 132
        peer = PEERS_INDEX.get((t_, n))
        print(
            f"  {t_:4d} {n:6d} {'/'.join(checks):>9} {t_lg:8.1f} {byts / t_lg / 1e3:6.0f} "
            f"{'-' if peer is None else peer:>8} {t_tk:7.1f} {t_lg + t_tk:8.1f} {t_f:8.1f} {byts / HBM * 1e6:6.1f}"
        )
        logits = q8 = w = cache = None  # free before the next size
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("attn", "index"), default=None)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    t0 = time.time()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    do_attn, do_index = args.only in (None, "attn"), args.only in (None, "index")
    compile_all(do_attn, do_index)
    if do_attn:
        bench_attention(args.reps)
    if do_index:
        bench_index(args.reps)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
