# pyright: reportInvalidTypeForm=false, reportGeneralTypeIssues=false, reportOperatorIssue=false
# (TileLang kernels are a DSL: `T.Tensor[(M, N), dtype]` annotations are not Python types.)
"""TileLang sparse attention decode over MODEL1 FP8 caches (matches `reference.sparse_attention`).

One program owns (request b, query s, a block of up to 64 heads, one KV split). It walks its share
of the 64-token blocks of the row's index lists — first the main (window) list, then the extra
(compressed) list, each cut at its length — and for each block:
  1. reads the 64 indices, marks slots that are -1 or past the list length invalid;
  2. gathers the records: e4m3 nope bytes -> fp32 * 2^(scale byte - 127) -> bf16 (exact: a cvt of
     the e4m3 value, never the bf16 bit trick, and the scale built from its exponent bits), and the
     bf16 rope values; an invalid slot is never read and its row is zero, so NaN bytes in slots that
     are not selected cannot leak;
  3. S = Q K^T (wgmma), online softmax in the log2 domain, O += P V with V = K (all d dims).
With one split the program finishes the row itself (sink, natural-log LSE, o = 0 / lse = +inf for an
empty row); with several it writes fp32 partials (normalised o, log2 LSE) and a combine kernel merges
them. The split count is chosen on the host from the batch shape only (no host sync), so the launch
is CUDA-graph capturable. Compiled kernels are cached per (heads, dims, page sizes, scale, split
mode); batch, query count, index widths, cache sizes and split count are symbolic.

Launches go through `_tilelang_compat.launch` (torch's current stream). d must be a multiple of 64
with a 64-wide rope part (448 + 64); the tiny test geometry (32 + 32) is rejected with a ValueError.
"""

import functools
import math

import torch
from torch import Tensor

from .. import _backend
from .._tilelang_compat import T, jit, launch
from ..state import PagedKVCache

BLOCK_I = 64  # keys per block
HEAD_BLOCK = 64  # heads per program (at most)
THREADS = 256
NUM_SMS_TARGET = 132  # H100 SXM
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _head_block(h: int) -> int:
    # Always 64 rows (masked past h): the 16/32-row blocks took TileLang's mma path, whose result for
    # 8 heads disagreed with the reference on the H100; the 64-row wgmma path is the verified one.
    del h
    return HEAD_BLOCK


@functools.cache
def _kernels(h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool):
    """Compiled (main, combine-or-None) kernels for one geometry."""
    main = _attend_kernel(h, nope, rope, tile, p1, p2, scale, split)
    comb = _combine_kernel(h, nope + rope) if split else None
    return main, comb


# indices are trusted to address the cache (DSV4FN_VALIDATE=1 checks them in the step): no per-load guards
PASS_CONFIGS = {"tl.disable_safe_memory_legalize": True}


@jit(pass_configs=PASS_CONFIGS)
def _attend_kernel(h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool):
    return build_attend(h, nope, rope, tile, p1, p2, scale, split)


@jit
def _combine_kernel(h: int, d: int):
    return build_combine(h, d)


def build_attend(h: int, nope: int, rope: int, tile: int, p1: int, p2: int, scale: float, split: bool):
    """The attention PrimFunc (exposed for the CPU lowering tests)."""
    D = nope + rope
    NT = nope // tile  # scale bytes per token
    REC = nope + 2 * rope  # data record bytes
    SB = ((NT + 1 + 7) // 8) * 8  # scale record bytes
    HB = _head_block(h)
    NHB = (h + HB - 1) // HB
    BI = BLOCK_I
    sl2 = scale * LOG2E
    bf16, f32, i32, i64 = T.bfloat16, T.float32, T.int32, T.int64
    fp8 = T.float8_e4m3fn

    B = T.dynamic("batch")
    SQ = T.dynamic("s_q")
    K1 = T.dynamic("k1")
    K2 = T.dynamic("k2")
    N1 = T.dynamic("bytes1")
    N2 = T.dynamic("bytes2")
    N1h = T.dynamic("halves1")
    N2h = T.dynamic("halves2")
    NS = T.dynamic("splits")
    PAD_HEADS = h % HB != 0

    @T.macro
    def load_one(Idx, Len, KW, Cu8, Cf8, Cbf, P, stride, b, sq, col0, valid_s, base_s, sbase_s, scale_s, KV_s):
        # 64 slots of one list (columns col0..col0+63) -> dequantized bf16 rows of KV_s (0 when invalid)
        n = T.min(Len[b], KW)
        for bi in T.Parallel(BI):
            col = col0 + bi
            ix = Idx[b, sq, T.min(col, KW - 1)]
            slot = T.max(ix, 0)
            pbase = T.cast(slot // P, i64) * T.cast(stride, i64)
            valid_s[bi] = T.if_then_else((col < n) & (ix >= 0), 1, 0)
            base_s[bi] = pbase + T.cast((slot % P) * REC, i64)
            sbase_s[bi] = pbase + T.cast(P * REC + (slot % P) * SB, i64)
        for bi, t in T.Parallel(BI, NT):
            byte = T.if_then_else(valid_s[bi] != 0, T.cast(Cu8[sbase_s[bi] + t], T.uint32), T.uint32(127))
            scale_s[bi, t] = T.reinterpret(byte << T.uint32(23), f32)
        for bi, dd in T.Parallel(BI, D):
            if dd < nope:
                KV_s[bi, dd] = T.if_then_else(
                    valid_s[bi] != 0,
                    T.cast(T.cast(Cf8[base_s[bi] + dd], f32) * scale_s[bi, dd // tile], bf16),
                    T.cast(0, bf16),
                )
            else:
                KV_s[bi, dd] = T.if_then_else(
                    valid_s[bi] != 0, Cbf[T.shift_right(base_s[bi] + nope, 1) + (dd - nope)], T.cast(0, bf16)
                )

    @T.macro
    def attend_rows(
        Q, Idx1, Len1, C1u8, C1f8, C1bf, Idx2, Len2, C2u8, C2f8, C2bf, stride1, stride2,
        b, sq, h0, sp, nsplit, acc_o, sumexp, m_i,
    ):  # fmt: skip
        Q_s = T.alloc_shared([HB, D], bf16)
        KV_s = T.alloc_shared([BI, D], bf16)
        S_s = T.alloc_shared([HB, BI], bf16)
        valid_s = T.alloc_shared([BI], i32)
        base_s = T.alloc_shared([BI], i64)
        sbase_s = T.alloc_shared([BI], i64)
        scale_s = T.alloc_shared([BI, NT], f32)
        acc_s = T.alloc_fragment([HB, BI], f32)
        sumexp_i = T.alloc_fragment([HB], f32)
        alpha = T.alloc_fragment([HB], f32)
        m_prev = T.alloc_fragment([HB], f32)

        T.fill(acc_o, 0)
        T.fill(sumexp, 0)
        T.fill(m_i, -(2.0**30))
        if PAD_HEADS:
            for i, dd in T.Parallel(HB, D):
                Q_s[i, dd] = T.if_then_else(h0 + i < h, Q[b, sq, T.min(h0 + i, h - 1), dd], T.cast(0, bf16))
        else:
            T.copy(Q[b, sq, h0 : h0 + HB, :], Q_s)

        n1 = T.max(T.min(Len1[b], K1), 0)
        n2 = T.max(T.min(Len2[b], K2), 0)
        nb1 = T.ceildiv(n1, BI)
        nb = nb1 + T.ceildiv(n2, BI)
        per = T.ceildiv(nb, nsplit)
        blk0 = sp * per
        cnt = T.max(T.min(nb - blk0, per), 0)
        for it in T.serial(cnt):
            blk = blk0 + it
            if blk < nb1:
                load_one(Idx1, Len1, K1, C1u8, C1f8, C1bf, p1, stride1, b, sq, blk * BI,
                         valid_s, base_s, sbase_s, scale_s, KV_s)  # fmt: skip
            else:
                load_one(Idx2, Len2, K2, C2u8, C2f8, C2bf, p2, stride2, b, sq, (blk - nb1) * BI,
                         valid_s, base_s, sbase_s, scale_s, KV_s)  # fmt: skip
            for i, bi in T.Parallel(HB, BI):
                acc_s[i, bi] = T.if_then_else(valid_s[bi] != 0, 0, -T.infinity(f32))
            T.gemm(Q_s, KV_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            T.copy(m_i, m_prev)
            T.reduce_max(acc_s, m_i, dim=1, clear=False)
            for i in T.Parallel(HB):
                m_i[i] = T.max(m_i[i], m_prev[i])
                alpha[i] = T.exp2((m_prev[i] - m_i[i]) * sl2)
            for i, bi in T.Parallel(HB, BI):
                acc_s[i, bi] = T.exp2(acc_s[i, bi] * sl2 - m_i[i] * sl2)
            T.reduce_sum(acc_s, sumexp_i, dim=1)
            for i in T.Parallel(HB):
                sumexp[i] = sumexp[i] * alpha[i] + sumexp_i[i]
            for i, dd in T.Parallel(HB, D):
                acc_o[i, dd] = acc_o[i, dd] * alpha[i]
            T.copy(acc_s, S_s)
            T.gemm(S_s, KV_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

    if split:

        @T.prim_func
        def attend_partial(
            Q: T.Tensor[(B, SQ, h, D), bf16],
            Idx1: T.Tensor[(B, SQ, K1), i32],
            Len1: T.Tensor[(B,), i32],
            C1u8: T.Tensor[(N1,), T.uint8],
            C1f8: T.Tensor[(N1,), fp8],
            C1bf: T.Tensor[(N1h,), bf16],
            Idx2: T.Tensor[(B, SQ, K2), i32],
            Len2: T.Tensor[(B,), i32],
            C2u8: T.Tensor[(N2,), T.uint8],
            C2f8: T.Tensor[(N2,), fp8],
            C2bf: T.Tensor[(N2h,), bf16],
            Opart: T.Tensor[(B, SQ, NS, h, D), f32],
            Lpart: T.Tensor[(B, SQ, NS, h), f32],
            stride1: T.int32,
            stride2: T.int32,
        ):
            with T.Kernel(NS * NHB, SQ, B, threads=THREADS) as (bx, sq, b):
                acc_o = T.alloc_fragment([HB, D], f32)
                sumexp = T.alloc_fragment([HB], f32)
                m_i = T.alloc_fragment([HB], f32)
                h0 = (bx % NHB) * HB
                sp = bx // NHB
                attend_rows(Q, Idx1, Len1, C1u8, C1f8, C1bf, Idx2, Len2, C2u8, C2f8, C2bf, stride1, stride2,
                            b, sq, h0, sp, NS, acc_o, sumexp, m_i)  # fmt: skip
                for i, dd in T.Parallel(HB, D):
                    if h0 + i < h:
                        Opart[b, sq, sp, h0 + i, dd] = T.if_then_else(sumexp[i] > 0, acc_o[i, dd] / sumexp[i], 0.0)
                for i in T.Parallel(HB):
                    if h0 + i < h:
                        Lpart[b, sq, sp, h0 + i] = T.if_then_else(
                            sumexp[i] > 0, T.log2(sumexp[i]) + m_i[i] * sl2, -T.infinity(f32)
                        )

        return attend_partial

    @T.prim_func
    def attend_direct(
        Q: T.Tensor[(B, SQ, h, D), bf16],
        Idx1: T.Tensor[(B, SQ, K1), i32],
        Len1: T.Tensor[(B,), i32],
        C1u8: T.Tensor[(N1,), T.uint8],
        C1f8: T.Tensor[(N1,), fp8],
        C1bf: T.Tensor[(N1h,), bf16],
        Idx2: T.Tensor[(B, SQ, K2), i32],
        Len2: T.Tensor[(B,), i32],
        C2u8: T.Tensor[(N2,), T.uint8],
        C2f8: T.Tensor[(N2,), fp8],
        C2bf: T.Tensor[(N2h,), bf16],
        Sink: T.Tensor[(h,), f32],
        O: T.Tensor[(B, SQ, h, D), bf16],
        Lse: T.Tensor[(B, h, SQ), f32],
        stride1: T.int32,
        stride2: T.int32,
    ):
        with T.Kernel(NHB, SQ, B, threads=THREADS) as (bx, sq, b):
            acc_o = T.alloc_fragment([HB, D], f32)
            sumexp = T.alloc_fragment([HB], f32)
            m_i = T.alloc_fragment([HB], f32)
            factor = T.alloc_fragment([HB], f32)
            lse = T.alloc_fragment([HB], f32)
            h0 = bx * HB
            attend_rows(Q, Idx1, Len1, C1u8, C1f8, C1bf, Idx2, Len2, C2u8, C2f8, C2bf, stride1, stride2,
                        b, sq, h0, 0, 1, acc_o, sumexp, m_i)  # fmt: skip
            for i in T.Parallel(HB):
                lse[i] = (T.log2(sumexp[i]) + m_i[i] * sl2) * LN2
                factor[i] = T.if_then_else(
                    sumexp[i] > 0,
                    1.0 / (sumexp[i] * (1.0 + T.exp(Sink[T.min(h0 + i, h - 1)] - lse[i]))),
                    0.0,
                )
            for i, dd in T.Parallel(HB, D):
                if h0 + i < h:
                    O[b, sq, h0 + i, dd] = T.cast(acc_o[i, dd] * factor[i], bf16)
            for i in T.Parallel(HB):
                if h0 + i < h:
                    Lse[b, h0 + i, sq] = T.if_then_else(sumexp[i] > 0, lse[i], T.infinity(f32))

    return attend_direct


def build_combine(h: int, d: int):
    """Merge split partials: o = sum_s 2^(L_s - L) o_s, L = log2 sum_s 2^L_s; sink; empty -> 0 / +inf."""
    B = T.dynamic("batch")
    SQ = T.dynamic("s_q")
    NS = T.dynamic("splits")
    f32, bf16 = T.float32, T.bfloat16

    @T.prim_func
    def attend_combine(
        Opart: T.Tensor[(B, SQ, NS, h, d), f32],
        Lpart: T.Tensor[(B, SQ, NS, h), f32],
        Sink: T.Tensor[(h,), f32],
        O: T.Tensor[(B, SQ, h, d), bf16],
        Lse: T.Tensor[(B, h, SQ), f32],
    ):
        with T.Kernel(h, SQ, B, threads=128) as (hh, sq, b):
            acc = T.alloc_fragment([d], f32)
            lmax = T.alloc_var(f32)
            tot = T.alloc_var(f32)
            lse2 = T.alloc_var(f32)
            fac = T.alloc_var(f32)
            lmax = -T.infinity(f32)
            for s in T.serial(NS):
                lmax = T.max(lmax, Lpart[b, sq, s, hh])
            tot = 0.0
            for s in T.serial(NS):
                tot = tot + T.if_then_else(
                    Lpart[b, sq, s, hh] == -T.infinity(f32), 0.0, T.exp2(Lpart[b, sq, s, hh] - lmax)
                )
            lse2 = T.log2(tot) + lmax
            T.fill(acc, 0)
            for s in T.serial(NS):
                for dd in T.Parallel(d):
                    acc[dd] += T.if_then_else(
                        Lpart[b, sq, s, hh] == -T.infinity(f32),
                        0.0,
                        T.exp2(Lpart[b, sq, s, hh] - lse2) * Opart[b, sq, s, hh, dd],
                    )
            fac = T.if_then_else(tot > 0, 1.0 / (1.0 + T.exp(Sink[hh] - lse2 * LN2)), 0.0)
            for dd in T.Parallel(d):
                O[b, sq, hh, dd] = T.cast(acc[dd] * fac, bf16)
            Lse[b, hh, sq] = T.if_then_else(tot > 0, lse2 * LN2, T.infinity(f32))

    return attend_combine


def choose_splits(b: int, s_q: int, h: int, k1: int, k2: int) -> int:
    """KV splits per row: fill ~one wave of SMs when the batch alone cannot (host-only arithmetic)."""
    programs = b * s_q * ((h + _head_block(h) - 1) // _head_block(h))
    blocks = math.ceil(k1 / BLOCK_I) + math.ceil(k2 / BLOCK_I)
    if programs >= NUM_SMS_TARGET // 2 or blocks <= 1:
        return 1
    return max(1, min(blocks, math.ceil(NUM_SMS_TARGET / programs), 16))


def _check_geometry(cache: PagedKVCache) -> None:
    if cache.rope_dim != 64 or cache.nope_dim % 64 != 0 or cache.tile != 64 or cache.nope_dim < 64:
        raise ValueError(
            f"cache: the TileLang attention kernel needs nope_dim a multiple of 64, rope_dim 64 and tile 64 "
            f"(got nope {cache.nope_dim}, rope {cache.rope_dim}, tile {cache.tile}); use backend 'torch' or 'triton'"
        )
    if cache.data.stride(0) % 2 != 0 or cache.data.stride(0) >= 2**31:
        raise ValueError(f"cache.data: page stride {cache.data.stride(0)} must be even and < 2^31 bytes")


@torch.library.custom_op("dsv4fn::tl_sparse_attention", mutates_args=())
def tl_sparse_attention(
    q: Tensor,
    data1: Tensor,
    indices1: Tensor,
    lens1: Tensor,
    data2: Tensor,
    indices2: Tensor,
    lens2: Tensor,
    sink: Tensor,
    page_size1: int,
    page_size2: int,
    nope_dim: int,
    rope_dim: int,
    tile: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Flat op: q bf16 [b, s_q, h, d]; caches as raw uint8 pages; lens int32 [b] (always given);
    sink fp32 [h] (-inf = no sink). Returns (o bf16 [b, s_q, h, d], lse fp32 [b, h, s_q])."""
    b, s_q, h, d = q.shape
    splits = choose_splits(b, s_q, h, indices1.shape[-1], indices2.shape[-1])
    main, comb = _kernels(h, nope_dim, rope_dim, tile, page_size1, page_size2, float(scale), splits > 1)
    u1, f1, h1, st1 = _cache_views_raw(data1)
    u2, f2, h2, st2 = _cache_views_raw(data2)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if comb is None:
        launch(main, q, indices1, lens1, u1, f1, h1, indices2, lens2, u2, f2, h2, sink, o, lse, st1, st2)
    else:
        opart = torch.empty((b, s_q, splits, h, d), dtype=torch.float32, device=q.device)
        lpart = torch.empty((b, s_q, splits, h), dtype=torch.float32, device=q.device)
        launch(main, q, indices1, lens1, u1, f1, h1, indices2, lens2, u2, f2, h2, opart, lpart, st1, st2)
        launch(comb, opart, lpart, sink, o, lse)
    return o, lse


@tl_sparse_attention.register_fake
def _(q, data1, indices1, lens1, data2, indices2, lens2, sink, page_size1, page_size2, nope_dim, rope_dim, tile, scale):
    b, s_q, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s_q), dtype=torch.float32)


def _cache_views_raw(data: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    stride = data.stride(0)
    nbytes = (data.shape[0] - 1) * stride + data.shape[1]
    nbytes -= nbytes % 2
    flat = data.as_strided((nbytes,), (1,))
    return flat, flat.view(torch.float8_e4m3fn), flat.view(torch.bfloat16), stride


def _full_lens(indices: Tensor, lens: Tensor | None) -> Tensor:
    if lens is not None:
        return lens
    return torch.full((indices.shape[0],), indices.shape[-1], dtype=torch.int32, device=indices.device)


@_backend.register("attend", "tilelang")
def sparse_attention(
    q: Tensor,
    cache: PagedKVCache,
    indices: Tensor,
    lens: Tensor | None = None,
    *,
    extra_cache: PagedKVCache | None = None,
    extra_indices: Tensor | None = None,
    extra_lens: Tensor | None = None,
    sink: Tensor | None = None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.sparse_attention` (CUDA tensors, d = 64·k + 64)."""
    _check_geometry(cache)
    if q.shape[-1] != cache.head_dim:
        raise ValueError(f"q: head dim {q.shape[-1]} != cache head dim {cache.head_dim}")
    if not q.is_contiguous():
        q = q.contiguous()
    if extra_cache is not None and extra_indices is not None:
        _check_geometry(extra_cache)
        if extra_cache.head_dim != cache.head_dim:
            raise ValueError(f"extra_cache: head dim {extra_cache.head_dim} != {cache.head_dim}")
        data2, idx2, p2 = extra_cache.data, extra_indices.contiguous(), extra_cache.page_size
        lens2 = _full_lens(idx2, extra_lens)
    else:  # no extra list: point it at the main cache with length 0
        data2, idx2, p2 = cache.data, indices, cache.page_size
        lens2 = torch.zeros((q.shape[0],), dtype=torch.int32, device=q.device)
    if sink is None:
        sink = torch.full((q.shape[2],), float("-inf"), dtype=torch.float32, device=q.device)
    return tl_sparse_attention(
        q,
        cache.data,
        indices.contiguous(),
        _full_lens(indices, lens),
        data2,
        idx2,
        lens2,
        sink.contiguous(),
        cache.page_size,
        p2,
        cache.nope_dim,
        cache.rope_dim,
        cache.tile,
        float(scale),
    )
