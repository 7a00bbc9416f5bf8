# ruff: noqa: B023
"""Dev timing of the TileLang kernels on one GPU (L2-flushed triton do_bench, median µs).

Usage (repo root, GPU host): python bench/tilelang_dev.py
"""

import importlib
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, "tests")
gpu_tests = importlib.import_module("test_tilelang_gpu")
attn = importlib.import_module("dsv4fn.attend.tilelang")
idx = importlib.import_module("dsv4fn.index_topk.tilelang")


def us(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def diagnose() -> None:
    """Where do kernel and reference disagree on non-finite values (split and direct paths)?"""
    from dsv4fn import _backend
    from dsv4fn.attend.reference import sparse_attention as ref

    for poison in (True, False):
        q, c1, i1, l1, c2, i2, l2, s = gpu_tests._attn_inputs(32, 64, 128, 512, seed=96)
        if not poison:
            l1.fill_(128)
            l2.fill_(512)
            i1.copy_(torch.randint(0, 32 * 128, i1.shape, device="cuda", dtype=torch.int32))
            i2.copy_(torch.randint(0, 32 * 1024, i2.shape, device="cuda", dtype=torch.int32))
        kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=512**-0.5)
        e = ref(q, c1, i1, l1, **kw)
        for forced in (1, 5):
            orig = attn.choose_splits
            attn.choose_splits = lambda *a, f=forced: f
            try:
                g = attn.sparse_attention(q, c1, i1, l1, **kw)
            finally:
                attn.choose_splits = orig
            bad = ~torch.isfinite(g[0].float())
            rows = bad.any(-1).any(-1).any(-1).nonzero().view(-1).tolist()
            print(
                f"poison={poison} splits={forced}: non-finite o rows {rows[:10]} (lens1 {l1[rows[:5]].tolist()}, "
                f"lens2 {l2[rows[:5]].tolist()}); compare: {_backend.default_compare(e, g)}"
            )


def sweep_logits() -> None:
    q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(32, 16384, seed=1)
    vis.fill_(16384)
    for tiling in ((2, 2), (4, 2), (4, 3), (8, 2), (8, 3), (16, 3)):
        idx._LOGITS_TILING = tiling
        t = us(lambda: idx.paged_logits(q8, w, cache, pt, req, vis, 16384))
        print(f"  logits t=32 keys=16384 pages/program={tiling[0]} stages={tiling[1]}: {t:7.1f} us")
    idx._LOGITS_TILING = (idx.PAGES_PER_PROGRAM, idx.STAGES)


def main() -> None:
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("attention decode: 64 heads, d 512, window 128 + extra 512 (all valid), sink")
    for b in (1, 32, 64, 128, 256):
        q, c1, i1, l1, c2, i2, l2, s = gpu_tests._attn_inputs(b, 64, 128, 512, seed=b)
        l1.fill_(128)
        l2.fill_(512)
        i1.copy_(torch.randint(0, b * 128, i1.shape, device="cuda", dtype=torch.int32))
        i2.copy_(torch.randint(0, b * 1024, i2.shape, device="cuda", dtype=torch.int32))
        kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=512**-0.5)
        splits = attn.choose_splits(b, 1, 64, 128, 512)
        t = us(lambda: attn.sparse_attention(q, c1, i1, l1, **kw))
        byts = b * 640 * 584 + q.numel() * 4
        print(f"  b={b:4d} splits={splits:2d}  {t:8.1f} us  {byts / t / 1e3:7.1f} GB/s")
    print("indexer: 64 heads x 128, page 64")
    for t_, n in ((32, 16384), (32, 65536), (128, 16384)):
        q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(t_, n, seed=1)
        vis.fill_(n)
        tl_ = us(lambda: idx.paged_logits(q8, w, cache, pt, req, vis, n))
        logits = idx.paged_logits(q8, w, cache, pt, req, vis, n)
        tk = us(lambda: torch.topk(logits, 512, dim=-1))
        tf = us(lambda: idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=n))
        byts = t_ * n * 132
        print(
            f"  t={t_:4d} keys={n:6d}  logits {tl_:8.1f} us ({byts / tl_ / 1e3:6.1f} GB/s)  torch.topk {tk:8.1f} us"
            f"  logits+topk {tl_ + tk:8.1f} us  fused {tf:8.1f} us"
        )


if __name__ == "__main__":
    if "--diagnose" in sys.argv:
        diagnose()
    if "--sweep" in sys.argv:
        sweep_logits()
    main()
