"""Hypothesis property tests: every Triton backend against the torch reference over random shapes.

Without CUDA the kernels run in the Triton interpreter (fp32 operands). Each property draws its
structure (batch, heads, page sizes, widths, lengths, flags) from hypothesis and its tensor contents
from a seeded torch generator; `derandomize=True` keeps CI reproducible. Properties:

1. `attend` (triton vs torch): o relative RMS <= 5e-3 (worst element reported), lse (natural log)
   abs <= 1e-4 on finite entries, +inf positions identical, o == 0 exactly where lse is +inf; NaN
   bytes planted in unselected slots never leak, NaN in a selected slot poisons exactly that query row.
2. `attend` triton batch invariance (each row alone == the row in the batch, bitwise, same split
   count) and determinism (two identical calls, identical bits).
3. `index_logits` / `index_topk` (triton vs torch) on plans with random lengths and permuted pages.
4. `store_kv` / `store_index_keys` (triton vs torch): the whole cache bytes identical.
"""

import os

import torch  # does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from dsv4fn import (
    DSV4Config,
    IndexerKeyCache,
    PagedKVCache,
    attend,
    index_logits,
    index_topk,
    plan,
    store_index_keys,
    store_kv,
)
from dsv4fn.attend.triton import sparse_attention_triton
from dsv4fn.formats import indexer_fp8, model1
from dsv4fn.index_topk.reference import key_slots, paged_logits

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(nope_dim=32, rope_dim=32, tile=32)
V4 = dict(nope_dim=448, rope_dim=64, tile=64)

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# attend: case generation
# ---------------------------------------------------------------------------------------------


def _filled_cache(num_pages: int, page_size: int, geo: dict, gen: torch.Generator) -> PagedKVCache:
    """Every slot a quantized random record (some with tiny tiles: other scales, subnormal codes);
    the page padding keeps random bytes."""
    c = PagedKVCache.allocate(num_pages, page_size, device=DEV, **geo)
    c.data.copy_(torch.randint(0, 256, c.data.shape, generator=gen, dtype=torch.uint8).to(DEV))
    n = num_pages * page_size
    x = torch.randn(n, c.head_dim, generator=gen) * 2.0
    small = torch.rand(n, generator=gen) < 0.3
    x[small, : geo["tile"]] *= 1e-3
    return model1.store(c, x.to(torch.bfloat16).to(DEV), torch.arange(n, dtype=torch.int32, device=DEV))


def _index_list(rows: int, k: int, num_slots: int, p_hole: float, dup: bool, gen: torch.Generator) -> Tensor:
    """[rows, k] int32 slots: with `dup` drawn with replacement (duplicates likely), else distinct
    where the cache is large enough; a fraction `p_hole` replaced by -1."""
    if dup or k > num_slots:
        idx = torch.randint(0, num_slots, (rows, k), generator=gen)
    else:
        idx = torch.stack([torch.randperm(num_slots, generator=gen)[:k] for _ in range(rows)])
    hole = torch.rand(rows, k, generator=gen) < p_hole
    return torch.where(hole, -1, idx).to(torch.int32)


@st.composite
def attend_cases(draw, *, allow_v4: bool = True) -> dict:
    v4 = allow_v4 and draw(st.integers(0, 7)) == 0  # the 448+64 geometry now and then
    p = dict(
        geo=V4 if v4 else TINY,
        b=draw(st.integers(1, 4)),
        s_q=draw(st.integers(1, 2)),
        h=draw(st.sampled_from([4, 8, 12, 16])),
        page1=draw(st.sampled_from([1, 2, 4, 8, 16, 64])),
        pages1=draw(st.integers(1, 6)),
        k1=draw(st.integers(1, 40 if v4 else 100)),
        extra=draw(st.booleans()),
        page2=draw(st.sampled_from([1, 4, 8, 32])),
        pages2=draw(st.integers(1, 6)),
        k2=draw(st.integers(1, 40 if v4 else 100)),
        p_hole=draw(st.sampled_from([0.0, 0.15, 0.15, 0.4, 0.4, 1.0])),  # 1.0: every row empty
        dup=draw(st.booleans()),
        lens=draw(st.sampled_from(["none", "random", "edges"])),
        sink=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return p


def _lens(kind: str, b: int, k: int, gen: torch.Generator) -> Tensor | None:
    if kind == "none":
        return None
    if kind == "edges":  # 0 and the full width, the boundaries
        return torch.tensor([0, k][:b] + [k] * max(0, b - 2), dtype=torch.int32)[:b].to(DEV)
    return torch.randint(0, k + 1, (b,), generator=gen, dtype=torch.int32).to(DEV)


def _build_attend(p: dict) -> tuple[Tensor, PagedKVCache, Tensor, Tensor | None, dict, float]:
    gen = torch.Generator().manual_seed(p["seed"])
    geo, b, s_q, h = p["geo"], p["b"], p["s_q"], p["h"]
    d = geo["nope_dim"] + geo["rope_dim"]
    cache = _filled_cache(p["pages1"], p["page1"], geo, gen)
    q = (torch.randn(b, s_q, h, d, generator=gen) * 1.5).to(torch.bfloat16).to(DEV)
    idx = _index_list(b * s_q, p["k1"], cache.num_slots, p["p_hole"], p["dup"], gen).view(b, s_q, -1).to(DEV)
    lens = _lens(p["lens"], b, p["k1"], gen)
    kw: dict = {}
    if p["extra"]:
        ec = _filled_cache(p["pages2"], p["page2"], geo, gen)
        kw["extra_cache"] = ec
        eidx = _index_list(b * s_q, p["k2"], ec.num_slots, p["p_hole"], p["dup"], gen)
        kw["extra_indices"] = eidx.view(b, s_q, -1).to(DEV)
        el = _lens(p["lens"], b, p["k2"], gen)
        if el is not None:
            kw["extra_lens"] = el.flip(0)  # different rows empty in the two lists
    if p["sink"]:
        kw["sink"] = (torch.randn(h, generator=gen) * 2).to(DEV)
    return q, cache, idx, lens, kw, d**-0.5


def _selected(cache: PagedKVCache, idx: Tensor, lens: Tensor | None) -> Tensor:
    """Bool [b, s_q, num_slots]: slots each query row reads."""
    b, s_q, k = idx.shape
    ok = idx >= 0
    if lens is not None:
        ok &= torch.arange(k, device=idx.device) < lens.view(b, 1, 1)
    sel = torch.zeros(b, s_q, cache.num_slots + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(2, torch.where(ok, idx, cache.num_slots).long(), True)
    return sel[..., :-1]


def _poison(cache: PagedKVCache, slots: Tensor, where: str) -> None:
    """Plant NaN in `slots` (bool [num_slots]): 0x7F e4m3 bytes in the nope part and/or NaN bf16 rope
    (0x7F7F is a finite bf16, so the rope NaN is written explicitly)."""
    rec, _ = model1._split_page(cache)
    m = slots.view(cache.num_pages, cache.page_size)
    if where in ("nope", "both"):
        rec[..., : cache.nope_dim][m] = 0x7F
    if where in ("rope", "both"):
        rope = rec[..., cache.nope_dim :].contiguous().view(torch.bfloat16)
        rope[m] = float("nan")
        rec[..., cache.nope_dim :] = rope.view(torch.uint8)


def _compare_attend(o_ref: Tensor, lse_ref: Tensor, o: Tensor, lse: Tensor, ctx: str) -> None:
    assert o.shape == o_ref.shape and o.dtype == torch.bfloat16, ctx
    assert lse.shape == lse_ref.shape and lse.dtype == torch.float32, ctx
    assert torch.equal(torch.isnan(o), torch.isnan(o_ref)), f"o: NaN positions differ ({ctx})"
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_ref)), f"lse: NaN positions differ ({ctx})"
    assert torch.equal(torch.isposinf(lse), torch.isposinf(lse_ref)), f"lse: +inf positions differ ({ctx})"
    assert not torch.isneginf(lse).any(), f"lse: -inf ({ctx})"
    empty = torch.isposinf(lse).permute(0, 2, 1)  # [b, s_q, h]
    assert bool((o[empty] == 0).all()), f"o must be exactly 0 where lse is +inf ({ctx})"
    fin = torch.isfinite(o_ref)
    e, g = o_ref[fin].double(), o[fin].double()
    if e.numel():
        err = (e - g).abs()
        rel = (err.square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-30)).item()
        w = int(err.argmax())
        assert rel <= 5e-3, f"o: relative RMS {rel:.3e}; worst element {g[w].item()} vs {e[w].item()} ({ctx})"
    fl = torch.isfinite(lse_ref)
    if fl.any():
        err = (lse[fl].double() - lse_ref[fl].double()).abs()
        w = int(err.argmax())
        assert err[w].item() <= 1e-4, (
            f"lse: max abs error {err[w].item():.3e}: {lse[fl][w]} vs {lse_ref[fl][w]} ({ctx})"
        )


def _both(q, cache, idx, lens, kw):
    o_ref, lse_ref = attend(q, cache, idx, lens, backend="torch", **kw)
    o, lse = attend(q, cache, idx, lens, backend="triton", **kw)
    return o_ref, lse_ref, o, lse


def _ctx(p: dict) -> str:
    g = "v4" if p["geo"] is V4 else "tiny"
    return ", ".join(f"{k}={v}" for k, v in {**p, "geo": g}.items())


# ---------------------------------------------------------------------------------------------
# 1. attend: triton == torch, NaN containment
# ---------------------------------------------------------------------------------------------


@settings(max_examples=20, **SETTINGS)
@given(p=attend_cases(), nan=st.sampled_from(["none", "nope", "rope", "both"]))
def test_attend_matches_reference(p, nan):
    q, cache, idx, lens, kw, _ = _build_attend(p)
    ctx = _ctx(p) + f", nan={nan}"
    if nan != "none":  # NaN in every slot no query row reads: nothing may leak
        sel = _selected(cache, idx, lens).flatten(0, 1).any(0)
        _poison(cache, ~sel, nan)
        if "extra_cache" in kw:
            ec = kw["extra_cache"]
            _poison(ec, ~_selected(ec, kw["extra_indices"], kw.get("extra_lens")).flatten(0, 1).any(0), nan)
    o_ref, lse_ref, o, lse = _both(q, cache, idx, lens, kw)
    if nan != "none":
        assert torch.isfinite(o).all() and not torch.isnan(lse).any(), f"NaN leaked from unselected slots ({ctx})"
    _compare_attend(o_ref, lse_ref, o, lse, ctx)


@settings(max_examples=12, **SETTINGS)
@given(p=attend_cases(allow_v4=False), where=st.sampled_from(["nope", "rope"]), pick=st.integers(0, 2**16))
def test_attend_nan_in_selected_slot(p, where, pick):
    """NaN in one slot that some query row reads: exactly the rows reading it are NaN (all heads)."""
    q, cache, idx, lens, kw, _ = _build_attend(p)
    sel = _selected(cache, idx, lens)  # [b, s_q, slots]
    used = sel.flatten(0, 1).any(0).nonzero().flatten()
    if used.numel() == 0:
        return  # nothing selected anywhere (all holes / zero lengths): covered by the property above
    slot = int(used[pick % used.numel()])
    only = torch.zeros(cache.num_slots, dtype=torch.bool, device=DEV)
    only[slot] = True
    _poison(cache, only, where)
    o_ref, lse_ref, o, lse = _both(q, cache, idx, lens, kw)
    hit = sel[..., slot]  # [b, s_q]
    ctx = _ctx(p) + f", where={where}, slot={slot}"
    assert torch.isnan(o[hit]).all() and torch.isnan(lse.permute(0, 2, 1)[hit]).all(), f"NaN row lost ({ctx})"
    assert not torch.isnan(o[~hit]).any() and not torch.isnan(lse.permute(0, 2, 1)[~hit]).any(), ctx
    _compare_attend(o_ref, lse_ref, o, lse, ctx)


# ---------------------------------------------------------------------------------------------
# 2. attend triton: batch invariance and determinism
# ---------------------------------------------------------------------------------------------


def _row(x: Tensor | None, i: int) -> Tensor | None:
    return None if x is None else x[i : i + 1]


@settings(max_examples=10, **SETTINGS)
@given(p=attend_cases(allow_v4=False), splits=st.integers(1, 3))
def test_attend_batch_invariant_and_deterministic(p, splits):
    """`sparse_attention_triton` with an explicit split count (the default depends on the batch size,
    see `default_num_splits`): a row alone gives the same bits as inside the batch, and repeated
    calls give identical bits."""
    q, cache, idx, lens, kw, scale = _build_attend(p)
    o, lse = sparse_attention_triton(q, cache, idx, lens, scale=scale, num_splits=splits, **kw)
    o2, lse2 = sparse_attention_triton(q, cache, idx, lens, scale=scale, num_splits=splits, **kw)
    ctx = _ctx(p) + f", splits={splits}"
    assert torch.equal(o.view(torch.int16), o2.view(torch.int16)), f"o not deterministic ({ctx})"
    assert torch.equal(lse.view(torch.int32), lse2.view(torch.int32)), f"lse not deterministic ({ctx})"
    for i in range(p["b"]):
        kwi = {k: (v if k in ("extra_cache", "sink") else _row(v, i)) for k, v in kw.items()}
        qi, idxi, lensi = q[i : i + 1], idx[i : i + 1], _row(lens, i)
        oi, lsei = sparse_attention_triton(qi, cache, idxi, lensi, scale=scale, num_splits=splits, **kwi)
        assert torch.equal(oi.view(torch.int16), o[i : i + 1].view(torch.int16)), f"o row {i} differs alone ({ctx})"
        assert torch.equal(lsei.view(torch.int32), lse[i : i + 1].view(torch.int32)), f"lse row {i} ({ctx})"


# ---------------------------------------------------------------------------------------------
# 3. index logits + top-k
# ---------------------------------------------------------------------------------------------


@st.composite
def index_cases(draw) -> dict:
    topk = draw(st.sampled_from([4, 6, 8]))
    b = draw(st.integers(1, 3))
    # visible = (p + 1) // 4 per token: prefixes spread over 0, < topk, == topk and > topk entries
    prefix = [draw(st.integers(0, 4 * topk + 48)) for _ in range(b)]
    extend = [draw(st.integers(1, 9)) for _ in range(b)]
    return dict(topk=topk, prefix=prefix, extend=extend, ties=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _build_index(p: dict):
    cfg = DSV4Config.tiny().with_(index_topk=p["topk"], index_pad=8)
    gen = torch.Generator().manual_seed(p["seed"])
    b = len(p["prefix"])
    longest = max(a + e for a, e in zip(p["prefix"], p["extend"], strict=True))
    nblk = -(-longest // cfg.block_size)
    spare = 3
    pt = torch.randperm(b * nblk + spare, generator=gen)[: b * nblk].to(torch.int32).view(b, nblk)
    n_swa = -(-longest // cfg.swa_page_size)
    swa = torch.arange(b * n_swa, dtype=torch.int32).view(b, n_swa)  # distinct pages (VALIDATE checks)
    meta = plan(cfg, p["prefix"], p["extend"], pt.to(DEV), swa.to(DEV))
    page = cfg.compressed_page_size(4)
    cache = IndexerKeyCache.allocate(b * nblk + spare, page, dim=cfg.index_head_dim, device=DEV)
    cache.data.copy_(torch.randint(0, 256, cache.data.shape, generator=gen, dtype=torch.uint8).to(DEV))
    n = cache.num_slots
    keys = torch.randn(n, cfg.index_head_dim, generator=gen) * (0.25 + torch.rand(n, 1, generator=gen))
    if p["ties"]:  # identical keys in several slots: exact logit ties, also at the top-k boundary
        keys = keys[torch.randint(0, 4, (n,), generator=gen)]
    cache = store_index_keys(cache, keys.to(DEV), torch.arange(n, dtype=torch.int32, device=DEV), backend="torch")
    t = meta.num_tokens
    q8, sq = indexer_fp8.quantize_rows(torch.randn(t, cfg.index_heads, cfg.index_head_dim, generator=gen))
    w = torch.randn(t, cfg.index_heads, generator=gen) * sq * cfg.index_head_dim**-0.5
    return cfg, meta, cache, q8.to(DEV), w.contiguous().to(DEV)


def _logit_tol(q8: Tensor, w: Tensor, cache: IndexerKeyCache, meta, ref: Tensor) -> Tensor:
    """1e-5·|ref| + 1e-6·M with M = s_k·Σ_h|w_h|·Σ_d|q_hd·k_d|: the kernel accumulates the di-term dot
    products and the head sum (mixed-sign weights) in fp32 in another order than the fp64 reference, so
    a logit that cancels to near zero carries an absolute error of a few fp32 ulps of M, not of itself."""
    data = cache.data.clone()
    data[:, : cache.page_size * cache.dim] &= 0x7F  # |k| (e4m3 sign bit cleared)
    abs_cache = IndexerKeyCache(data=data, page_size=cache.page_size, dim=cache.dim)
    assert meta.csa is not None
    width = ref.shape[1]
    q_abs = q8.float().abs().to(torch.float8_e4m3fn)
    mag = paged_logits(q_abs, w.abs(), abs_cache, meta.page_table, meta.token_request, meta.csa.visible, width)
    # on CUDA the FP8 tensor cores accumulate the dot with ~14 mantissa bits (DeepGEMM alike): 2^-12·M
    fp8_mma = 2.0**-12 if ref.is_cuda else 0.0
    return 1e-5 * ref.double().abs() + (1e-6 + fp8_mma) * mag.double()


@settings(max_examples=10, **SETTINGS)
@given(p=index_cases())
def test_index_logits_and_topk_match_reference(p):
    cfg, meta, cache, q8, w = _build_index(p)
    csa = meta.csa
    assert csa is not None
    ctx = ", ".join(f"{k}={v}" for k, v in p.items()) + f", visible={csa.visible.tolist()}"
    ref = index_logits(q8, w, cache, meta, backend="torch")
    got = index_logits(q8, w, cache, meta, backend="triton")
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(ref), torch.isneginf(got)), f"-inf positions differ ({ctx})"
    assert torch.isfinite(got[~torch.isneginf(ref)]).all(), f"non-finite logits ({ctx})"
    fin = torch.isfinite(ref)
    tol = _logit_tol(q8, w, cache, meta, ref)
    err = (got.double() - ref.double()).abs()
    bad = fin & (err > tol)
    if bad.any():
        i = int(((err - tol).masked_fill(~fin, -1)).flatten().argmax())
        raise AssertionError(f"{int(bad.sum())} logits off; worst {got.flatten()[i]} vs {ref.flatten()[i]} ({ctx})")

    ei, el = index_topk(q8, w, cache, meta, backend="torch")
    gi, gl = index_topk(q8, w, cache, meta, backend="triton")
    k = p["topk"]
    assert gi.shape == ei.shape and gi.dtype == torch.int32 and gl.dtype == torch.int32, ctx
    assert torch.equal(gl, el), f"lengths differ: {gl.tolist()} vs {el.tolist()} ({ctx})"
    assert torch.equal(el, csa.visible.clamp(max=k)), ctx
    pad = torch.arange(gi.shape[1], device=DEV).view(1, -1) >= el.view(-1, 1)
    assert bool((gi[pad] == -1).all()), f"-1 padding differs ({ctx})"
    assert bool((gi[~pad] >= 0).all()), ctx
    trivial = csa.visible <= k
    assert torch.equal(gi[trivial], ei[trivial]), f"rows with visible <= topk must list every entry in order ({ctx})"
    slots = key_slots(meta.page_table, meta.token_request, ref.shape[1], csa.page_size)
    for r in (~trivial).nonzero().flatten().tolist():
        n = int(csa.visible[r])
        gs, es = set(gi[r, :k].tolist()), set(ei[r, :k].tolist())
        assert len(gs) == k, f"row {r}: duplicate slots {gi[r, :k].tolist()} ({ctx})"
        if gs == es:
            continue
        slot_to_j = {int(s): j for j, s in enumerate(slots[r, :n].tolist())}
        kth = ref[r, :n].double().topk(k).values[-1]
        for s in gs ^ es:  # a member may differ only if its reference logit ties the k-th within the logit error
            assert s in slot_to_j, f"row {r}: slot {s} is not a visible entry ({ctx})"
            j = slot_to_j[s]
            gap = (ref[r, j].double() - kth).abs()
            assert gap <= 2 * (tol[r, j] + 1e-5 * kth.abs()), (
                f"row {r}: slot {s} logit {ref[r, j]} vs k-th {kth} ({ctx})"
            )


# ---------------------------------------------------------------------------------------------
# 4. cache stores: identical bytes
# ---------------------------------------------------------------------------------------------


def _locations(n: int, num_pages: int, page: int, gen: torch.Generator) -> Tensor:
    """n distinct slots packed into few pages (several rows per page), a quarter of them -1."""
    pages = torch.randperm(num_pages, generator=gen)[: max(1, num_pages // 2)]
    cand = (pages.view(-1, 1) * page + torch.arange(page).view(1, -1)).flatten()
    loc = cand[torch.randperm(cand.numel(), generator=gen)]
    loc = torch.cat([loc, torch.full((max(0, n - loc.numel()),), -1)])[:n]
    return torch.where(torch.rand(n, generator=gen) < 0.25, -1, loc).to(torch.int32)


def _row_scales(n: int, gen: torch.Generator) -> Tensor:
    """Per-row magnitudes over many binades, including all-zero rows."""
    return torch.tensor([0.0, 1e-6, 1e-2, 1.0, 300.0])[torch.randint(0, 5, (n, 1), generator=gen)]


@settings(max_examples=20, **SETTINGS)
@given(
    v4=st.booleans(),
    page=st.sampled_from([1, 2, 8, 16, 64]),
    num_pages=st.integers(1, 5),
    n=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_store_kv_bytes_match(v4, page, num_pages, n, seed):
    gen = torch.Generator().manual_seed(seed)
    geo = V4 if v4 else TINY
    base = PagedKVCache.allocate(num_pages, page, device=DEV, **geo)
    base.data.copy_(torch.randint(0, 256, base.data.shape, generator=gen, dtype=torch.uint8).to(DEV))
    x = torch.randn(n, base.head_dim, generator=gen) * _row_scales(n, gen)
    tile_small = torch.rand(n, base.num_tiles, generator=gen) < 0.3  # single tiles at other scales
    x[:, : geo["nope_dim"]] *= torch.where(tile_small, 1e-3, 1.0).repeat_interleave(geo["tile"], dim=1)
    x = x.to(torch.bfloat16).to(DEV)
    loc = _locations(n, num_pages, page, gen).to(DEV)
    c_ref = PagedKVCache(data=base.data.clone(), page_size=page, **geo)
    c_tri = PagedKVCache(data=base.data.clone(), page_size=page, **geo)
    want = store_kv(c_ref, x, loc, backend="torch").data
    got = store_kv(c_tri, x, loc, backend="triton").data
    diff = (want != got).nonzero()
    where = diff[0].tolist() if diff.numel() else None
    assert where is None, f"{diff.shape[0]} bytes differ, first at (page, byte) {where} ({v4=}, {page=}, {n=}, {seed=})"


@settings(max_examples=20, **SETTINGS)
@given(
    dim=st.sampled_from([64, 128]),
    page=st.sampled_from([1, 4, 16, 64]),
    num_pages=st.integers(1, 5),
    n=st.integers(0, 40),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_store_index_keys_bytes_match(dim, page, num_pages, n, bf16, seed):
    gen = torch.Generator().manual_seed(seed)
    base = IndexerKeyCache.allocate(num_pages, page, dim=dim, device=DEV)
    base.data.copy_(torch.randint(0, 256, base.data.shape, generator=gen, dtype=torch.uint8).to(DEV))
    k = torch.randn(n, dim, generator=gen) * _row_scales(n, gen)
    k = k.to(torch.bfloat16 if bf16 else torch.float32).to(DEV)
    loc = _locations(n, num_pages, page, gen).to(DEV)
    want = store_index_keys(IndexerKeyCache(data=base.data.clone(), page_size=page, dim=dim), k, loc, backend="torch")
    got = store_index_keys(IndexerKeyCache(data=base.data.clone(), page_size=page, dim=dim), k, loc, backend="triton")
    diff = (want.data != got.data).nonzero()
    where = diff[0].tolist() if diff.numel() else None
    assert where is None, f"{diff.shape[0]} bytes differ, first at {where} ({dim=}, {page=}, {n=}, {bf16=}, {seed=})"


def test_properties_run_on_the_intended_backend():
    """Guard: on CPU the Triton kernels must run in the interpreter (else the properties test nothing)."""
    if DEV == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
    pytest.importorskip("triton")
