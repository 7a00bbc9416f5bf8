# pyright: reportInvalidTypeForm=false, reportGeneralTypeIssues=false, reportOperatorIssue=false
# (TileLang kernels are a DSL: `T.Tensor[(M, N), dtype]` annotations are not Python types.)
"""TileLang FP8 paged MQA logits and a fused indexer + top-k (spec §4).

Cache: DeepGEMM's paged layout, a page of `P` keys = `P × di` e4m3 bytes then `P` fp32 scales. The
kernels view a page as `[P + 4P/di, di]` e4m3 rows (the last rows are the scales, read through an
fp32 view), so a page's keys arrive with one tile copy. Per page: S[key, head] = K8 · Q8ᵀ (fp8
wgmma, fp32 accumulate), logit[key] = s_k · Σ_h w_h · relu(S).

`index_logits` (`paged_logits`): a program owns one query token and `PAGES_PER_PROGRAM` pages of its
request; columns `j >= visible` (and whole pages past it, which are not read) are -inf.

`index_topk_fused`: never writes the fp32 logits. Four launches, no host sync:
  1. histogram: logits computed on the fly, a 12-bit order-preserving bucket of each visible logit
     counted into a per-token histogram (shared, then global atomics);
  2. threshold: per token, the bucket holding the topk-th largest logit and the count above it;
  3. select: logits recomputed; entries above the bucket go straight to the output (atomic slot),
     entries in the bucket go to a per-token candidate list (value, position);
  4. finish: the missing `topk - above` entries are ranked exactly among the candidates (ties broken
     by position), rows with `visible <= topk` take every entry in order, -1 padding, lengths.
Pass 1 and 3 each read the keys once (2× the logits kernel's key traffic, no logits traffic).
"""

import torch
from torch import Tensor

from .. import _backend
from .._tilelang_compat import T, jit, launch
from ..state import IndexerKeyCache

PAGES_PER_PROGRAM = 16  # H100 sweep (t=32, 16k keys): 2/4/8/16 pages -> 96/76/67/61 us
STAGES = 3
_LOGITS_TILING = (PAGES_PER_PROGRAM, STAGES)  # (pages per program, pipeline stages) of index_logits
THREADS = 128
BUCKET_BITS = 12
NBUCKETS = 1 << BUCKET_BITS
FINISH_THREADS = 256
FINISH_SMEM = 4096  # candidates staged in shared memory by the finish kernel


def _geometry(cache: IndexerKeyCache, hi: int) -> tuple[int, int]:
    p, di = cache.page_size, cache.dim
    if (4 * p) % di != 0 or p % 64 != 0 or di % 32 != 0:
        raise ValueError(
            f"cache: the TileLang indexer needs page_size a multiple of 64 and 4*page_size a multiple of dim "
            f"(got page_size {p}, dim {di}); use backend 'torch'"
        )
    if hi % 16 != 0:
        raise ValueError(f"q8: the TileLang indexer needs a multiple of 16 heads, got {hi}")
    return p, di


def _page_macro(hi: int, di: int, p: int):
    """Macro: logits of logical page `lp` of token `t` into fragment `lg` [p] (-inf past `vis`)."""
    f32, fp8 = T.float32, T.float8_e4m3fn
    SOFF = p * di // 4  # fp32 offset of the scales in a page

    @T.macro
    def page_logits(Kv, Ks, PT, req, lp, vis, n_pages, mb, Q_s, w_f, K_s, S, lg, sc_f):
        phys = T.min(T.max(PT[req, T.min(lp, mb - 1)], 0), n_pages - 1)
        T.copy(Kv[phys, 0:p, :], K_s)
        for j in T.Parallel(p):
            sc_f[j] = Ks[phys, SOFF + j]
        T.gemm(K_s, Q_s, S, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullCol)
        for j, hh in T.Parallel(p, hi):
            S[j, hh] = T.max(S[j, hh], 0) * w_f[hh]
        T.reduce_sum(S, lg, dim=1, clear=True)
        for j in T.Parallel(p):
            lg[j] = T.if_then_else(lp * p + j < vis, lg[j] * sc_f[j], -T.infinity(f32))

    return page_logits, fp8


def build_logits(hi: int, di: int, p: int, ppc: int = PAGES_PER_PROGRAM, stages: int = STAGES):
    """PrimFunc: logits [t, width] (exposed for the CPU lowering tests)."""
    f32, i32 = T.float32, T.int32
    page_logits, fp8 = _page_macro(hi, di, p)
    NT_ = T.dynamic("tokens")
    W = T.dynamic("width")
    NP = T.dynamic("n_pages")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    ROWS = p + 4 * p // di

    @T.prim_func
    def index_logits(
        Q: T.Tensor[(NT_, hi, di), fp8],
        Wt: T.Tensor[(NT_, hi), f32],
        Kv: T.Tensor[(NP, ROWS, di), fp8],
        Ks: T.Tensor[(NP, ROWS * di // 4), f32],
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        Out: T.Tensor[(NT_, W), f32],
    ):
        with T.Kernel(T.ceildiv(W, p * ppc), NT_, threads=THREADS) as (c, t):
            Q_s = T.alloc_shared([hi, di], fp8)
            K_s = T.alloc_shared([p, di], fp8)
            w_f = T.alloc_fragment([hi], f32)
            S = T.alloc_fragment([p, hi], f32)
            lg = T.alloc_fragment([p], f32)
            sc_f = T.alloc_fragment([p], f32)
            vis = Vis[t]
            req = Req[t]
            T.copy(Q[t, :, :], Q_s)
            T.copy(Wt[t, :], w_f)
            npg = T.max(T.min(ppc, T.ceildiv(vis, p) - c * ppc), 0)
            for it in T.Pipelined(npg, num_stages=stages):
                lp = c * ppc + it
                page_logits(Kv, Ks, PT, req, lp, vis, NP, MB, Q_s, w_f, K_s, S, lg, sc_f)
                for j in T.Parallel(p):
                    if lp * p + j < W:
                        Out[t, lp * p + j] = lg[j]
            for it, j in T.Parallel(ppc, p):
                col = (c * ppc + it) * p + j
                if it >= npg and col < W:
                    Out[t, col] = -T.infinity(f32)

    return index_logits


def _order_key(x):
    """Order-preserving uint32 of an fp32 value (larger float -> larger key)."""
    u = T.reinterpret(x, T.uint32)
    return T.if_then_else(u >= T.uint32(0x80000000), ~u, u | T.uint32(0x80000000))


def build_hist(hi: int, di: int, p: int, ppc: int = PAGES_PER_PROGRAM, stages: int = STAGES):
    """PrimFunc, pass 1: per-token histogram of logit buckets (visible entries only)."""
    f32, i32 = T.float32, T.int32
    page_logits, fp8 = _page_macro(hi, di, p)
    NT_ = T.dynamic("tokens")
    NC = T.dynamic("chunks")
    NP = T.dynamic("n_pages")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    ROWS = p + 4 * p // di

    @T.prim_func
    def index_hist(
        Q: T.Tensor[(NT_, hi, di), fp8],
        Wt: T.Tensor[(NT_, hi), f32],
        Kv: T.Tensor[(NP, ROWS, di), fp8],
        Ks: T.Tensor[(NP, ROWS * di // 4), f32],
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        Hist: T.Tensor[(NT_, NBUCKETS), i32],
        Dummy: T.Tensor[(NC,), i32],
    ):
        with T.Kernel(NC, NT_, threads=THREADS) as (c, t):
            Q_s = T.alloc_shared([hi, di], fp8)
            K_s = T.alloc_shared([p, di], fp8)
            h_s = T.alloc_shared([NBUCKETS], i32)
            w_f = T.alloc_fragment([hi], f32)
            S = T.alloc_fragment([p, hi], f32)
            lg = T.alloc_fragment([p], f32)
            sc_f = T.alloc_fragment([p], f32)
            vis = Vis[t]
            req = Req[t]
            T.fill(h_s, 0)
            T.copy(Q[t, :, :], Q_s)
            T.copy(Wt[t, :], w_f)
            npg = T.max(T.min(ppc, T.ceildiv(vis, p) - c * ppc), 0)
            for it in T.Pipelined(npg, num_stages=stages):
                lp = c * ppc + it
                page_logits(Kv, Ks, PT, req, lp, vis, NP, MB, Q_s, w_f, K_s, S, lg, sc_f)
                for j in T.Parallel(p):
                    if lp * p + j < vis:
                        T.atomic_add(h_s[T.cast(_order_key(lg[j]) >> T.uint32(32 - BUCKET_BITS), i32)], 1)
            for i in T.Parallel(NBUCKETS):
                if h_s[i] > 0:
                    T.atomic_add(Hist[t, i], h_s[i])

    return index_hist


def build_threshold(topk: int):
    """PrimFunc, pass 2: Thr[t, 0] = bucket of the topk-th largest, Thr[t, 1] = count strictly above."""
    i32 = T.int32
    NT_ = T.dynamic("tokens")
    SEG = NBUCKETS // THREADS

    @T.prim_func
    def index_threshold(Hist: T.Tensor[(NT_, NBUCKETS), i32], Thr: T.Tensor[(NT_, 2), i32]):
        with T.Kernel(NT_, threads=THREADS) as t:
            tx = T.get_thread_binding()
            h_s = T.alloc_shared([NBUCKETS], i32)
            seg_s = T.alloc_shared([THREADS], i32)
            acc = T.alloc_var(i32)
            above = T.alloc_var(i32)
            seg = T.alloc_var(i32)
            bucket = T.alloc_var(i32)
            T.copy(Hist[t, :], h_s)
            acc = 0
            for k in T.serial(SEG):
                acc = acc + h_s[tx * SEG + k]
            seg_s[tx] = acc
            T.sync_threads()
            if tx == 0:
                above = 0
                seg = -1
                for s in T.serial(THREADS):
                    if seg < 0:
                        if above + seg_s[THREADS - 1 - s] >= topk:
                            seg = THREADS - 1 - s
                        else:
                            above = above + seg_s[THREADS - 1 - s]
                bucket = -1
                if seg >= 0:
                    for k in T.serial(SEG):
                        if bucket < 0:
                            if above + h_s[seg * SEG + SEG - 1 - k] >= topk:
                                bucket = seg * SEG + SEG - 1 - k
                            else:
                                above = above + h_s[seg * SEG + SEG - 1 - k]
                Thr[t, 0] = bucket
                Thr[t, 1] = above

    return index_threshold


def build_select(hi: int, di: int, p: int, ppc: int = PAGES_PER_PROGRAM, stages: int = STAGES):
    """PrimFunc, pass 3: entries above the threshold bucket -> output; in the bucket -> candidates."""
    f32, i32 = T.float32, T.int32
    page_logits, fp8 = _page_macro(hi, di, p)
    NT_ = T.dynamic("tokens")
    NC = T.dynamic("chunks")
    W = T.dynamic("width")
    CAP = T.dynamic("cap")
    NP = T.dynamic("n_pages")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    ROWS = p + 4 * p // di

    @T.prim_func
    def index_select(
        Q: T.Tensor[(NT_, hi, di), fp8],
        Wt: T.Tensor[(NT_, hi), f32],
        Kv: T.Tensor[(NP, ROWS, di), fp8],
        Ks: T.Tensor[(NP, ROWS * di // 4), f32],
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        Thr: T.Tensor[(NT_, 2), i32],
        Cnt: T.Tensor[(NT_, 2), i32],
        CandV: T.Tensor[(NT_, CAP), f32],
        CandI: T.Tensor[(NT_, CAP), i32],
        Out: T.Tensor[(NT_, W), i32],
        Dummy: T.Tensor[(NC,), i32],
    ):
        with T.Kernel(NC, NT_, threads=THREADS) as (c, t):
            Q_s = T.alloc_shared([hi, di], fp8)
            K_s = T.alloc_shared([p, di], fp8)
            w_f = T.alloc_fragment([hi], f32)
            S = T.alloc_fragment([p, hi], f32)
            lg = T.alloc_fragment([p], f32)
            sc_f = T.alloc_fragment([p], f32)
            vis = Vis[t]
            req = Req[t]
            thr = T.alloc_var(i32)
            thr = Thr[t, 0]
            T.copy(Q[t, :, :], Q_s)
            T.copy(Wt[t, :], w_f)
            npg = T.max(T.min(ppc, T.ceildiv(vis, p) - c * ppc), 0)
            if thr >= 0:
                for it in T.Pipelined(npg, num_stages=stages):
                    lp = c * ppc + it
                    page_logits(Kv, Ks, PT, req, lp, vis, NP, MB, Q_s, w_f, K_s, S, lg, sc_f)
                    for j in T.Parallel(p):
                        pos = lp * p + j
                        bkt = T.cast(_order_key(lg[j]) >> T.uint32(32 - BUCKET_BITS), i32)
                        if pos < vis:
                            if bkt > thr:
                                o = T.atomic_add(Cnt[t, 0], 1, return_prev=True)
                                Out[t, o] = PT[req, T.min(lp, MB - 1)] * p + j
                            elif bkt == thr:
                                o2 = T.atomic_add(Cnt[t, 1], 1, return_prev=True)
                                if o2 < CAP:
                                    CandV[t, o2] = lg[j]
                                    CandI[t, o2] = pos

    return index_select


def build_finish(topk: int, p: int):
    """PrimFunc, pass 4: rank the threshold-bucket candidates, trivial rows, padding, lengths."""
    f32, i32 = T.float32, T.int32
    NT_ = T.dynamic("tokens")
    W = T.dynamic("width")
    CAP = T.dynamic("cap")
    NB = T.dynamic("n_requests")
    MB = T.dynamic("max_blocks")
    NTH = FINISH_THREADS
    SM = FINISH_SMEM

    @T.prim_func
    def index_finish(
        PT: T.Tensor[(NB, MB), i32],
        Req: T.Tensor[(NT_,), i32],
        Vis: T.Tensor[(NT_,), i32],
        Thr: T.Tensor[(NT_, 2), i32],
        Cnt: T.Tensor[(NT_, 2), i32],
        CandV: T.Tensor[(NT_, CAP), f32],
        CandI: T.Tensor[(NT_, CAP), i32],
        Out: T.Tensor[(NT_, W), i32],
        Lens: T.Tensor[(NT_,), i32],
    ):
        with T.Kernel(NT_, threads=NTH) as t:
            tx = T.get_thread_binding()
            v_s = T.alloc_shared([SM], f32)
            i_s = T.alloc_shared([SM], i32)
            rank = T.alloc_var(i32)
            vis = Vis[t]
            req = Req[t]
            if vis <= topk:
                for k in T.serial(T.ceildiv(W, NTH)):
                    j = k * NTH + tx
                    if j < W:
                        Out[t, j] = T.if_then_else(j < vis, PT[req, T.min(j // p, MB - 1)] * p + j % p, -1)
            else:
                above = Thr[t, 1]
                need = topk - above
                n = T.min(Cnt[t, 1], CAP)
                for k in T.serial(T.ceildiv(W, NTH)):
                    j = k * NTH + tx
                    if j >= topk and j < W:
                        Out[t, j] = -1
                if n <= SM:
                    for k in T.serial(T.ceildiv(n, NTH)):
                        m = k * NTH + tx
                        if m < n:
                            v_s[m] = CandV[t, m]
                            i_s[m] = CandI[t, m]
                    T.sync_threads()
                    for k in T.serial(T.ceildiv(n, NTH)):
                        m = k * NTH + tx
                        if m < n:
                            rank = 0
                            for q in T.serial(n):
                                if (v_s[q] > v_s[m]) | ((v_s[q] == v_s[m]) & (i_s[q] < i_s[m])):
                                    rank = rank + 1
                            if rank < need:
                                jj = i_s[m]
                                Out[t, above + rank] = PT[req, T.min(jj // p, MB - 1)] * p + jj % p
                else:
                    for k in T.serial(T.ceildiv(n, NTH)):
                        m = k * NTH + tx
                        if m < n:
                            rank = 0
                            for q in T.serial(n):
                                if (CandV[t, q] > CandV[t, m]) | (
                                    (CandV[t, q] == CandV[t, m]) & (CandI[t, q] < CandI[t, m])
                                ):
                                    rank = rank + 1
                            if rank < need:
                                jj = CandI[t, m]
                                Out[t, above + rank] = PT[req, T.min(jj // p, MB - 1)] * p + jj % p
            if tx == 0:
                Lens[t] = T.min(vis, topk)

    return index_finish


@jit
def _logits_kernel(hi: int, di: int, p: int, ppc: int = PAGES_PER_PROGRAM, stages: int = STAGES):
    return build_logits(hi, di, p, ppc, stages)


@jit
def _hist_kernel(hi: int, di: int, p: int):
    return build_hist(hi, di, p)


@jit
def _threshold_kernel(topk: int):
    return build_threshold(topk)


@jit
def _select_kernel(hi: int, di: int, p: int):
    return build_select(hi, di, p)


@jit
def _finish_kernel(topk: int, p: int):
    return build_finish(topk, p)


def _cache_views(data: Tensor, p: int, di: int) -> tuple[Tensor, Tensor]:
    if not data.is_contiguous():
        raise ValueError("cache.data: the TileLang indexer needs a contiguous cache")
    n = data.shape[0]
    rows = p + 4 * p // di
    kv = data.view(torch.float8_e4m3fn).view(n, rows, di)
    ks = data.view(torch.float32).view(n, rows * di // 4) if data.numel() else data.view(torch.float32)
    return kv, ks


@torch.library.custom_op("dsv4fn::tl_index_logits", mutates_args=())
def tl_index_logits(
    q8: Tensor, weights: Tensor, data: Tensor, page_table: Tensor, token_request: Tensor, visible: Tensor,
    page_size: int, width: int,
) -> Tensor:  # fmt: skip
    t, hi, di = q8.shape
    kv, ks = _cache_views(data, page_size, di)
    out = torch.empty((t, width), dtype=torch.float32, device=q8.device)
    if t and width:
        launch(
            _logits_kernel(hi, di, page_size, *_LOGITS_TILING),
            q8,
            weights,
            kv,
            ks,
            page_table,
            token_request,
            visible,
            out,
        )
    return out


@tl_index_logits.register_fake
def _(q8, weights, data, page_table, token_request, visible, page_size, width):
    return q8.new_empty((q8.shape[0], width), dtype=torch.float32)


@torch.library.custom_op("dsv4fn::tl_index_topk_fused", mutates_args=())
def tl_index_topk_fused(
    q8: Tensor, weights: Tensor, data: Tensor, page_table: Tensor, token_request: Tensor, visible: Tensor,
    page_size: int, topk: int, width: int, max_visible: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`max_visible`: a host-known bound on `visible` (the logits width); it sizes the grid and the
    candidate scratch, so no value-dependent allocation happens."""
    t, hi, di = q8.shape
    dev = q8.device
    kv, ks = _cache_views(data, page_size, di)
    out = torch.empty((t, width), dtype=torch.int32, device=dev)
    lens = torch.empty((t,), dtype=torch.int32, device=dev)
    if t == 0:
        return out, lens
    span = max(page_size, -(-max_visible // page_size) * page_size)
    chunks = -(-span // (page_size * PAGES_PER_PROGRAM))
    dummy = torch.empty((chunks,), dtype=torch.int32, device=dev)  # carries the grid size only
    hist = torch.zeros((t, NBUCKETS), dtype=torch.int32, device=dev)
    thr = torch.empty((t, 2), dtype=torch.int32, device=dev)
    cnt = torch.zeros((t, 2), dtype=torch.int32, device=dev)
    cand_v = torch.empty((t, span), dtype=torch.float32, device=dev)
    cand_i = torch.empty((t, span), dtype=torch.int32, device=dev)
    launch(_hist_kernel(hi, di, page_size), q8, weights, kv, ks, page_table, token_request, visible, hist, dummy)
    launch(_threshold_kernel(topk), hist, thr)
    launch(
        _select_kernel(hi, di, page_size),
        q8, weights, kv, ks, page_table, token_request, visible, thr, cnt, cand_v, cand_i, out, dummy,
    )  # fmt: skip
    launch(_finish_kernel(topk, page_size), page_table, token_request, visible, thr, cnt, cand_v, cand_i, out, lens)
    return out, lens


@tl_index_topk_fused.register_fake
def _(q8, weights, data, page_table, token_request, visible, page_size, topk, width, max_visible):
    t = q8.shape[0]
    return q8.new_empty((t, width), dtype=torch.int32), q8.new_empty((t,), dtype=torch.int32)


def _check(q8: Tensor, cache: IndexerKeyCache) -> None:
    _geometry(cache, q8.shape[1])
    if q8.shape[-1] != cache.dim:
        raise ValueError(f"q8: dim {q8.shape[-1]} != cache dim {cache.dim}")


@_backend.register("index_logits", "tilelang")
def paged_logits(
    q8: Tensor, weights: Tensor, cache: IndexerKeyCache, page_table: Tensor, token_request: Tensor, visible: Tensor,
    width: int,
) -> Tensor:  # fmt: skip
    """Same contract as `reference.paged_logits` (CUDA tensors)."""
    _check(q8, cache)
    return tl_index_logits(
        q8.contiguous(), weights.contiguous(), cache.data, page_table.contiguous(), token_request.contiguous(),
        visible.contiguous(), cache.page_size, int(width),
    )  # fmt: skip


@_backend.register("index_topk_fused", "tilelang")
def index_topk_fused(
    q8: Tensor, weights: Tensor, cache: IndexerKeyCache, page_table: Tensor, token_request: Tensor, visible: Tensor,
    topk: int, width: int, max_visible: int | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Top-`topk` cache slots per query token without materialising the logits.

    Returns (slots int32 `[t, width]`, -1 padded; lens int32 `[t]` = min(visible, topk)). Rows with
    `visible <= topk` select every entry in order; other rows are unordered sets. `max_visible`
    bounds `visible` (defaults to the page table's capacity `max_blocks * page_size`)."""
    _check(q8, cache)
    if not 1 <= topk <= width:
        raise ValueError(f"topk: expected 1..width={width}, got {topk}")
    if max_visible is None:
        max_visible = page_table.shape[1] * cache.page_size
    return tl_index_topk_fused(
        q8.contiguous(), weights.contiguous(), cache.data, page_table.contiguous(), token_request.contiguous(),
        visible.contiguous(), cache.page_size, int(topk), int(width), int(max_visible),
    )  # fmt: skip
