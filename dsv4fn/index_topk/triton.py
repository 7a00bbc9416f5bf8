"""Triton lightning indexer: FP8 paged MQA logits and a radix top-k select.

Two ops, both CUDA-graph capturable (no host synchronisation, no value-dependent allocation; the
grids depend only on shapes and static sizes):

* `dsv4fn::indexer_paged_logits` — one program per (token, chunk of `rows × iters` logical entries).
  Per tile of `rows` entries each row finds its page through the page table, loads its `di` e4m3 key
  bytes and fp32 scale straight from DeepGEMM's paged layout, computes `[rows × di] · [di × hi]` with
  an fp8 `tl.dot` (fp32 accumulator), then relu, the per-head weights, a sum over heads and the key
  scale. Columns `>= visible[t]` (all of them up to `width`, also on pages the token never reaches)
  are written as −inf. Precision: Hopper's fp8 MMA keeps ~14 mantissa bits while accumulating a dot
  product (DeepGEMM behaves the same; on the H100 the two agree to 2e-7 relative), ~2e-4 relative
  to the fp64 reference; `LOGITS_CONFIG["mma_fp16"] = 1` upcasts the operands to fp16 (exact) for
  ~1e-7 at ~0.75x the speed. Under the interpreter both are exact.
* `dsv4fn::indexer_topk` — one program per row. Rows with `visible <= topk` take entries
  `0..visible-1` in order. Longer rows map the fp32 logits to order-preserving uint32 keys and find
  the k-th largest key by radix select (`RADIX_BITS` bits per round, a histogram per round over the
  row, chunk by chunk); a last pass compacts every key above that threshold plus the first keys
  equal to it (lowest index first, as the reference does), translating logical entries to cache
  slots through the page table. No sort. Positions `>= min(visible, topk)` are −1.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._triton_common import call_op, cdiv, interpreting, next_pow2, sm_count, triton_op
from ..state import IndexerKeyCache

_INTERPRET = interpreting()

# tuning knobs (bench/index_dev.py sweeps them); read at call time
# rows: logical entries per tl.dot tile (power of 2 >= 16), iters: tiles per program, mma_fp16: upcast the
# e4m3 operands to fp16 for the MMA (exact products, full fp32 accumulation; Hopper's fp8 MMA accumulates
# with ~14 mantissa bits, ~2e-4 relative), imprecise_acc: Triton's max_num_imprecise_acc for the fp8 MMA
# H100, b=32 decode (bench/results/h100/index_triton_dev.txt): 119 us at 64k keys (DeepGEMM 112 us),
# 69 us at 16k keys (DeepGEMM 38 us; the 16k timings varied ~2x between configs and runs)
LOGITS_CONFIG: dict[str, int] = {
    "rows": 128,
    "iters": 8,
    "num_warps": 4,
    "num_stages": 3,
    "mma_fp16": 0,
    "imprecise_acc": 0,
}
# block: entries per chunk of a pass (0: 8192, the best measured on the H100 at 16k and 64k columns)
# split: -1 auto (rows longer than a chunk, at most 64 rows), 0 one program per row, 1 (row, chunk) programs
TOPK_CONFIG: dict[str, int] = {"block": 0, "radix_bits": 8, "num_warps": 16, "split": -1, "chunk": 4096}


def _pow2(n: int, floor: int) -> int:
    return max(floor, next_pow2(max(int(n), 1)))


# ---------------------------------------------------------------------------------------------
# Paged FP8 MQA logits
# ---------------------------------------------------------------------------------------------


@triton.jit
def _paged_logits_kernel(
    q_ptr,  # e4m3 [t, hi, di]
    w_ptr,  # fp32 [t, hi]
    kv_ptr,  # e4m3 view of the cache bytes [n_pages, page_bytes]
    ks_ptr,  # fp32 view of the cache bytes [n_pages, page_bytes / 4]
    pt_ptr,  # int32 [b, max_blocks]
    treq_ptr,  # int32 [t]
    vis_ptr,  # int32 [t]
    out_ptr,  # fp32 [t, width]
    hi,
    di,
    width,
    max_blocks,
    PAGE: tl.constexpr,
    PAGE_BYTES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ITERS: tl.constexpr,
    MMA_FP16: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
):
    """Program (token, chunk): ITERS tiles of BLOCK_R consecutive logical entries; each row of a tile
    finds its page through the page table (a tile may span several pages)."""
    tok = tl.program_id(0)
    chunk = tl.program_id(1)
    req = tl.load(treq_ptr + tok).to(tl.int64)
    vis = tl.load(vis_ptr + tok)
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < hi
    dmask = offs_d < di
    q = tl.load(
        q_ptr + tok.to(tl.int64) * hi * di + offs_h[:, None] * di + offs_d[None, :],
        mask=hmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if MMA_FP16:
        q = q.to(tl.float16)  # e4m3 -> fp16 is exact; fp16 MMA accumulates in full fp32
    qt = tl.trans(q)  # [BLOCK_D, BLOCK_H]: k-major B operand
    w = tl.load(w_ptr + tok.to(tl.int64) * hi + offs_h, mask=hmask, other=0.0)
    out_row = out_ptr + tok.to(tl.int64) * width
    pt_row = pt_ptr + req * max_blocks
    for i in range(ITERS):
        col = (chunk * ITERS + i) * BLOCK_R + offs_r
        kmask = col < vis
        page = tl.load(pt_row + tl.minimum(col // PAGE, max_blocks - 1), mask=kmask, other=0).to(tl.int64)
        slot_off = col % PAGE
        row_addr = page * PAGE_BYTES + slot_off * di
        k = tl.load(kv_ptr + row_addr[:, None] + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        sk = tl.load(ks_ptr + (page * PAGE_BYTES + PAGE * di) // 4 + slot_off, mask=kmask, other=0.0)
        if MMA_FP16:
            dots = tl.dot(k.to(tl.float16), qt)  # [BLOCK_R, BLOCK_H] fp32
        elif IMPRECISE_ACC > 0:
            dots = tl.dot(k, qt, max_num_imprecise_acc=IMPRECISE_ACC)
        else:
            dots = tl.dot(k, qt)
        logit = tl.sum(tl.maximum(dots, 0.0) * w[None, :], axis=1) * sk
        logit = tl.where(kmask, logit, float("-inf"))
        tl.store(out_row + col, logit, mask=col < width)


def _logits_iters(t: int, width: int, rows: int, iters_max: int, device: torch.device) -> int:
    """Tiles per program: `iters_max` (fewer programs, q loaded once per chunk) unless that leaves fewer
    than two programs per SM (small batches: b=1 with 16k keys would run 16 programs); then halve it.
    From shapes only (CUDA-graph safe); at most log2(iters_max) + 1 compiled variants."""
    sms = sm_count(device) or _backend.PLAN_SMS
    tiles = cdiv(width, rows)
    iters = max(1, iters_max)
    while iters > 1 and t * cdiv(tiles, iters) < 2 * sms:
        iters //= 2
    return iters


@triton_op("dsv4fn::indexer_paged_logits", mutates_args=())
def indexer_paged_logits(
    q8: Tensor,
    weights: Tensor,
    cache_data: Tensor,
    page_table: Tensor,
    token_request: Tensor,
    visible: Tensor,
    page_size: int,
    width: int,
) -> Tensor:
    """fp32 `[t, width]` indexer logits over the paged FP8 key cache bytes `cache_data` (uint8)."""
    t, hi, di = q8.shape
    out = torch.empty((t, width), dtype=torch.float32, device=q8.device)
    if t == 0 or width == 0:
        return out
    kv = cache_data.view(torch.float8_e4m3fn)
    ks = cache_data.view(torch.float32)
    cfg = LOGITS_CONFIG
    rows = cfg["rows"]
    iters = _logits_iters(t, width, rows, cfg["iters"], q8.device)
    grid = (t, cdiv(width, rows * iters))
    torch.library.wrap_triton(_paged_logits_kernel)[grid](
        q8,
        weights,
        kv,
        ks,
        page_table,
        token_request,
        visible,
        out,
        hi,
        di,
        width,
        page_table.shape[1],
        PAGE=page_size,
        PAGE_BYTES=page_size * (di + 4),
        BLOCK_R=rows,
        BLOCK_H=_pow2(hi, 16),
        BLOCK_D=_pow2(di, 16),
        ITERS=iters,
        MMA_FP16=bool(cfg["mma_fp16"]),
        IMPRECISE_ACC=cfg["imprecise_acc"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _check_logits_args(q8: Tensor, weights: Tensor, cache: IndexerKeyCache, page_table: Tensor, width: int) -> None:
    if not isinstance(cache, IndexerKeyCache):
        raise TypeError(f"cache: expected IndexerKeyCache, got {type(cache).__name__}")
    if q8.dtype != torch.float8_e4m3fn or q8.ndim != 3 or not q8.is_contiguous():
        raise TypeError(f"q8: expected contiguous float8_e4m3fn [t, hi, di], got {q8.dtype} {tuple(q8.shape)}")
    if q8.shape[2] != cache.dim:
        raise ValueError(f"q8: head dim {q8.shape[2]} != cache.dim {cache.dim}")
    if weights.dtype != torch.float32 or tuple(weights.shape) != tuple(q8.shape[:2]) or not weights.is_contiguous():
        want = tuple(q8.shape[:2])
        raise TypeError(f"weights: expected contiguous float32 {want}, got {weights.dtype} {tuple(weights.shape)}")
    if (cache.page_size * cache.dim) % 4:
        raise ValueError(f"cache: page_size*dim = {cache.page_size * cache.dim} must be a multiple of 4 (fp32 scales)")
    if not cache.data.is_contiguous():
        raise ValueError("cache.data: must be contiguous")
    if page_table.dtype != torch.int32 or page_table.ndim != 2 or not page_table.is_contiguous():
        raise TypeError(f"page_table: expected contiguous int32 [b, max_blocks], got {page_table.dtype}")
    if width < 0:
        raise ValueError(f"width: expected >= 0, got {width}")


@_backend.register("index_logits", "triton")
def paged_logits(
    q8: Tensor,
    weights: Tensor,
    cache: IndexerKeyCache,
    page_table: Tensor,
    token_request: Tensor,
    visible: Tensor,
    width: int,
) -> Tensor:
    """Triton twin of `reference.paged_logits` (same arguments, same fp32 `[t, width]` output)."""
    _check_logits_args(q8, weights, cache, page_table, width)
    return call_op(
        indexer_paged_logits,
        q8,
        weights,
        cache.data,
        page_table,
        token_request.to(torch.int32),
        visible.to(torch.int32),
        cache.page_size,
        width,
    )


# ---------------------------------------------------------------------------------------------
# Top-k: radix select + compaction
# ---------------------------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    """fp32 -> uint32 with the same order (−inf smallest among non-NaN values)."""
    bits = x.to(tl.uint32, bitcast=True)
    neg = (bits >> 31) != 0
    return tl.where(neg, ~bits, bits | 0x80000000)


@triton.jit
def _load_keys(row_ptr, j, n):
    """Order keys of the logits at columns `j` (< n valid) of one row, and the validity mask."""
    valid = j < n
    return _order_key(tl.load(row_ptr + j, mask=valid, other=0.0)), valid


@triton.jit
def _block_hist(key, valid, prefix, HI_SHIFT: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Histogram of the digit (bits SHIFT..SHIFT+BITS) of the valid keys whose bits above HI_SHIFT equal
    `prefix` (HI_SHIFT 32: every valid key)."""
    if HI_SHIFT < 32:
        match = valid & ((key >> HI_SHIFT) == prefix)
    else:
        match = valid
    digit = tl.where(match, (key >> SHIFT) & ((1 << BITS) - 1), 0).to(tl.int32)
    # non-matching lanes are counted in bin 0: take them out again
    miss = key.shape[0] - tl.sum(match.to(tl.int32), axis=0)
    return tl.histogram(digit, 1 << BITS) - tl.where(tl.arange(0, 1 << BITS) == 0, miss, 0)


@triton.jit
def _place(key, valid, j, thr, base_gt, base_eq, topk, pt_row, out_row, PAGE: tl.constexpr):
    """Write the slots of a block's keys above `thr` from output position `base_gt` on, and of its keys
    equal to `thr` from `base_eq` on while below `topk` (index order both); returns the two counts."""
    is_gt = valid & (key > thr)
    is_eq = valid & (key == thr)
    gi = is_gt.to(tl.int32)
    ei = is_eq.to(tl.int32)
    pos_eq = base_eq + tl.cumsum(ei, axis=0) - 1
    sel = is_gt | (is_eq & (pos_eq < topk))
    pos = tl.where(is_gt, base_gt + tl.cumsum(gi, axis=0) - 1, pos_eq)
    page = tl.load(pt_row + j // PAGE, mask=sel, other=0)
    tl.store(out_row + pos, page * PAGE + j % PAGE, mask=sel)
    return tl.sum(gi, axis=0), tl.sum(ei, axis=0)


@triton.jit
def _radix_round(
    row_ptr,
    n,
    prefix,
    k_rem,
    HI_SHIFT: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One radix round: the digit (bits SHIFT..SHIFT+BITS) of the k_rem-th largest key among keys whose
    bits above HI_SHIFT equal `prefix`. Returns (prefix extended by the digit, new k_rem)."""
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros((1 << BITS,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        key, valid = _load_keys(row_ptr, start + offs, n)
        hist += _block_hist(key, valid, prefix, HI_SHIFT, SHIFT, BITS)
    return _pick_digit(hist, prefix, k_rem, BITS)


@triton.jit
def _pick_digit(hist, prefix, k_rem, BITS: tl.constexpr):
    """From a round's digit histogram: the digit of the k_rem-th largest key, appended to `prefix`,
    and k_rem minus the keys with a larger digit."""
    bins = tl.arange(0, 1 << BITS)
    total = tl.sum(hist, axis=0)
    gt = total - tl.cumsum(hist, axis=0)  # keys with digit > b
    ge = gt + hist  # keys with digit >= b (non-increasing in b)
    d = tl.sum((ge >= k_rem).to(tl.int32), axis=0) - 1
    gt_d = tl.sum(tl.where(bins == d, gt, 0), axis=0)
    new_prefix = (prefix << BITS) | d.to(tl.uint32)
    return new_prefix, k_rem - gt_d


def _radix_rounds(radix_bits: int) -> tuple[int, int, int, int]:
    """Bits per round, top first, summing to 32 (at most 4 rounds, at least 8 bits a round)."""
    if not 8 <= radix_bits <= 12:
        raise ValueError(f"radix_bits: expected 8..12, got {radix_bits}")
    rounds: list[int] = []
    left = 32
    while left > 0:
        rounds.append(min(radix_bits, left))
        left -= rounds[-1]
    return (*rounds, 0, 0)[:4]  # type: ignore[return-value]


@triton.jit
def _topk_kernel(
    logits_ptr,  # fp32 [t, n_cols]
    vis_ptr,  # int32 [t]
    pt_ptr,  # int32 [b, max_blocks]
    treq_ptr,  # int32 [t]
    out_ptr,  # int32 [t, width]
    lens_ptr,  # int32 [t]
    n_cols,
    width,
    max_blocks,
    topk,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
):
    row = tl.program_id(0)
    vis = tl.load(vis_ptr + row)
    req = tl.load(treq_ptr + row).to(tl.int64)
    lens = tl.minimum(vis, topk)
    tl.store(lens_ptr + row, lens)
    pt_row = pt_ptr + req * max_blocks
    out_row = out_ptr + row.to(tl.int64) * width
    offs = tl.arange(0, BLOCK)
    # trivial rows (vis <= topk) take entries 0..vis-1 in order; every row gets -1 from lens on.
    # (scalar-bool & tensor gives int32 under the interpreter: mix scalars in through tl.where)
    n_first = tl.where(vis <= topk, lens, 0)  # columns written as in-order entries
    first_col = tl.where(vis <= topk, 0, lens)  # first column this loop writes
    for start in range(0, width, BLOCK):
        j = start + offs
        take = j < n_first
        page = tl.load(pt_row + j // PAGE, mask=take, other=0)
        val = tl.where(take, page * PAGE + j % PAGE, -1)
        tl.store(out_row + j, val, mask=(j < width) & (j >= first_col))
    if vis > topk:
        n = tl.minimum(vis, n_cols)
        row_ptr = logits_ptr + row.to(tl.int64) * n_cols
        prefix = tl.zeros((), dtype=tl.uint32)
        k_rem = topk
        # rounds from the top bits down (B0 + B1 + B2 + B3 == 32; B2, B3 may be 0)
        prefix, k_rem = _radix_round(row_ptr, n, prefix, k_rem, 32, 32 - B0, B0, BLOCK)
        prefix, k_rem = _radix_round(row_ptr, n, prefix, k_rem, 32 - B0, 32 - B0 - B1, B1, BLOCK)
        if B2 > 0:
            prefix, k_rem = _radix_round(row_ptr, n, prefix, k_rem, B2 + B3, B3, B2, BLOCK)
        if B3 > 0:
            prefix, k_rem = _radix_round(row_ptr, n, prefix, k_rem, B3, 0, B3, BLOCK)
        thr = prefix
        # k_rem keys equal to thr are taken (lowest index first) after the topk - k_rem keys above it
        n_gt = topk - k_rem
        cnt_gt = 0
        cnt_eq = 0
        for start in range(0, n, BLOCK):
            j = start + offs
            key, valid = _load_keys(row_ptr, j, n)
            c_gt, c_eq = _place(key, valid, j, thr, cnt_gt, n_gt + cnt_eq, topk, pt_row, out_row, PAGE)
            cnt_gt += c_gt
            cnt_eq += c_eq


# ---------------------------------------------------------------------------------------------
# Top-k of long rows: the same radix select, each row cut into chunks that run as separate programs
# ---------------------------------------------------------------------------------------------
# One program per row reads its row 5 times (4 histogram rounds + the compaction): at 256k keys (a 1M-token
# context) that is ~0.9 ms whatever the batch. The split path runs every pass over (row, chunk)
# programs: round r adds each chunk's digit histogram into `hist[row, r]` (integer atomics: the sums,
# hence the threshold, are deterministic); a count pass stores each chunk's numbers of keys above and
# equal to the threshold; the write pass places each chunk's keys at the exclusive prefix sums of the
# counts of the chunks before it. Output order and content are identical to the one-program path (keys
# above the threshold in index order, then the first k_rem equal ones), so both are deterministic.


@triton.jit
def _replay_rounds(hist_row, k, NR: tl.constexpr, NB: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr,
                   B2: tl.constexpr, B3: tl.constexpr):  # fmt: skip
    """(prefix, k_rem) after the first NR rounds, from their histograms `hist_row[r * NB + digit]`."""
    prefix = tl.zeros((), dtype=tl.uint32)
    k_rem = k
    if NR > 0:
        prefix, k_rem = _pick_digit(tl.load(hist_row + tl.arange(0, 1 << B0)), prefix, k_rem, B0)
    if NR > 1:
        prefix, k_rem = _pick_digit(tl.load(hist_row + NB + tl.arange(0, 1 << B1)), prefix, k_rem, B1)
    if NR > 2 and B2 > 0:
        prefix, k_rem = _pick_digit(tl.load(hist_row + 2 * NB + tl.arange(0, 1 << B2)), prefix, k_rem, B2)
    if NR > 3 and B3 > 0:
        prefix, k_rem = _pick_digit(tl.load(hist_row + 3 * NB + tl.arange(0, 1 << B3)), prefix, k_rem, B3)
    return prefix, k_rem


@triton.jit
def _topk_split_hist_kernel(
    logits_ptr, vis_ptr, hist_ptr, n_cols, topk,
    ROUND: tl.constexpr, HI_SHIFT: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr,
    CHUNK: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    vis = tl.load(vis_ptr + row)
    n = tl.minimum(vis, n_cols)
    j0 = chunk * CHUNK
    if (vis > topk) & (j0 < n):
        hist_row = hist_ptr + row.to(tl.int64) * (4 * NB)
        prefix, _ = _replay_rounds(hist_row, topk, ROUND, NB, B0, B1, B2, B3)
        key, valid = _load_keys(logits_ptr + row.to(tl.int64) * n_cols, j0 + tl.arange(0, CHUNK), n)
        h = _block_hist(key, valid, prefix, HI_SHIFT, SHIFT, BITS)
        tl.atomic_add(hist_row + ROUND * NB + tl.arange(0, 1 << BITS), h, mask=h > 0, sem="relaxed")


@triton.jit
def _topk_split_count_kernel(
    logits_ptr, vis_ptr, hist_ptr, counts_ptr, n_cols, topk, n_chunks,
    NB: tl.constexpr, CHUNK: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    vis = tl.load(vis_ptr + row)
    n = tl.minimum(vis, n_cols)
    j0 = chunk * CHUNK
    if (vis > topk) & (j0 < n):
        thr, _ = _replay_rounds(hist_ptr + row.to(tl.int64) * (4 * NB), topk, 4, NB, B0, B1, B2, B3)
        key, valid = _load_keys(logits_ptr + row.to(tl.int64) * n_cols, j0 + tl.arange(0, CHUNK), n)
        c = counts_ptr + (row.to(tl.int64) * n_chunks + chunk) * 2
        tl.store(c, tl.sum((valid & (key > thr)).to(tl.int32), axis=0))
        tl.store(c + 1, tl.sum((valid & (key == thr)).to(tl.int32), axis=0))


@triton.jit
def _topk_split_write_kernel(
    logits_ptr, vis_ptr, hist_ptr, counts_ptr, pt_ptr, treq_ptr, out_ptr, lens_ptr,
    n_cols, width, max_blocks, topk, n_chunks,
    PAGE: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_P: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    vis = tl.load(vis_ptr + row)
    lens = tl.minimum(vis, topk)
    n = tl.minimum(vis, n_cols)
    req = tl.load(treq_ptr + row).to(tl.int64)
    pt_row = pt_ptr + req * max_blocks
    out_row = out_ptr + row.to(tl.int64) * width
    j = chunk * CHUNK + tl.arange(0, CHUNK)
    if chunk == 0:
        tl.store(lens_ptr + row, lens)
    # output positions [chunk * CHUNK, +CHUNK): -1 past lens; in-order entries for rows with vis <= topk
    n_first = tl.where(vis <= topk, lens, 0)
    first = j < n_first
    page = tl.load(pt_row + j // PAGE, mask=first, other=0)
    tl.store(out_row + j, tl.where(first, page * PAGE + j % PAGE, -1), mask=(j < width) & (first | (j >= lens)))
    if (vis > topk) & (chunk * CHUNK < n):
        thr, k_rem = _replay_rounds(hist_ptr + row.to(tl.int64) * (4 * NB), topk, 4, NB, B0, B1, B2, B3)
        cc = tl.arange(0, CHUNKS_P)
        before = cc < chunk
        c_row = counts_ptr + row.to(tl.int64) * n_chunks * 2
        base_gt = tl.sum(tl.load(c_row + cc * 2, mask=before, other=0), axis=0)
        base_eq = tl.sum(tl.load(c_row + cc * 2 + 1, mask=before, other=0), axis=0)
        key, valid = _load_keys(logits_ptr + row.to(tl.int64) * n_cols, j, n)
        _place(key, valid, j, thr, base_gt, (topk - k_rem) + base_eq, topk, pt_row, out_row, PAGE)


def _topk_split(logits, visible, page_table, token_request, out, lens, topk, width, page_size, bits, chunk):
    t, n_cols = logits.shape
    n_chunks = cdiv(max(n_cols, width), chunk)
    nb = 1 << max(bits)
    hist = torch.zeros((t, 4, nb), dtype=torch.int32, device=logits.device)
    counts = torch.empty((t, n_chunks, 2), dtype=torch.int32, device=logits.device)
    grid = (t, n_chunks)
    consts = dict(NB=nb, CHUNK=chunk, B0=bits[0], B1=bits[1], B2=bits[2], B3=bits[3])
    hi = 32
    for r, b in enumerate(bits):
        if b == 0:
            break
        torch.library.wrap_triton(_topk_split_hist_kernel)[grid](
            logits, visible, hist, n_cols, topk, ROUND=r, HI_SHIFT=hi, SHIFT=hi - b, BITS=b, **consts, num_warps=8
        )
        hi -= b
    torch.library.wrap_triton(_topk_split_count_kernel)[grid](
        logits, visible, hist, counts, n_cols, topk, n_chunks, **consts, num_warps=8
    )
    torch.library.wrap_triton(_topk_split_write_kernel)[grid](
        logits, visible, hist, counts, page_table, token_request, out, lens, n_cols, width, page_table.shape[1],
        topk, n_chunks, PAGE=page_size, CHUNKS_P=max(2, next_pow2(n_chunks)), **consts, num_warps=8,
    )  # fmt: skip


@triton_op("dsv4fn::indexer_topk", mutates_args=())
def indexer_topk(
    logits: Tensor,
    visible: Tensor,
    page_table: Tensor,
    token_request: Tensor,
    topk: int,
    width: int,
    page_size: int,
) -> tuple[Tensor, Tensor]:
    """(cache slots int32 `[t, width]`, −1 padded; lengths int32 `[t]` = min(visible, topk))."""
    t, n_cols = logits.shape
    out = torch.empty((t, width), dtype=torch.int32, device=logits.device)
    lens = torch.empty((t,), dtype=torch.int32, device=logits.device)
    if t == 0:
        return out, lens
    cfg = TOPK_CONFIG
    bits = _radix_rounds(cfg["radix_bits"])
    split = cfg["split"]
    if split < 0:
        # auto: split rows longer than one chunk while rows alone do not fill the GPU (H200, k = 512,
        # bench/results/h200/topk_dev.txt: t = 1, 256k entries 913 -> 34 us; t = 32: 921 -> 262 us;
        # from t = 128 one program per row is as fast or faster; t = 64 is not measured)
        split = int(n_cols > cfg["chunk"] and t <= 64)
    if split:
        _topk_split(logits, visible, page_table, token_request, out, lens, topk, width, page_size, bits, cfg["chunk"])
        return out, lens
    torch.library.wrap_triton(_topk_kernel)[(t,)](
        logits,
        visible,
        page_table,
        token_request,
        out,
        lens,
        n_cols,
        width,
        page_table.shape[1],
        topk,
        PAGE=page_size,
        BLOCK=cfg["block"] or 8192,
        B0=bits[0],
        B1=bits[1],
        B2=bits[2],
        B3=bits[3],
        num_warps=cfg["num_warps"],
    )
    return out, lens


@_backend.register("topk", "triton")
def select_topk(
    logits: Tensor, visible: Tensor, topk: int, width: int, page_table: Tensor, token_request: Tensor, page_size: int
) -> tuple[Tensor, Tensor]:
    """Triton twin of `reference.select_topk` (sets per row equal modulo ties at the threshold)."""
    if logits.dtype != torch.float32 or logits.ndim != 2 or not logits.is_contiguous():
        raise TypeError(f"logits: expected contiguous float32 [t, n], got {logits.dtype} {tuple(logits.shape)}")
    if topk < 1:
        raise ValueError(f"topk: expected >= 1, got {topk}")
    if width < min(topk, logits.shape[1]):
        raise ValueError(f"width: expected >= min(topk, n) = {min(topk, logits.shape[1])}, got {width}")
    if page_table.dtype != torch.int32 or page_table.ndim != 2 or not page_table.is_contiguous():
        raise TypeError(f"page_table: expected contiguous int32 [b, max_blocks], got {page_table.dtype}")
    return call_op(
        indexer_topk,
        logits,
        visible.to(torch.int32),
        page_table,
        token_request.to(torch.int32),
        min(topk, logits.shape[1]),
        width,
        page_size,
    )


__all__ = ["LOGITS_CONFIG", "TOPK_CONFIG", "indexer_paged_logits", "indexer_topk", "paged_logits", "select_topk"]
