"""Triton compressor (spec §3): pool completed windows, RMSNorm, RoPE and the carried-state update in
ONE kernel launch per compressor step, for decode steps, prefill chunks and mixed batches alike.

The projections `kv = x·wkvᵀ`, `score = x·wgateᵀ` run first as bf16 GEMMs with fp32 output (on CPU,
fp32 GEMMs of the upcast operands). Then `_compress_kernel` handles every token `i` of the batch
(request `b = token_request[i]`, position `p = prefix_lens[b] + i - query_start[b]`); a program
takes one token (`t <= 512`: decode batches, short chunks) or 4 consecutive ones (long prefills,
where most tokens complete no window and a program per token would be mostly launch overhead):

* every token writes `has_entry[i] = (p + 1) % r == 0` and, if it completes no window, a zero row;
* a token completing window `j` pools, normalizes, rotates and stores entry `j` into `entries[i]`
  itself when all of the window's candidates are new rows of this step (positions `>= prefix_lens`),
  reading only the projections (`+ ape[p % r]`), never the state;
* the program of a request's FIRST token of the step is the request's *owner*. It computes the
  (at most `coff`) entries whose candidates include positions `< prefix_lens` — the only reads of the
  carried state in the whole launch — and afterwards writes the request's new state rows.

Race freedom (reads and writes of the state inside one launch). Only the owner of a request touches
that request's state slot, so there is no race between programs; inside the owner the order is:
entries (read old rows) → barrier → rows `0..r-1` of the new state (overlap: the previous complete
window, which may come from old rows `r..2r-1`) → barrier → rows `r..2r-1` (overlap) resp. `0..r-1`
(no overlap), which never read old rows. The barriers (`tl.debug_barrier`, a CTA barrier, which
orders the program's earlier global loads before its later stores) make every read of an old row
happen before any thread of the program overwrites it. Only rows that change are written: a decode
step that completes no window writes the one row of its token, a completing step writes the slot.
Requests of one batch must use distinct state slots.

Pooling: per channel, an online softmax over the `coff·r` candidates in chunks of `BLOCK_C` (the
chunk max is taken first, so a single-chunk window, r = 4, computes exactly `Σ e^(s-m)·kv / Σ e^(s-m)`
with `m` the window max; larger windows rescale between chunks, an fp32 reordering of the
reference's sum). The entry's `dc` channels live in one program as even and odd halves (the
interleaved RoPE pairs), so RMSNorm (fp32, `rsqrt` as `1/sqrt`, correctly rounded divisions) and
RoPE at `j·r` (angle `fp32(j·r)·freqs[i]`, accurate libdevice `cos`/`sin`) need no shuffles; the
result is rounded once to bf16 (round to nearest even).

CUDA-graph contract: no host synchronisation; the grid and every allocation follow from shapes
(`t`, `dc`) only, so decode steps are capturable. A request whose `prefix_lens` is 0 ignores its
slot's contents and leaves it canonical (unseen rows = (kv 0, score −∞)); for `prefix_lens > 0` the
slot must hold the canonical state this step function (or the reference) left there.

The op is `dsv4fn::compress_windows` (flat arguments, mutates the two state tensors);
`compress_triton` adapts it to `compress_reference`'s signature and registers itself as the
"triton" backend of the "compress" step.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._linear import linear_fp32
from .._triton_common import call_op, cdiv, f32_to_bf16_bits, interpreting, next_pow2, triton_op
from ..state import DSV4AttnMetadata, KVAndScore

if interpreting():

    @triton.jit
    def _mul_rn(a, b):
        return a * b

    @triton.jit
    def _cos_sin(ang):
        return tl.cos(ang), tl.sin(ang)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _mul_rn(a, b):
        # a separately rounded product, never contracted into an FMA with a following add
        return libdevice.mul_rn(a, b)

    @triton.jit
    def _cos_sin(ang):
        # libdevice's cosf/sinf reduce large arguments exactly (angles reach ~1e6 rad here)
        return libdevice.cos(ang), libdevice.sin(ang)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _candidates(
    kv_ptr,
    sc_ptr,
    ape_ptr,
    st_kv,
    st_sc,
    ok_new,
    ok_old,
    new_row,
    old_row,
    ape_row,
    col,
    cmask,
    W: tl.constexpr,
):
    """(kv, score) fp32 tiles for rows chosen per candidate: new rows of this step (score + ape),
    old state rows, or the fill (0, -inf). `col` [BLOCK_C, BH] column offsets. One load per
    element from a per-row choice of source (masked lanes fetch nothing)."""
    row_kv = tl.where(ok_new, kv_ptr + new_row * W, st_kv + old_row * W)
    row_sc = tl.where(ok_new, sc_ptr + new_row * W, st_sc + old_row * W)
    m = (ok_new | ok_old)[:, None] & cmask
    kv = tl.load(row_kv[:, None] + col, mask=m, other=0.0)
    sc = tl.load(row_sc[:, None] + col, mask=m, other=float("-inf"))
    # + ape for new rows; old rows already include it (adding 0.0 is exact, -inf stays -inf)
    sc = sc + tl.load(ape_ptr + ape_row[:, None] * W + col, mask=ok_new[:, None] & cmask, other=0.0)
    return kv, sc


@triton.jit
def _online(m, den, num, kv, sc):
    """One chunk of the per-channel online softmax pooling (axis 0 = candidates)."""
    m_new = tl.maximum(m, tl.max(sc, axis=0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_use)
    e = tl.exp(sc - m_use[None, :])
    den = den * alpha + tl.sum(e, axis=0)
    num = num * alpha + tl.sum(e * kv, axis=0)
    return m_new, den, num


@triton.jit
def _entry(
    j,
    out_row,
    p0,
    q0,
    end,
    base_old,
    st_kv,
    st_sc,
    kv_ptr,
    sc_ptr,
    ape_ptr,
    w_ptr,
    f_ptr,
    ent_ptr,
    eps,
    R: tl.constexpr,
    COFF: tl.constexpr,
    DC: tl.constexpr,
    N_FREQ: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BH: tl.constexpr,
):
    """Entry of window j (candidates at positions (j-coff+1)·r + c) -> bf16 bits at entries[out_row]."""
    W: tl.constexpr = COFF * DC
    C: tl.constexpr = COFF * R
    NOPE_PAIRS: tl.constexpr = DC // 2 - N_FREQ
    h = tl.arange(0, BH)
    hmask = h < DC // 2
    m_e = tl.full([BH], float("-inf"), tl.float32)
    m_o = tl.full([BH], float("-inf"), tl.float32)
    den_e = tl.zeros([BH], tl.float32)
    den_o = tl.zeros([BH], tl.float32)
    num_e = tl.zeros([BH], tl.float32)
    num_o = tl.zeros([BH], tl.float32)
    old_lo = tl.where(p0 > 0, base_old, p0)  # old rows: positions [old_lo, p0); none for a fresh request
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        q = (j - (COFF - 1)) * R + c
        cval = c < C
        ok_new = cval & (q >= p0) & (q < end)
        ok_old = cval & (q < p0) & (q >= old_lo)
        new_row = (q0 + q - p0).to(tl.int64)
        old_row = q - base_old
        ape_row = tl.where(q >= 0, q % R, 0)
        if COFF == 2:
            c_col = tl.where(c >= R, DC, 0)  # previous window: `a` half, this window: `b` half
        else:
            c_col = c * 0
        col = c_col[:, None] + 2 * h[None, :]
        cm = hmask[None, :]
        kv, sc = _candidates(
            kv_ptr, sc_ptr, ape_ptr, st_kv, st_sc, ok_new, ok_old, new_row, old_row, ape_row, col, cm, W
        )
        m_e, den_e, num_e = _online(m_e, den_e, num_e, kv, sc)
        kv, sc = _candidates(
            kv_ptr, sc_ptr, ape_ptr, st_kv, st_sc, ok_new, ok_old, new_row, old_row, ape_row, col + 1, cm, W
        )
        m_o, den_o, num_o = _online(m_o, den_o, num_o, kv, sc)
    xe = tl.where(hmask, tl.div_rn(num_e, tl.where(hmask, den_e, 1.0)), 0.0)
    xo = tl.where(hmask, tl.div_rn(num_o, tl.where(hmask, den_o, 1.0)), 0.0)
    # RMSNorm with weight, fp32
    ss = tl.sum(xe * xe, axis=0, keep_dims=True) + tl.sum(xo * xo, axis=0, keep_dims=True)  # [1]
    ms = tl.div_rn(ss, tl.full([1], DC, tl.float32))
    inv = tl.div_rn(tl.full([1], 1.0, tl.float32), tl.sqrt_rn(ms + eps))
    we = tl.load(w_ptr + 2 * h, mask=hmask, other=0.0)
    wo = tl.load(w_ptr + 2 * h + 1, mask=hmask, other=0.0)
    ye = _mul_rn(_mul_rn(xe, inv), we)
    yo = _mul_rn(_mul_rn(xo, inv), wo)
    # RoPE of the last 2·N_FREQ dims (pairs NOPE_PAIRS..) at the window's first position j·r
    fi = h - NOPE_PAIRS
    rot = hmask & (fi >= 0)
    f = tl.load(f_ptr + tl.where(rot, fi, 0), mask=rot, other=0.0)
    ang = _mul_rn(tl.zeros([BH], tl.float32) + (j * R).to(tl.float32), f)
    cs, sn = _cos_sin(ang)
    re = tl.where(rot, _mul_rn(ye, cs) - _mul_rn(yo, sn), ye)
    im = tl.where(rot, _mul_rn(ye, sn) + _mul_rn(yo, cs), yo)
    row = ent_ptr + out_row.to(tl.int64) * DC
    tl.store(row + 2 * h, f32_to_bf16_bits(re), mask=hmask)
    tl.store(row + 2 * h + 1, f32_to_bf16_bits(im), mask=hmask)


@triton.jit
def _write_rows(
    lo,
    hi,
    base_new,
    base_old,
    p0,
    q0,
    end,
    st_kv,
    st_sc,
    kv_ptr,
    sc_ptr,
    ape_ptr,
    R: tl.constexpr,
    W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """New state rows lo..hi-1 (row k holds position base_new + k): new rows of this step (score +
    ape), old rows (position < p0), or the fill (0, -inf) for positions not yet seen / negative."""
    old_lo = tl.where(p0 > 0, tl.maximum(base_old, 0), p0)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < hi
        pos = base_new + rows
        is_new = rmask & (pos >= p0) & (pos < end)
        is_old = rmask & (pos >= old_lo) & (pos < p0)
        new_row = (q0 + pos - p0).to(tl.int64)
        old_row = pos - base_old
        ape_row = tl.where(pos >= 0, pos % R, 0)
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cm = (cols < W)[None, :]
            kv, sc = _candidates(
                kv_ptr, sc_ptr, ape_ptr, st_kv, st_sc, is_new, is_old, new_row, old_row, ape_row, cols[None, :], cm, W
            )
            dst = rows[:, None] * W + cols[None, :]
            tl.store(st_kv + dst, kv, mask=rmask[:, None] & cm)
            tl.store(st_sc + dst, sc, mask=rmask[:, None] & cm)


@triton.jit
def _token(
    i,
    kv_ptr,
    sc_ptr,
    ape_ptr,
    w_ptr,
    f_ptr,
    st_kv_ptr,
    st_sc_ptr,
    prefix_ptr,
    extend_ptr,
    qstart_ptr,
    slot_ptr,
    tokreq_ptr,
    ent_ptr,
    has_ptr,
    eps,
    R: tl.constexpr,
    COFF: tl.constexpr,
    DC: tl.constexpr,
    N_FREQ: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    W: tl.constexpr = COFF * DC
    ROWS: tl.constexpr = COFF * R
    LEAD: tl.constexpr = (COFF - 1) * R
    b = tl.load(tokreq_ptr + i)
    p0 = tl.load(prefix_ptr + b)
    q0 = tl.load(qstart_ptr + b)
    end = p0 + tl.load(extend_ptr + b)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    st_kv = st_kv_ptr + slot * (ROWS * W)
    st_sc = st_sc_ptr + slot * (ROWS * W)
    p = p0 + (i - q0)
    j0 = p0 // R
    base_old = j0 * R - LEAD  # position of old state row 0
    completes = (p + 1) % R == 0
    tl.store(has_ptr + i, completes)
    j = (p + 1) // R - 1
    # windows whose candidates are all new rows are pooled by the token that completes them
    if completes & ((p0 == 0) | ((j - (COFF - 1)) * R >= p0)):
        _entry(
            j,
            i,
            p0,
            q0,
            end,
            base_old,
            st_kv,
            st_sc,
            kv_ptr,
            sc_ptr,
            ape_ptr,
            w_ptr,
            f_ptr,
            ent_ptr,
            eps,
            R,
            COFF,
            DC,
            N_FREQ,
            BLOCK_C,
            BH,
        )
    if (p + 1) % R != 0:
        h = tl.arange(0, 2 * BH)
        tl.store(ent_ptr + i.to(tl.int64) * DC + h, tl.zeros([2 * BH], tl.int16), mask=h < DC)
    if i == q0:
        # the owner: entries that read the old state, then the state update
        j_end = end // R
        for k in range(COFF):
            jj = j0 + k
            if (jj < j_end) & (p0 > 0) & ((jj - (COFF - 1)) * R < p0):
                _entry(
                    jj,
                    q0 + jj * R + R - 1 - p0,
                    p0,
                    q0,
                    end,
                    base_old,
                    st_kv,
                    st_sc,
                    kv_ptr,
                    sc_ptr,
                    ape_ptr,
                    w_ptr,
                    f_ptr,
                    ent_ptr,
                    eps,
                    R,
                    COFF,
                    DC,
                    N_FREQ,
                    BLOCK_C,
                    BH,
                )
        tl.debug_barrier()
        base_new = j_end * R - LEAD
        changed = (j_end != j0) | (p0 == 0)
        lo = tl.where(changed, 0, p0 - base_new)
        hi = tl.where(changed, ROWS, end - base_new)
        if COFF == 2:
            # rows 0..r-1 may read old rows r..2r-1, which the second pass overwrites
            _write_rows(
                lo,
                tl.minimum(hi, LEAD),
                base_new,
                base_old,
                p0,
                q0,
                end,
                st_kv,
                st_sc,
                kv_ptr,
                sc_ptr,
                ape_ptr,
                R,
                W,
                BLOCK_R,
                BLOCK_W,
            )
            tl.debug_barrier()
            _write_rows(
                tl.maximum(lo, LEAD),
                hi,
                base_new,
                base_old,
                p0,
                q0,
                end,
                st_kv,
                st_sc,
                kv_ptr,
                sc_ptr,
                ape_ptr,
                R,
                W,
                BLOCK_R,
                BLOCK_W,
            )
        else:
            _write_rows(
                lo, hi, base_new, base_old, p0, q0, end, st_kv, st_sc, kv_ptr, sc_ptr, ape_ptr, R, W, BLOCK_R, BLOCK_W
            )


@triton.jit
def _compress_kernel(
    kv_ptr,
    sc_ptr,
    ape_ptr,
    w_ptr,
    f_ptr,
    st_kv_ptr,
    st_sc_ptr,
    prefix_ptr,
    extend_ptr,
    qstart_ptr,
    slot_ptr,
    tokreq_ptr,
    ent_ptr,
    has_ptr,
    eps,
    T,
    R: tl.constexpr,
    COFF: tl.constexpr,
    DC: tl.constexpr,
    N_FREQ: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    TOK_BLOCK: tl.constexpr,
):
    """Program k handles tokens k·TOK_BLOCK .. k·TOK_BLOCK + TOK_BLOCK - 1 of the T tokens."""
    for tt in range(TOK_BLOCK):
        i = tl.program_id(0) * TOK_BLOCK + tt
        if i < T:
            _token(
                i,
                kv_ptr,
                sc_ptr,
                ape_ptr,
                w_ptr,
                f_ptr,
                st_kv_ptr,
                st_sc_ptr,
                prefix_ptr,
                extend_ptr,
                qstart_ptr,
                slot_ptr,
                tokreq_ptr,
                ent_ptr,
                has_ptr,
                eps,
                R,
                COFF,
                DC,
                N_FREQ,
                BLOCK_C,
                BH,
                BLOCK_R,
                BLOCK_W,
            )


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


def _num_warps(dc: int) -> int:
    return 8 if dc >= 512 else 4


def _blocks(ratio: int, coff: int, dc: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BH, BLOCK_R, BLOCK_W): candidate tiles of <= 8 fp32 elements per thread (they
    live as kv and score, even and odd halves), state tiles of 2K elements."""
    bh = next_pow2(max(dc // 2, 1))
    per_tile = 8 * 32 * _num_warps(dc)
    block_c = min(next_pow2(coff * ratio), max(2, per_tile // bh))
    w = coff * dc
    block_w = min(next_pow2(w), 256)
    block_r = max(1, min(next_pow2(coff * ratio), 2048 // block_w))
    return block_c, bh, block_r, block_w


@triton_op("dsv4fn::compress_windows", mutates_args=("state_kv", "state_score"))
def compress_windows(
    kv: Tensor,
    score: Tensor,
    ape: Tensor,
    norm_weight: Tensor,
    freqs: Tensor,
    state_kv: Tensor,
    state_score: Tensor,
    prefix_lens: Tensor,
    extend_lens: Tensor,
    query_start: Tensor,
    state_slots: Tensor,
    token_request: Tensor,
    eps: float,
    ratio: int,
    overlap: bool,
    tokens_per_program: int = 0,
) -> tuple[Tensor, Tensor]:
    """kv, score fp32 `[t, coff·dc]` (projections, score without ape); ape fp32 `[r, coff·dc]`;
    norm_weight fp32 `[dc]`; freqs fp32 `[rope/2]`; state_kv/state_score fp32 `[n_slots, coff·r,
    coff·dc]` (updated in place); per-request int32 prefix_lens, extend_lens, state_slots `[b]`,
    query_start `[b+1]`; token_request int32 `[t]`. Returns (entries bf16 `[t, dc]` — zero rows for
    tokens completing no window —, has_entry bool `[t]`). `tokens_per_program` 0 picks it from t."""
    t = kv.shape[0]
    dc = norm_weight.shape[0]
    coff = 2 if overlap else 1
    entries = torch.empty((t, dc), dtype=torch.bfloat16, device=kv.device)
    has_entry = torch.empty((t,), dtype=torch.bool, device=kv.device)
    if t == 0:
        return entries, has_entry
    block_c, bh, block_r, block_w = _blocks(ratio, coff, dc)
    tok_block = tokens_per_program or (1 if t <= 512 else 4)  # long prefills: fewer, fuller programs
    torch.library.wrap_triton(_compress_kernel)[(cdiv(t, tok_block),)](
        kv,
        score,
        ape,
        norm_weight,
        freqs,
        state_kv,
        state_score,
        prefix_lens,
        extend_lens,
        query_start,
        state_slots,
        token_request,
        entries.view(torch.int16),
        has_entry,
        float(eps),
        t,
        R=ratio,
        COFF=coff,
        DC=dc,
        N_FREQ=freqs.shape[0],
        BLOCK_C=block_c,
        BH=bh,
        BLOCK_R=block_r,
        BLOCK_W=block_w,
        TOK_BLOCK=tok_block,
        num_warps=_num_warps(dc),
    )
    return entries, has_entry


# ---------------------------------------------------------------------------------------------
# Adapter with the reference's signature
# ---------------------------------------------------------------------------------------------


def project(x: Tensor, w: Tensor) -> Tensor:
    """fp32 `[t, out]` = x bf16 `[t, hidden]` · w bf16 `[out, hidden]`ᵀ with fp32 accumulation
    (`dsv4fn._linear.linear_fp32`: a bf16 GEMM with fp32 output on CUDA)."""
    return linear_fp32(x, w)


def _check(name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    return t


@_backend.register("compress", "triton")
def compress_triton(
    wkv: Tensor,
    wgate: Tensor,
    ape: Tensor,
    norm_weight: Tensor,
    state: KVAndScore,
    x: Tensor,
    meta: DSV4AttnMetadata,
    freqs: Tensor,
    eps: float,
) -> tuple[KVAndScore, Tensor, Tensor]:
    """Same contract as `compress_reference`: (new state, entries bf16 `[t, dc]` aligned with the
    tokens that complete them — zero rows elsewhere —, has_entry bool `[t]`). The state is updated
    in place (donated) and returned. No host synchronisation."""
    if not isinstance(state, KVAndScore):
        raise TypeError(f"state: expected a KVAndScore, got {type(state).__name__}")
    r, dc, coff = state.ratio, state.dim, state.coff
    if not isinstance(x, Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        raise TypeError(f"x: expected a bf16 [t, hidden] tensor, got {getattr(x, 'dtype', type(x))}")
    t, hidden = x.shape
    _check("wkv", wkv, torch.bfloat16, (coff * dc, hidden))
    _check("wgate", wgate, torch.bfloat16, (coff * dc, hidden))
    _check("ape", ape, torch.float32, (r, coff * dc))
    _check("norm_weight", norm_weight, torch.float32, (dc,))
    if not isinstance(freqs, Tensor) or freqs.dtype != torch.float32 or freqs.dim() != 1:
        raise TypeError("freqs: expected a 1-D float32 tensor")
    if dc % 2 or 2 * freqs.shape[0] > dc:
        raise ValueError(f"freqs: {freqs.shape[0]} frequencies rotate {2 * freqs.shape[0]} dims; dc={dc} (even) needed")
    n_slots = state.kv.shape[0]
    for name, s in (("state.kv", state.kv), ("state.score", state.score)):
        _check(name, s, torch.float32, (n_slots, coff * r, coff * dc))
        if not s.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    nb = meta.prefix_lens.shape[0]
    for name, v, n in (
        ("meta.prefix_lens", meta.prefix_lens, nb),
        ("meta.extend_lens", meta.extend_lens, nb),
        ("meta.query_start", meta.query_start, nb + 1),
        ("meta.state_slots", meta.state_slots, nb),
        ("meta.token_request", meta.token_request, t),
    ):
        _check(name, v, torch.int32, (n,))
    devs = {a.device for a in (x, wkv, wgate, ape, norm_weight, freqs, state.kv, meta.token_request)}
    if len(devs) != 1:
        raise ValueError(f"compress: all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    kv = project(x, wkv)
    sc = project(x, wgate)
    entries, has_entry = call_op(
        compress_windows,
        kv,
        sc,
        ape.contiguous(),
        norm_weight.contiguous(),
        freqs.contiguous(),
        state.kv,
        state.score,
        meta.prefix_lens.contiguous(),
        meta.extend_lens.contiguous(),
        meta.query_start.contiguous(),
        meta.state_slots.contiguous(),
        meta.token_request.contiguous(),
        float(eps),
        r,
        state.overlap,
    )
    new_state = KVAndScore(kv=state.kv, score=state.score, ratio=r, dim=dc, overlap=state.overlap)
    return new_state, entries, has_entry


__all__ = ["compress_triton", "compress_windows", "project"]
