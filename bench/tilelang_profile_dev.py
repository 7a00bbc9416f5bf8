# ruff: noqa: B023
"""Dev probes of the TileLang kernels on one GPU (issue 6): where the time of the attention decode and of the
fused indexer top-k goes. Every variant is checked against the torch reference before it is timed.

    python -m bench.tilelang_profile_dev attn-scan [IMPL...]  # attention (ws, legacy): time vs keys per row
    python -m bench.tilelang_profile_dev attn-probe [pro] [PROBE...]  # attention ws: stages left out; exact variants
    python -m bench.tilelang_profile_dev merge-sweep    # fused top-k: merge kernel threads per token
    python -m bench.tilelang_profile_dev fused-sweep    # fused top-k: chunk tilings, chunk / merge kernels apart
    python -m bench.tilelang_profile_dev attn-tiles     # attention ws: 32- or 64-key blocks on 2-4 K stages
    python -m bench.tilelang_profile_dev attn-trace [pro] [PROBE...]  # attention ws: per-block timeline (SM clock)
    python -m bench.tilelang_profile_dev pdl-probe      # fused top-k chunk kernel probes; PDL merge / combine on, off
    python -m bench.tilelang_profile_dev split-parts [flash:B,.. pro:B,..]  # attention split path: the op, its
                                                        # kernels apart, merged in 2- / 3-CTA clusters instead
    python -m bench.tilelang_profile_dev merge-check    # attention: cluster merge vs partials + combine, where apart
    python -m bench.tilelang_profile_dev run-attn B     # a few attention calls at batch B (for ncu)
    python -m bench.tilelang_profile_dev run-fused T N  # a few fused top-k calls, T tokens x N keys (for ncu)

Timer: `graphflush` (one call replayed from a CUDA graph, L2 flushed before each replay), µs.
"""

import sys
import time

import torch

from bench.tilelang_dev import SCALE, _attn_case, attn, compat, gpu_tests, idx
from bench.timing import graphflush_us
from dsv4fn import _backend
from dsv4fn.attend.reference import sparse_attention as ref_attention

HBM = 3.0e12
TOPK = 512
# (pages per chunk, stages, CTAs per SM, pages per step) of the fused top-k's chunk kernel
TILINGS = [(32, 4, 4, 1), (32, 2, 4, 2), (64, 2, 2, 4), (64, 3, 4, 1), (64, 2, 5, 1)]
FUSED_CASES = [(32, 16384), (32, 65536), (128, 16384)]


def attn_scan(*impls: str) -> None:
    impls = impls or ("ws",)
    compat.precompile(
        [lambda i=i, s=s: attn._kernels(i, 64, 448, 64, 64, 64, 64, SCALE, s) for i in impls for s in (False, True)]
    )
    print("attention: window 128 + `extra` compressed keys per row, 64 heads; graphflush us")
    for b in (1, 32, 64, 128, 256):
        for impl in impls:
            attn.ATTN_IMPL = impl
            line = [f"b={b:<4d} {impl:>5} splits={attn.choose_splits(b, 1, 64, 128, 512, impl):<3d}"]
            for extra in (0, 64, 128, 256, 384, 512):
                q, c1, i1, l1, kw = _attn_case(b, extra)
                expect = ref_attention(q, c1, i1, l1, **kw)
                ok = _backend.default_compare(expect, attn.sparse_attention(q, c1, i1, l1, **kw))
                t = graphflush_us(lambda: attn.sparse_attention(q, c1, i1, l1, **kw), rep_ms=20)
                line.append(f"{extra}:{t:6.1f}{'' if ok is None else '!FAIL'}")
            print(" ".join(line), flush=True)
        attn.ATTN_IMPL = "ws"


PROBES = (
    "", "no_qk", "no_pv", "no_softmax", "no_dq", "no_qk,no_pv", "no_qk,no_pv,no_softmax", "no_dq,no_qk,no_pv",
    "no_cvt", "no_sts", "no_cvt,no_sts",
)  # fmt: skip


ATTN_EXTRA = 512  # compressed keys a row of _ws_direct_args (after the 128-key window)


def _ws_direct_args(b: int, h: int = 64, extra: int = ATTN_EXTRA):
    """A batch-b case for the ws kernel's direct path, called without the op: (kernel args with NaN-poisoned
    outputs, outputs, reference (o, lse))."""
    q, c1, i1, l1, kw = _attn_case(b, extra, h)
    w1, h1, st1 = attn._cache_views_ws(c1.data)
    w2, h2, st2 = attn._cache_views_ws(kw["extra_cache"].data)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, 1), float("nan"), dtype=torch.float32, device="cuda")
    ahead = attn._prefetch_rows(h, _backend.sm_count(q.device) or attn.NUM_SMS_TARGET)
    args = (q, i1, l1, w1, h1, kw["extra_indices"], kw["extra_lens"], w2, h2, kw["sink"], o, lse, st1, st2, ahead)
    return args, (o, lse), ref_attention(q, c1, i1, l1, **kw)


# build_attend_ws probes that keep the results exact (checked before timing; regs=A/B/C and pf=N too)
# (no_pf: the same kernel called with prefetch distance 0 - WS_PREFETCH off - not a build probe)
EXACT_PROBES = {
    "pv_rs", "l2_256", "lazy", "no_lazy", "no_pf", "ix_late", "ix_early", "pv0_async", "pv0_sync", "ld_zero", "ld_keep",
}  # fmt: skip


def _kernel_probe(pr: str) -> str:
    """A probe list without the call-time probes (no_pf): what build_attend_ws gets."""
    return ",".join(t for t in pr.split(",") if t and t != "no_pf")


def attn_probe(*which: str) -> None:
    """The ws kernel with stages left out (wrong results, timing only): which stage bounds a block; or with the
    exact variants (EXACT_PROBES, combinable: `attn-probe full pv_rs l2_256 pv_rs,l2_256`), checked against the
    reference first (ok / FAIL after the time). A first argument `pro` times V4-Pro (128 heads, window 128 + 1024,
    paired as in production) instead of V4-Flash; then `b=64,128` other batches than 128 and 256. A probe named twice
    is timed twice (the spread of repeated timings)."""
    config, which = (which[0], which[1:]) if which[:1] in (("flash",), ("pro",)) else ("flash", which)
    batches = (128, 256)
    if which[:1] and which[0].startswith("b="):  # e.g. b=64,128
        batches, which = tuple(int(x) for x in which[0][2:].split(",")), which[1:]
    h, extra = (128, 1024) if config == "pro" else (64, ATTN_EXTRA)
    probes = [p if p != "full" else "" for p in which] or PROBES
    builds = dict.fromkeys(map(_kernel_probe, probes))
    compat.precompile([lambda pr=pr: attn._attend_ws_kernel(h, 64, 64, SCALE, False, pr) for pr in builds])
    print(f"attention ws ({config}), direct (1 split), window 128 + {extra}; stages left out; graphflush us")
    for b in batches:
        args, outs, expect = _ws_direct_args(b, h, extra)
        ahead = args[-1]  # the prefetch distance WS_PREFETCH gives (the last kernel argument)
        line = [f"b={b}"]
        for pr in probes:
            k = attn._attend_ws_kernel(h, 64, 64, SCALE, False, _kernel_probe(pr))
            args = (*args[:-1], 0 if "no_pf" in pr.split(",") else ahead)
            check = ""
            if {t for t in pr.split(",") if t and not t.startswith(("regs=", "pf="))} <= EXACT_PROBES:
                for o in outs:
                    o.fill_(float("nan"))
                compat.launch(k, *args)
                check = " ok" if _backend.default_compare(expect, outs) is None else " FAIL"
            t = graphflush_us(lambda: compat.launch(k, *args), rep_ms=20)
            line.append(f"{pr or 'full'}:{t:.1f}{check}")
        print("  ".join(line), flush=True)


def _trace_words(o: torch.Tensor, rows: int) -> torch.Tensor:
    """The trace probe's int32 stamps [B, rows, 32] from the bf16 output it was written over (lo, hi halves)."""
    h16 = o.view(torch.int16)[:, 0, :rows, :64].to(torch.int64) & 0xFFFF
    return (h16[..., 0::2] | (h16[..., 1::2] << 16)).to(torch.int64)


def _trace_report(w: torch.Tensor, nb: int, title: str) -> None:
    """Print the trace probe's stamps w [CTAs, TRACE_ROWS, 32] (int64 words, CPU): each CTA's clock rate from
    its global-timer pair, the single stamps, the per-block timeline and the mean part of a block per role."""
    misc = dict(zip(attn.TRACE_MISC, w[:, len(attn.TRACE_BLOCK)].unbind(1), strict=False))
    ns = ((misc["CTA end ns"] - misc["WG0 start ns"]) & 0xFFFFFFFF).double()
    cyc = ((misc["CTA end"] - misc["WG0 start"]) & 0xFFFFFFFF).double()
    ghz = float((cyc / ns).median())
    t0 = misc["WG0 start"].unsqueeze(1)

    def us(x):  # signed 32-bit clock difference to WG0's start
        return (((x - t0 + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)).double() / ghz / 1e3

    ev = {name: us(w[:, i, :nb]) for i, name in enumerate(attn.TRACE_BLOCK)}
    span = (misc["CTA end ns"].max() - misc["WG0 start ns"].min()) & 0xFFFFFFFF
    print(
        f"{title}: SM clock {ghz:.3f} GHz; "
        f"CTA time {float((cyc / ghz / 1e3).mean()):.2f} us (mean), kernel span {float(span) / 1e3:.1f} us "
        "(global timer)"
    )
    single = ("producer start", "Q loaded", "producer end", "WG1 end", "CTA end")
    print("  " + ", ".join(f"{n} {float(us(misc[n].unsqueeze(1)).mean()):.2f}" for n in single))
    print("  blk | P free  P done | K rdy  QK done  S done  PV0 done | S rdy  PV1 done   (us from WG0 start)")
    for i in range(nb):
        v = [float(c[:, i].mean()) for c in ev.values()]
        print(
            f"  {i:3d} | {v[0]:6.2f} {v[1]:6.2f} | {v[2]:6.2f} {v[3]:7.2f} {v[4]:7.2f} {v[5]:8.2f} | "
            f"{v[6]:6.2f} {v[7]:8.2f}"
        )
    p_free, p_done, k_rdy, qk, sm, pv0, s_rdy, pv1 = ev.values()
    parts = {
        "producer dequant+stores": (p_done - p_free)[:, 1:],
        "QK": qk - k_rdy,
        "softmax+S": sm - qk,
        "PV0": pv0 - sm,
        "PV1": pv1 - s_rdy,
        "block period": (k_rdy[:, -1:] - k_rdy[:, 1:2]) / (nb - 2),
    }
    print("  per block (mean): " + ", ".join(f"{n} {float(v.mean()):.2f}" for n, v in parts.items()), flush=True)


# key pools of attn-trace: (main records, extra records) every index is drawn from; None = the whole case
HOT_POOL = (256, 2048)  # 2304 records (1.3 MB): L2 hits after first touch, ~35 CTAs a record
WARM_POOL = (4096, 24576)  # 28672 records (16 MB): left in L2 by the warm-up calls, ~3 CTAs a record


def attn_trace(config: str = "flash", *probes: str) -> None:
    """The ws kernel's `trace` probe (direct path; flash: window 128 + 512 = 10 blocks a row, 64 heads; pro: 128 +
    1024 = 18 blocks, 128 heads, the first head block's stamps): per block and role, where the time goes (mean
    over all CTAs, microseconds from the SM clock, calibrated by the global timer). Default cases: b=128 cold,
    b=128 hot (HOT_POOL, L2 flushed before the traced call), b=256 cold. `probes`: development probes (wrong
    results) added to the trace, each at b=128; "warm": b=128 from WARM_POOL, no flush before the traced call."""
    rows = attn.TRACE_ROWS
    h, extra = (128, 1024) if config == "pro" else (64, ATTN_EXTRA)
    # (batch, key pool, kernel probe, flush L2 before the traced call, title)
    cases = [
        (128, None, "", True, ""),
        (128, HOT_POOL, "", True, " (hot: keys from 2304 records)"),
        (256, None, "", True, ""),
    ]
    if probes:
        cases = [
            (128, WARM_POOL, "", False, " warm") if pr == "warm" else (128, None, pr, True, f" {pr}") for pr in probes
        ]
    variants = sorted({pr for _, _, pr, _, _ in cases})
    ks = compat.precompile(
        [lambda pr=pr: attn._attend_ws_kernel(h, 64, 64, SCALE, False, ",".join(("trace", pr))) for pr in variants]
    )
    for b, pool, pr, flush, title in cases:
        k = ks[variants.index(pr)]
        args, (o, _), _ = _ws_direct_args(b, h, extra)
        if pool is not None:
            args[1].copy_(torch.randint(0, pool[0], args[1].shape, device="cuda", dtype=torch.int32))
            args[5].copy_(torch.randint(0, pool[1], args[5].shape, device="cuda", dtype=torch.int32))
        for _ in range(3):  # warm-up, then the traced call that is read back
            compat.launch(k, *args)
        if flush:
            torch.empty(256 << 20, dtype=torch.int8, device="cuda").zero_()
        compat.launch(k, *args)
        torch.cuda.synchronize()
        nb = -(-128 // attn.BLOCK_I) + -(-extra // attn.BLOCK_I)  # blocks a row of _ws_direct_args
        _trace_report(_trace_words(o, rows).cpu(), nb, f"{config} b={b}{title}")


def _fused_parts(q8, w, cache, pt, req, vis, n, tiling):
    """(full op, chunk kernel alone, merge kernel alone) closures of one chunk tiling."""
    cpg, stages, ctas, g = tiling
    t = q8.shape[0]
    kv, ks = idx._cache_views(cache.data, 64, 128)
    chunks = -(-n // (64 * cpg))
    cand_v = torch.empty((t, chunks, TOPK), dtype=torch.float32, device="cuda")
    cand_i = torch.empty((t, chunks, TOPK), dtype=torch.int32, device="cuda")
    out = torch.empty((t, TOPK), dtype=torch.int32, device="cuda")
    lens = torch.empty((t,), dtype=torch.int32, device="cuda")
    chunk_k = idx._chunk_topk_kernel(64, 128, 64, TOPK, cpg, stages, ctas, g)
    merge_k = idx._topk_merge_kernel(TOPK, 64, cpg)

    def full():
        idx.FORCE_CHUNK_TILING = tiling
        try:
            return idx.index_topk_fused(q8, w, cache, pt, req, vis, TOPK, TOPK, max_visible=n)
        finally:
            idx.FORCE_CHUNK_TILING = None

    def chunk():
        compat.launch(chunk_k, q8, w, kv, ks, pt, req, vis, cand_v, cand_i)

    def merge():
        compat.launch(merge_k, cand_v, cand_i, pt, req, vis, out, lens)

    return full, chunk, merge


WS_TILES = ((64, 2), (32, 3), (32, 4))


def attn_tiles() -> None:
    """The ws kernel with blocks of 32 or 64 keys on 2-4 K stages (direct path): checked, then timed."""
    compat.precompile([lambda bs=bs: attn._attend_ws_kernel(64, 64, 64, SCALE, False, "", *bs) for bs in WS_TILES])
    print("attention ws, direct (1 split), window 128 + 512; (keys a block, K stages); graphflush us")
    for b in (64, 128, 256):
        line = [f"b={b}"]
        for bs in WS_TILES:
            k = attn._attend_ws_kernel(64, 64, 64, SCALE, False, "", *bs)
            args, got, expect = _ws_direct_args(b)  # fresh NaN-poisoned outputs per variant
            compat.launch(k, *args)
            ok = _backend.default_compare(expect, got)
            t = graphflush_us(lambda: compat.launch(k, *args), rep_ms=20)
            line.append(f"{bs}: {t:.1f} {'ok' if ok is None else 'FAIL ' + str(ok)[:60]}")
        print("  ".join(line), flush=True)


def _fused_ok(q8, w, cache, pt, req, vis, n) -> str:
    """The full fused op (current knobs) against the reference top-512 sets: "ok" or "FAIL"."""
    try:
        g_idx, g_len = idx.index_topk_fused(q8, w, cache, pt, req, vis, TOPK, TOPK, max_visible=n)
        gpu_tests._check_topk_sets(q8, w, cache, pt, req, vis, n, TOPK, TOPK, g_idx, g_len)
    except AssertionError:
        return "FAIL"
    return "ok"


def merge_sweep() -> None:
    """The fused top-k's merge kernel alone at 256 / 512 / 1024 threads per token (candidates from the tiling
    `chunk_tiling` picks), checked against the reference sets through the full op."""
    threads = (256, 512, 1024)
    jobs = [lambda c=c, n=n: idx._topk_merge_kernel(TOPK, 64, c, n) for c in (32, 64) for n in threads]
    compat.precompile(jobs)
    print("fused top-512 merge kernel: graphflush us by threads per token")
    for t_, n in FUSED_CASES:
        q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(t_, n, seed=1)
        vis.fill_(n)
        tiling = idx.chunk_tiling(TOPK, n, 64, t_)
        _, chunk, _ = _fused_parts(q8, w, cache, pt, req, vis, n, tiling)
        line = [f"t={t_} keys={n} tiling {tiling}"]
        for nt in threads:
            idx.MERGE_THREADS = nt
            ok = _fused_ok(q8, w, cache, pt, req, vis, n)
            chunk()
            out = torch.empty((t_, TOPK), dtype=torch.int32, device="cuda")
            lens = torch.empty((t_,), dtype=torch.int32, device="cuda")
            chunks = -(-n // (64 * tiling[0]))
            cv = torch.empty((t_, chunks, TOPK), dtype=torch.float32, device="cuda")
            ci = torch.empty((t_, chunks, TOPK), dtype=torch.int32, device="cuda")
            kv, ks = idx._cache_views(cache.data, 64, 128)
            compat.launch(idx._chunk_topk_kernel(64, 128, 64, TOPK, *tiling), q8, w, kv, ks, pt, req, vis, cv, ci)
            mk = idx._topk_merge_kernel(TOPK, 64, tiling[0], nt)
            t_m = graphflush_us(lambda: compat.launch(mk, cv, ci, pt, req, vis, out, lens), rep_ms=20)
            t_f = graphflush_us(
                lambda: idx.index_topk_fused(q8, w, cache, pt, req, vis, TOPK, TOPK, max_visible=n), rep_ms=20
            )
            line.append(f"{nt}: merge {t_m:5.1f} total {t_f:6.1f} {ok}")
        idx.MERGE_THREADS = 1024
        print(" | ".join(line), flush=True)


def fused_sweep(*which: str) -> None:
    """Chunk tilings ("64,3,4,1" ...; default TILINGS) at FUSED_CASES: the full op, the chunk and merge kernels."""
    tilings = [tuple(int(x) for x in w.split(",")) for w in which] or TILINGS
    jobs = [lambda tl=tl: idx._chunk_topk_kernel(64, 128, 64, TOPK, *tl) for tl in tilings]
    jobs += [lambda c=c: idx._topk_merge_kernel(TOPK, 64, c) for c in sorted({tl[0] for tl in tilings})]
    t0 = time.time()
    compat.precompile(jobs)
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s")
    print("fused indexer top-512 (64 heads x 128, page 64, all keys visible); graphflush us: total = chunk + merge")
    for t_, n in FUSED_CASES:
        q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(t_, n, seed=1)
        vis.fill_(n)
        floor = t_ * n * 132 / HBM * 1e6
        print(f"t={t_} keys={n} memory floor {floor:.1f} us", flush=True)
        for tiling in tilings:
            full, chunk, merge = _fused_parts(q8, w, cache, pt, req, vis, n, tiling)
            try:
                g_idx, g_len = full()
                gpu_tests._check_topk_sets(q8, w, cache, pt, req, vis, n, TOPK, TOPK, g_idx, g_len)
                ok = "ok"
            except AssertionError as exc:
                ok = f"FAIL {str(exc)[:120]}"
            t_full = graphflush_us(full, rep_ms=20)
            t_chunk = graphflush_us(chunk, rep_ms=20)
            t_merge = graphflush_us(merge, rep_ms=20)
            print(
                f"  tiling {tiling}: total {t_full:7.1f}  chunk {t_chunk:7.1f}  merge {t_merge:6.1f}  {ok}", flush=True
            )
        q8 = w = cache = None
        torch.cuda.empty_cache()


CHUNK_PROBES = ("", "no_topk", "no_math,no_topk")


def pdl_probe() -> None:
    """Fused top-k: the chunk kernel with its stages left out (wrong results, timing only) and the full op with
    the merge launched as a programmatic dependent (PDL) or not; attention's split path with the combine as a
    PDL launch or not. Every full-op variant is checked against the reference first."""
    small, large = idx.CHUNK_SMALL, idx.CHUNK_LARGE
    jobs = [lambda tl=tl, pr=pr: idx._chunk_topk_kernel(64, 128, 64, TOPK, *tl, pr) for tl in (small, large)
            for pr in CHUNK_PROBES]  # fmt: skip
    jobs += [lambda c=c, pd=pd: idx._topk_merge_kernel(TOPK, 64, c, idx.MERGE_THREADS, pd) for c in (32, 64)
             for pd in (False, True)]  # fmt: skip
    jobs += [lambda pd=pd: attn._combine_kernel(64, 512, pd) for pd in (False, True)]
    jobs += [lambda: attn._attend_ws_kernel(64, 64, 64, SCALE, True)]
    t0 = time.time()
    compat.precompile(jobs)
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s", flush=True)
    print("fused top-512 (64 heads x 128, page 64, all keys visible); graphflush us")
    for t_, n in FUSED_CASES:
        q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(t_, n, seed=1)
        vis.fill_(n)
        tiling = idx.chunk_tiling(TOPK, n, 64, t_)
        kv, ks = idx._cache_views(cache.data, 64, 128)
        chunks = -(-n // (64 * tiling[0]))
        cv = torch.empty((t_, chunks, TOPK), dtype=torch.float32, device="cuda")
        ci = torch.empty((t_, chunks, TOPK), dtype=torch.int32, device="cuda")
        line = [f"t={t_} keys={n} tiling {tiling} floor {t_ * n * 132 / HBM * 1e6:.1f}"]
        for pd in (False, True):
            idx.MERGE_PDL = pd
            ok = _fused_ok(q8, w, cache, pt, req, vis, n)
            t_f = graphflush_us(
                lambda: idx.index_topk_fused(q8, w, cache, pt, req, vis, TOPK, TOPK, max_visible=n), rep_ms=20
            )
            line.append(f"pdl={int(pd)}: total {t_f:6.1f} {ok}")
        idx.MERGE_PDL = True
        for pr in CHUNK_PROBES:
            k = idx._chunk_topk_kernel(64, 128, 64, TOPK, *tiling, pr)
            t_c = graphflush_us(lambda: compat.launch(k, q8, w, kv, ks, pt, req, vis, cv, ci), rep_ms=20)
            line.append(f"chunk[{pr or 'full'}] {t_c:6.1f}")
        print(" | ".join(line), flush=True)
        q8 = w = cache = None
        torch.cuda.empty_cache()
    print("attention split path (ws main + combine), window 128 + 512; graphflush us")
    for b in (1, 32, 64):
        q, c1, i1, l1, kw = _attn_case(b, 512)
        expect = ref_attention(q, c1, i1, l1, **kw)
        line = [f"b={b} splits={attn.choose_splits(b, 1, 64, 128, 512, 'ws')}"]
        for pd in (False, True):
            attn.COMBINE_PDL = pd
            ok = _backend.default_compare(expect, attn.sparse_attention(q, c1, i1, l1, **kw))
            t = graphflush_us(lambda: attn.sparse_attention(q, c1, i1, l1, **kw), rep_ms=20)
            line.append(f"pdl={int(pd)}: {t:6.1f} {'ok' if ok is None else 'FAIL'}")
        attn.COMBINE_PDL = True
        print(" | ".join(line), flush=True)


MERGE_TRY = (2, 3)  # split-parts: cluster sizes tried (4 and 8: 1.5-1.9x slower, session 9)


def split_parts(*which: str) -> None:
    """Attention's split path: the whole op with partials + combine, its main (partials) kernel alone and its
    combine alone, and the whole op merged in a cluster where `cluster_merge` allows (graphflush us)."""
    cases = [("flash", 64, 512, b) for b in (1, 4, 16, 32, 48, 64)] + [("pro", 128, 1024, b) for b in (1, 8, 16, 32)]
    if which:  # e.g. flash:36,40 pro:18
        geo = {"flash": (64, 512), "pro": (128, 1024)}
        cases = [(c, *geo[c], int(b)) for w in which for c, bs in [w.split(":")] for b in bs.split(",")]
    jobs = [lambda h=h: attn._kernels("ws", h, 448, 64, 64, 64, 64, SCALE, True) for h in (64, 128)]
    jobs += [lambda h=h, n=n: attn._kernels("ws", h, 448, 64, 64, 64, 64, SCALE, True, True, n)
             for h in (64, 128) for n in MERGE_TRY]  # fmt: skip
    compat.precompile(jobs)
    print("attention split path (ws): window 128 + extra; graphflush us")
    for cfg, h, extra, b in cases:
        q, c1, i1, l1, kw = _attn_case(b, extra, h)
        splits = attn.choose_splits(b, 1, h, 128, extra, "ws")
        if splits == 1:
            continue
        expect = ref_attention(q, c1, i1, l1, **kw)
        merged = ""
        waves = attn.CLUSTER_WAVE_CTAS
        for ns in MERGE_TRY:  # ns splits merged in an ns-CTA cluster (even where it takes two waves)
            attn.FORCE_SPLITS, attn.MERGE_SIZES, attn.CLUSTER_WAVE_CTAS = ns, (ns,), {ns: 1 << 30}
            assert attn.cluster_merge(ns, 128, extra, attn._programs(b, 1, h)) == ns
            ok = _backend.default_compare(expect, attn.sparse_attention(q, c1, i1, l1, **kw))
            t = graphflush_us(lambda: attn.sparse_attention(q, c1, i1, l1, **kw), rep_ms=20)
            merged += f" | {ns} merged {t:6.1f} {'ok' if ok is None else 'FAIL'}"
        attn.FORCE_SPLITS, attn.MERGE_SIZES, attn.CLUSTER_WAVE_CTAS = None, (2, 3), waves
        attn.CLUSTER_MERGE = False
        ok = _backend.default_compare(expect, attn.sparse_attention(q, c1, i1, l1, **kw))
        full = graphflush_us(lambda: attn.sparse_attention(q, c1, i1, l1, **kw), rep_ms=20)
        attn.CLUSTER_MERGE = True
        main, comb = attn._kernels("ws", h, 448, 64, 64, 64, 64, SCALE, True)
        w1, h1, st1 = attn._cache_views_ws(c1.data)
        w2, h2, st2 = attn._cache_views_ws(kw["extra_cache"].data)
        opart = torch.empty((b, 1, splits, h, 512), dtype=torch.float32, device="cuda")
        lpart = torch.empty((b, 1, splits, h), dtype=torch.float32, device="cuda")
        o = torch.empty_like(q)
        lse = torch.empty((b, h, 1), dtype=torch.float32, device="cuda")
        margs = (q, i1, l1, w1, h1, kw["extra_indices"], kw["extra_lens"], w2, h2, opart, lpart, st1, st2)
        t_main = graphflush_us(lambda: compat.launch(main, *margs), rep_ms=20)
        t_comb = graphflush_us(lambda: compat.launch(comb, opart, lpart, kw["sink"], o, lse), rep_ms=20)
        mb = opart.numel() * 4 / 1e6
        head = f"{cfg} b={b:<3d} s={splits:<2d} {'ok' if ok is None else 'FAIL'}"
        print(f"{head} | full {full:6.1f} | main {t_main:6.1f} | comb {t_comb:6.1f} | {mb:.1f} MB{merged}")


def merge_check() -> None:
    """Cluster merge vs partials + combine on the GPU tests' inputs (holes, empty rows, poisoned slots), both over
    the splits the merge uses and over the heuristic's (a different cut of a row rounds P differently): where the
    outputs differ by more than one bf16 rounding, and each one's largest error against the reference."""
    gt = gpu_tests
    for b, h, k2 in ((32, 64, 512), (40, 64, 512), (64, 64, 512), (16, 128, 1024), (32, 128, 1024)):
        q, c1, i1, l1, c2, i2, l2, s = gt._attn_inputs(b, h, 128, k2, seed=b + h + 1)
        kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
        splits = attn.choose_splits(b, 1, h, 128, k2, "ws")
        ns = attn.cluster_merge(splits, 128, k2, attn._programs(b, 1, h))
        ref = ref_attention(q, c1, i1, l1, **kw)[0].float()
        m = attn.sparse_attention(q, c1, i1, l1, **kw)[0].float()
        line = f"b={b} h={h}: merged in {ns}s (heuristic {splits} splits), max err {float((m - ref).abs().max()):.2e}"
        attn.CLUSTER_MERGE = False
        for force in (ns, None):
            attn.FORCE_SPLITS = force
            c = attn.sparse_attention(q, c1, i1, l1, **kw)[0].float()
            bad = (m - c).abs() > c.abs().maximum(m.abs()) * 2**-7 + 1e-6
            line += f" | combine over {force or splits}: >1 ulp apart {int(bad.sum())} of {bad.numel()},"
            line += f" max err {float((c - ref).abs().max()):.2e}"
        attn.CLUSTER_MERGE, attn.FORCE_SPLITS = True, None
        print(line, flush=True)


def run_attn(b: int) -> None:
    q, c1, i1, l1, kw = _attn_case(b, 512)
    for _ in range(3):
        attn.sparse_attention(q, c1, i1, l1, **kw)
    torch.cuda.synchronize()


def run_fused(t_: int, n: int) -> None:
    q8, w, cache, pt, req, vis = gpu_tests._indexer_inputs(t_, n, seed=1)
    vis.fill_(n)
    for _ in range(3):
        idx.index_topk_fused(q8, w, cache, pt, req, vis, TOPK, TOPK, max_visible=n)
    torch.cuda.synchronize()


def main() -> None:
    cmd = sys.argv[1]
    text_args = ("attn-scan", "attn-probe", "fused-sweep", "attn-trace", "split-parts")
    args = sys.argv[2:] if cmd in text_args else [int(a) for a in sys.argv[2:]]
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    cmds = {"attn-scan": attn_scan, "attn-probe": attn_probe, "fused-sweep": fused_sweep, "merge-sweep": merge_sweep}
    cmds.update({"run-attn": run_attn, "run-fused": run_fused, "pdl-probe": pdl_probe, "attn-tiles": attn_tiles})
    cmds["attn-trace"] = attn_trace
    cmds["split-parts"] = split_parts
    cmds["merge-check"] = merge_check
    cmds[cmd](*args)


if __name__ == "__main__":
    main()
