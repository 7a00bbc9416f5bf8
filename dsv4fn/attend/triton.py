# pyright: reportPossiblyUnboundVariable=false
# (constexpr-guarded branches in @triton.jit kernels: names bound under one constexpr value only)
"""Triton sparse attention over MODEL1 FP8 paged caches (FlashMLA's DSV4 sparse-decode semantics).

One launch of `_sparse_attn_fwd` walks the main and the extra index lists as one concatenated key
list, in tiles of `BLOCK_N` keys that never straddle the two lists. Each key's FP8 bytes, UE8M0 scale
bytes and bf16 rope values are read straight from the cache pages and dequantized exactly in registers
(e4m3 -> fp32 conversion times 2^(byte-127)); QK^T and PV run on tensor cores with bf16 operands and an
fp32 online softmax (base 2). A program owns one query row, one block of `BLOCK_H` heads (tail masked)
and one chunk (split) of the key tiles.

* `num_splits == 1`: the program finishes the row itself (sink, +inf for an empty row) and writes
  o bf16 / lse fp32.
* `num_splits > 1`: it writes a normalized fp32 partial output and a base-2 partial LSE; the
  `_sparse_attn_combine` kernel merges the splits. The number of splits is picked from the batch
  size, head blocks and SM count so that small batches fill the GPU.

CUDA-graph contract: no host synchronisation, and every workspace size follows from shapes alone.
Keys outside a row's list (index -1 or column >= its length) are masked before any arithmetic, so NaN/inf
bytes in unselected slots never reach the output; a NaN in a selected key does.

The op is `dsv4fn::sparse_attn` (flat arguments); `sparse_attention_triton` adapts it to the reference
signature and registers itself as the "triton" backend of the "attend" step.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._triton_common import call_op, cdiv, interpreting, next_pow2, sm_count, triton_op
from ..state import PagedKVCache

# launch knobs of the adapter (bench/attend_dev.py sweeps them); read at call time. The defaults are the
# fastest measured on the H100 (bench/results/h100/attend_triton_dev.txt): prefetch and the bf16 dequant
# spill registers and lose at every batch
ATTN_CONFIG: dict[str, int] = {"block_n": 64, "num_warps": 8, "prefetch": 0, "deq_bf16": 0}

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_src(
    t, n1, row, kv1_ptr, stride_kv1, idx1_ptr, K1, lim1, page1, kv2_ptr, stride_kv2, idx2_ptr, K2, lim2, page2,
    t_end, BLOCK_N: tl.constexpr, HAS_EXTRA: tl.constexpr,
):  # fmt: skip
    """Where key tile `t` of the concatenated list lives: (cache, page stride, index row, usable length,
    first column, page size). Tiles at or past `t_end` get length 0 (nothing is loaded)."""
    if HAS_EXTRA:
        is1 = t < n1
        kv_ptr = tl.where(is1, kv1_ptr, kv2_ptr)
        stride_kv = tl.where(is1, stride_kv1, stride_kv2)
        idx_row = tl.where(is1, idx1_ptr + row.to(tl.int64) * K1, idx2_ptr + row.to(tl.int64) * K2)
        lim = tl.where(is1, lim1, lim2)
        j0 = tl.where(is1, t, t - n1) * BLOCK_N
        page = tl.where(is1, page1, page2)
    else:
        kv_ptr = kv1_ptr
        stride_kv = stride_kv1
        idx_row = idx1_ptr + row.to(tl.int64) * K1
        lim = lim1
        j0 = t * BLOCK_N
        page = page1
    lim = tl.where(t < t_end, lim, 0)
    return kv_ptr, stride_kv, idx_row, lim, j0, page


@triton.jit
def _load_idx(idx_row_ptr, lim, j0, BLOCK_N: tl.constexpr):
    jj = j0 + tl.arange(0, BLOCK_N)
    return tl.load(idx_row_ptr + jj, mask=jj < lim, other=-1)


@triton.jit
def _load_raw(
    kv_ptr,
    stride_page,
    page_size,
    idx,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    TILE: tl.constexpr,
    NT: tl.constexpr,
    NT_P: tl.constexpr,
    REC: tl.constexpr,
    SB: tl.constexpr,
):
    """Raw bytes of the keys at slots `idx` (-1 = none): e4m3 codes `[n, NT_P, TILE]` (0 outside the
    nope tiles), scale bytes `[n, NT_P]` (127 = 1.0 outside), rope bf16 `[n, NT_P, TILE]` (0 outside)."""
    valid = idx >= 0
    slot = tl.where(valid, idx, 0)
    page = slot // page_size
    off = slot - page * page_size
    page_base = page.to(tl.int64) * stride_page
    rec = page_base + off * REC  # byte offset of each key's data record
    sc = page_base + page_size * REC + off * SB  # byte offset of its scale record
    tt = tl.arange(0, NT_P)
    cc = tl.arange(0, TILE)
    col = tt[:, None] * TILE + cc[None, :]  # [NT_P, TILE] column within the head dim
    is_nope = (tt < NT)[:, None] & (cc >= 0)[None, :]
    is_rope = (col >= NOPE) & (col < NOPE + ROPE)
    v3 = valid[:, None, None]
    raw = tl.load(kv_ptr + rec[:, None, None] + col[None, :, :], mask=v3 & is_nope[None, :, :], other=0)
    sbyte = tl.load(kv_ptr + sc[:, None] + tt[None, :], mask=valid[:, None] & (tt < NT)[None, :], other=127)
    kv_bf16 = kv_ptr.to(tl.pointer_type(tl.bfloat16))
    rope_ptr = kv_bf16 + (rec[:, None, None] + NOPE) // 2 + (col[None, :, :] - NOPE)
    rope = tl.load(rope_ptr, mask=v3 & is_rope[None, :, :], other=0.0)
    return raw, sbyte, rope, valid


@triton.jit
def _dequant(
    raw,
    sbyte,
    rope,
    NT: tl.constexpr,
    NT_P: tl.constexpr,
    TILE: tl.constexpr,
    DEQ_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Exact dequantization: e4m3 -> fp32 times 2^(byte-127) on the nope tiles, rope as is. Returns
    `[n, NT_P * TILE]` bf16 on GPU (exact: e4m3 times a power of two fits bf16), fp32 in the interpreter.
    `DEQ_BF16` (GPU only) converts e4m3 -> bf16 with Triton's native conversion (exact: every e4m3 value,
    subnormals included, is a bf16) and multiplies by the power-of-two scale in bf16 (exact)."""
    sbits = sbyte.to(tl.int32)
    scale = (sbits << 23).to(tl.float32, bitcast=True)  # 2^(byte-127), exact for bytes 1..254
    scale = tl.where(sbits == 0, 5.877471754111438e-39, scale)  # byte 0: 2^-127 (subnormal)
    is_nope = (tl.arange(0, NT_P) < NT)[None, :, None]
    if DEQ_BF16 and not INTERPRET:
        nope = raw.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        k3 = tl.where(is_nope, nope * scale.to(tl.bfloat16)[:, :, None], rope)
        k = tl.reshape(k3, (raw.shape[0], NT_P * TILE))
    else:
        nope = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if INTERPRET:  # the interpreter decodes the e4m3fn NaN codes 0x7f/0xff as +-480
            nope = tl.where((raw & 0x7F) == 0x7F, float("nan"), nope)
        k3 = tl.where(is_nope, nope * scale[:, :, None], rope.to(tl.float32))
        k = tl.reshape(k3, (raw.shape[0], NT_P * TILE))
        if not INTERPRET:
            k = k.to(tl.bfloat16)
    return k


@triton.jit
def _sparse_attn_fwd(
    q_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    kv1_ptr,
    stride_kv1,
    idx1_ptr,
    len1_ptr,
    K1,
    page1,
    kv2_ptr,
    stride_kv2,
    idx2_ptr,
    len2_ptr,
    K2,
    page2,
    sink_ptr,
    o_ptr,
    lse_ptr,
    H,
    S_Q,
    scale_log2,
    num_splits,
    tiles_per_split,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    TILE: tl.constexpr,
    NT: tl.constexpr,
    NT_P: tl.constexpr,
    REC: tl.constexpr,
    SB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEN1: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_LEN2: tl.constexpr,
    HAS_SINK: tl.constexpr,
    SINGLE: tl.constexpr,
    PREFETCH: tl.constexpr,
    DEQ_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    D: tl.constexpr = NOPE + ROPE
    DP: tl.constexpr = NT_P * TILE
    pid = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    rest = pid // n_hb
    split = rest % num_splits
    row = rest // num_splits
    bi = row // S_Q
    si = row - bi * S_Q

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cols = tl.arange(0, DP)
    cmask = cols < D
    q_off = bi.to(tl.int64) * stride_qb + si * stride_qs + heads[:, None] * stride_qh + cols[None, :]
    q = tl.load(q_ptr + q_off, mask=hmask[:, None] & cmask[None, :], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    lim1 = K1
    if HAS_LEN1:
        lim1 = tl.minimum(K1, tl.load(len1_ptr + bi))
    n1 = tl.cdiv(K1, BLOCK_N)
    total = n1
    lim2 = K2
    if HAS_EXTRA:
        if HAS_LEN2:
            lim2 = tl.minimum(K2, tl.load(len2_ptr + bi))
        total = n1 + tl.cdiv(K2, BLOCK_N)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(total, t_begin + tiles_per_split)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DP], tl.float32)
    if PREFETCH:
        # software pipeline: data of tile t+1 and indices of tile t+2 are in flight while tile t computes
        kvp, stp, irow, lim, j0, pg = _tile_src(
            t_begin, n1, row, kv1_ptr, stride_kv1, idx1_ptr, K1, lim1, page1, kv2_ptr, stride_kv2, idx2_ptr, K2,
            lim2, page2, t_end, BLOCK_N, HAS_EXTRA,
        )  # fmt: skip
        idx_c = _load_idx(irow, lim, j0, BLOCK_N)
        raw, sbyte, rope, valid = _load_raw(kvp, stp, pg, idx_c, NOPE, ROPE, TILE, NT, NT_P, REC, SB)
        kvp, stp, irow, lim, j0, pg = _tile_src(
            t_begin + 1, n1, row, kv1_ptr, stride_kv1, idx1_ptr, K1, lim1, page1, kv2_ptr, stride_kv2, idx2_ptr,
            K2, lim2, page2, t_end, BLOCK_N, HAS_EXTRA,
        )  # fmt: skip
        idx_n = _load_idx(irow, lim, j0, BLOCK_N)
    for t in range(t_begin, t_end):
        if PREFETCH:
            k = _dequant(raw, sbyte, rope, NT, NT_P, TILE, DEQ_BF16, INTERPRET)
            vcur = valid
            kvp, stp, irow, lim, j0, pg = _tile_src(
                t + 1, n1, row, kv1_ptr, stride_kv1, idx1_ptr, K1, lim1, page1, kv2_ptr, stride_kv2, idx2_ptr,
                K2, lim2, page2, t_end, BLOCK_N, HAS_EXTRA,
            )  # fmt: skip
            raw, sbyte, rope, valid = _load_raw(kvp, stp, pg, idx_n, NOPE, ROPE, TILE, NT, NT_P, REC, SB)
            kvp, stp, irow, lim, j0, pg = _tile_src(
                t + 2, n1, row, kv1_ptr, stride_kv1, idx1_ptr, K1, lim1, page1, kv2_ptr, stride_kv2, idx2_ptr,
                K2, lim2, page2, t_end, BLOCK_N, HAS_EXTRA,
            )  # fmt: skip
            idx_n = _load_idx(irow, lim, j0, BLOCK_N)
        else:
            kvp, stp, irow, lim, j0, pg = _tile_src(
                t, n1, row, kv1_ptr, stride_kv1, idx1_ptr, K1, lim1, page1, kv2_ptr, stride_kv2, idx2_ptr, K2,
                lim2, page2, t_end, BLOCK_N, HAS_EXTRA,
            )  # fmt: skip
            idx_c = _load_idx(irow, lim, j0, BLOCK_N)
            raw_c, sbyte_c, rope_c, vcur = _load_raw(kvp, stp, pg, idx_c, NOPE, ROPE, TILE, NT, NT_P, REC, SB)
            k = _dequant(raw_c, sbyte_c, rope_c, NT, NT_P, TILE, DEQ_BF16, INTERPRET)
        s = tl.dot(q, tl.trans(k)) * tl.cast(scale_log2, tl.float32)
        s = tl.where(vcur[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m_i = m_new

    o = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_i[:, None])
    lse2 = m_i + tl.log2(l_i)  # -inf for no keys
    omask = hmask[:, None] & cmask[None, :]
    if SINGLE:
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
            o = o / (1.0 + tl.exp2(sink * 1.4426950408889634 - lse2))[:, None]
        lse = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 0.6931471805599453)
        o_off = (row.to(tl.int64) * H + heads[:, None]) * D + cols[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=omask)
        tl.store(lse_ptr + (bi.to(tl.int64) * H + heads) * S_Q + si, lse, mask=hmask)
    else:
        part = row.to(tl.int64) * num_splits + split
        o_off = (part * H + heads[:, None]) * D + cols[None, :]
        tl.store(o_ptr + o_off, o, mask=omask)
        tl.store(lse_ptr + part * H + heads, lse2, mask=hmask)


@triton.jit
def _sparse_attn_combine(
    o_part_ptr,
    lse_part_ptr,
    sink_ptr,
    o_ptr,
    lse_ptr,
    H,
    S_Q,
    num_splits,
    D: tl.constexpr,
    DP: tl.constexpr,
    SPLITS_P: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_SINK: tl.constexpr,
):
    """Program (row, head): merge the split partials. The LSEs come in one vector; the fp32 partial
    outputs stream in CHUNK splits at a time (a [splits, d] tile would not fit in registers at 100+
    splits)."""
    pid = tl.program_id(0)
    head = pid % H
    row = pid // H
    bi = row // S_Q
    si = row - bi * S_Q
    sp = tl.arange(0, SPLITS_P)
    part0 = row.to(tl.int64) * num_splits
    lse_s = tl.load(lse_part_ptr + (part0 + sp) * H + head, mask=sp < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.sum(tl.exp2(lse_s - m_use), 0)  # 0 for empty splits and padding
    cols = tl.arange(0, DP)
    cmask = cols < D
    o = tl.zeros([DP], tl.float32)
    for c in range(0, num_splits, CHUNK):
        spc = c + tl.arange(0, CHUNK)
        smask = spc < num_splits
        w = tl.exp2(tl.load(lse_part_ptr + (part0 + spc) * H + head, mask=smask, other=float("-inf")) - m_use)
        o_s = tl.load(
            o_part_ptr + ((part0 + spc)[:, None] * H + head) * D + cols[None, :],
            mask=smask[:, None] & cmask[None, :],
            other=0.0,
        )
        o += tl.sum(o_s * w[:, None], 0)
    o = tl.where(tot == 0.0, 0.0, o / tot)
    lse2 = m_use + tl.log2(tot)
    if HAS_SINK:
        sink = tl.load(sink_ptr + head)
        o = o / (1.0 + tl.exp2(sink * 1.4426950408889634 - lse2))
    lse = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 0.6931471805599453)
    tl.store(o_ptr + (row.to(tl.int64) * H + head) * D + cols, o.to(o_ptr.dtype.element_ty), mask=cmask)
    tl.store(lse_ptr + (bi.to(tl.int64) * H + head) * S_Q + si, lse)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def _block_h(h: int) -> int:
    return min(64, max(16, next_pow2(h)))


def default_num_splits(rows: int, h: int, k_total_tiles: int, device: torch.device) -> int:
    """Splits of the key tiles per (row, head block): enough programs to fill the SMs once, from
    shapes only (CUDA-graph safe). Large batches run single-pass (no partial round trip)."""
    if k_total_tiles <= 1:
        return 1
    sms = sm_count(device) or 8
    # one program per SM at these tile sizes (~130 KB shared memory): more splits than fit in one wave
    # cost a second wave (measured on the H100: b=32 with 4 splits 37 us, with 5 splits 49 us)
    programs = rows * cdiv(h, _block_h(h))
    # long lists (a 1M-token HCA row has 130 tiles): at least 4 tiles a split beyond 16 splits, so the
    # fp32 partials (h x d x 4 bytes a split, 128 KB at h=64) stay below the ~37 KB x tiles of cache read
    return max(1, min(k_total_tiles, sms // programs, max(16, k_total_tiles // 4)))


def _geometry(nope: int, rope: int, tile: int) -> tuple[int, int, int, int, int]:
    """(NT, NT_P, REC, SB, head-dim span NT_P * TILE) of the MODEL1 record; raises for layouts the
    kernel's power-of-two tiling cannot hold."""
    if tile <= 0 or tile & (tile - 1) or nope % tile:
        raise ValueError(f"cache: tile {tile} must be a power of two dividing nope_dim {nope}")
    if rope <= 0 or rope % 2:
        raise ValueError(f"cache: rope_dim {rope} must be positive and even")
    nt = nope // tile
    nt_p = next_pow2(nt + cdiv(rope, tile))
    if nt_p * tile < nope + rope or nt_p * tile - (nope + rope) >= tile:
        raise ValueError(f"cache: nope {nope} + rope {rope} does not tile by {tile}")
    rec = nope + 2 * rope
    sb = (nt + 1 + 7) // 8 * 8
    return nt, nt_p, rec, sb, nt_p * tile


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


@triton_op("dsv4fn::sparse_attn", mutates_args=())
def sparse_attn(
    q: Tensor,
    kv1: Tensor,
    idx1: Tensor,
    len1: Tensor | None,
    kv2: Tensor | None,
    idx2: Tensor | None,
    len2: Tensor | None,
    sink: Tensor | None,
    scale: float,
    page1: int,
    page2: int,
    nope_dim: int,
    rope_dim: int,
    tile: int,
    num_splits: int,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 1,
    block_h: int = 0,
    prefetch: bool = False,
    deq_bf16: bool = False,
) -> tuple[Tensor, Tensor]:
    """q bf16 `[b, s_q, h, d]`; kv1/kv2 uint8 `[pages, page_bytes]` (MODEL1 pages); idx1/idx2 int32
    `[b, s_q, k]` contiguous; len1/len2 int32 `[b]`; sink fp32 `[h]`. Returns (o bf16 `[b, s_q, h, d]`,
    lse fp32 `[b, h, s_q]` natural log). `num_splits` splits of the key tiles (1 = single pass)."""
    b, s_q, h, d = q.shape
    nt, nt_p, rec, sb, _ = _geometry(nope_dim, rope_dim, tile)
    rows = b * s_q
    k1 = idx1.shape[-1]
    has_extra = kv2 is not None and idx2 is not None
    k2 = idx2.shape[-1] if has_extra and idx2 is not None else 0
    total_tiles = cdiv(k1, block_n) + cdiv(k2, block_n)
    splits = max(1, min(int(num_splits), max(total_tiles, 1)))
    tps = max(1, cdiv(total_tiles, splits))
    splits = max(1, cdiv(total_tiles, tps))
    block_h = block_h if block_h > 0 else _block_h(h)
    interp = interpreting()

    o = torch.empty((b, s_q, h, d), dtype=torch.bfloat16, device=q.device)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if rows == 0 or h == 0:
        return o, lse
    dummy = idx1
    kv2_t = kv2 if has_extra and kv2 is not None else kv1
    idx2_t = idx2 if has_extra and idx2 is not None else dummy
    if splits == 1:
        o_dst, lse_dst = o, lse
    else:
        o_dst = torch.empty((rows, splits, h, d), dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((rows, splits, h), dtype=torch.float32, device=q.device)
    grid = (rows * splits * cdiv(h, block_h),)
    torch.library.wrap_triton(_sparse_attn_fwd)[grid](
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kv1,
        kv1.stride(0),
        idx1,
        len1 if len1 is not None else dummy,
        k1,
        page1,
        kv2_t,
        kv2_t.stride(0),
        idx2_t,
        len2 if len2 is not None else dummy,
        k2,
        page2,
        sink if sink is not None else q,
        o_dst,
        lse_dst,
        h,
        s_q,
        scale * _LOG2E,
        splits,
        tps,
        NOPE=nope_dim,
        ROPE=rope_dim,
        TILE=tile,
        NT=nt,
        NT_P=nt_p,
        REC=rec,
        SB=sb,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        HAS_LEN1=len1 is not None,
        HAS_EXTRA=has_extra,
        HAS_LEN2=has_extra and len2 is not None,
        HAS_SINK=sink is not None and splits == 1,
        SINGLE=splits == 1,
        PREFETCH=prefetch,
        DEQ_BF16=deq_bf16,
        INTERPRET=interp,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        torch.library.wrap_triton(_sparse_attn_combine)[(rows * h,)](
            o_dst,
            lse_dst,
            sink if sink is not None else q,
            o,
            lse,
            h,
            s_q,
            splits,
            D=d,
            DP=next_pow2(d),
            SPLITS_P=max(2, next_pow2(splits)),
            CHUNK=4,
            HAS_SINK=sink is not None,
            num_warps=4,
        )
    return o, lse


# ---------------------------------------------------------------------------------------------
# Adapter with the reference's signature
# ---------------------------------------------------------------------------------------------


def _check_geometry(name: str, cache: PagedKVCache, d: int) -> None:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"{name}: expected a PagedKVCache, got {type(cache).__name__}")
    if cache.data.dtype != torch.uint8 or cache.data.dim() != 2 or cache.data.stride(1) != 1:
        raise ValueError(f"{name}.data: expected uint8 [pages, page_bytes] with unit last stride")
    if cache.head_dim != d:
        raise ValueError(f"{name}: head dim {cache.head_dim} != q head dim {d}")
    if cache.data.stride(0) % 8 or (cache.page_size * cache.record_bytes) % 8:
        raise ValueError(f"{name}.data: page stride {cache.data.stride(0)} must be a multiple of 8 bytes")
    _geometry(cache.nope_dim, cache.rope_dim, cache.tile)


def _index_arg(name: str, t: Tensor, b: int, s_q: int) -> Tensor:
    if t.dtype != torch.int32 or t.dim() != 3 or t.shape[0] != b or t.shape[1] != s_q:
        raise ValueError(f"{name}: expected int32 [b={b}, s_q={s_q}, k], got {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


def _lens_arg(name: str, t: Tensor | None, b: int) -> Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.int32 or t.shape != (b,):
        raise ValueError(f"{name}: expected int32 [b={b}], got {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


@_backend.register("attend", "triton")
def sparse_attention_triton(
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
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`sparse_attention` (the reference) on the Triton kernels; same arguments and outputs.
    `num_splits` overrides the split-KV heuristic (1 = single pass)."""
    if q.dtype != torch.bfloat16 or q.dim() != 4 or q.stride(-1) != 1:
        raise ValueError(f"q: expected bf16 [b, s_q, h, d] with unit last stride, got {q.dtype} {tuple(q.shape)}")
    b, s_q, h, d = q.shape
    _check_geometry("cache", cache, d)
    indices = _index_arg("indices", indices, b, s_q)
    lens = _lens_arg("lens", lens, b)
    if (extra_cache is None) != (extra_indices is None):
        raise ValueError("extra_cache and extra_indices go together")
    if extra_cache is not None and extra_indices is not None:
        _check_geometry("extra_cache", extra_cache, d)
        if (extra_cache.nope_dim, extra_cache.rope_dim, extra_cache.tile) != (
            cache.nope_dim,
            cache.rope_dim,
            cache.tile,
        ):
            raise ValueError("extra_cache: nope/rope/tile geometry differs from cache")
        extra_indices = _index_arg("extra_indices", extra_indices, b, s_q)
        extra_lens = _lens_arg("extra_lens", extra_lens, b)
        kv2, page2 = extra_cache.data, extra_cache.page_size
        k2 = extra_indices.shape[-1]
    else:
        if extra_lens is not None:
            raise ValueError("extra_lens given without extra_cache")
        kv2, page2, k2 = None, 1, 0
    if sink is not None and (sink.dtype != torch.float32 or sink.shape != (h,)):
        raise ValueError(f"sink: expected fp32 [h={h}], got {sink.dtype} {tuple(sink.shape)}")
    cfg = ATTN_CONFIG
    block_n = cfg["block_n"]
    if num_splits is None:
        tiles = cdiv(indices.shape[-1], block_n) + cdiv(k2, block_n)
        num_splits = default_num_splits(b * s_q, h, tiles, q.device)
    return call_op(
        sparse_attn,
        q,
        cache.data,
        indices,
        lens,
        kv2,
        extra_indices,
        extra_lens,
        sink,
        float(scale),
        cache.page_size,
        page2,
        cache.nope_dim,
        cache.rope_dim,
        cache.tile,
        int(num_splits),
        block_n,
        cfg["num_warps"],
        1,
        0,
        bool(cfg["prefetch"]),
        bool(cfg["deq_bf16"]),
    )


__all__ = ["ATTN_CONFIG", "default_num_splits", "sparse_attention_triton", "sparse_attn"]
