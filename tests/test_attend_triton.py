"""Triton sparse attention (`dsv4fn.attend.triton`) against the fp64 torch reference.

CPU runs use the Triton interpreter (fp32 operands); `gpu` tests run V4-Flash / V4-Pro sizes with
bf16 tensor-core operands. LSE is the natural log, sink excluded.
"""

import os

import torch  # does not import triton
from torch import Tensor

# Without a GPU the kernels run in the Triton interpreter (set before triton is imported); with one,
# the small-shape tests below run compiled on the GPU (the `device` fixture).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest

from dsv4fn.attend.reference import sparse_attention
from dsv4fn.attend.triton import default_num_splits, sparse_attention_triton, sparse_attn
from dsv4fn.formats import model1
from dsv4fn.state import PagedKVCache

TINY = dict(nope_dim=32, rope_dim=32, tile=32)
V4 = dict(nope_dim=448, rope_dim=64, tile=64)


def _cache(num_pages: int, page_size: int, geo: dict, device, gen: torch.Generator) -> PagedKVCache:
    """A cache whose every slot holds a quantized random record; the page padding stays NaN-ish bytes."""
    c = PagedKVCache.allocate(num_pages, page_size, device=device, **geo)
    c.data.copy_(torch.randint(0, 256, c.data.shape, generator=gen, dtype=torch.uint8, device="cpu").to(device))
    d = geo["nope_dim"] + geo["rope_dim"]
    n = num_pages * page_size
    x = torch.randn(n, d, generator=gen, device="cpu").to(device) * 2.0
    x[: n // 3, : geo["tile"]] *= 1e-3  # small tiles -> other scales, subnormal e4m3 codes
    return model1.store(c, x.to(torch.bfloat16), torch.arange(n, dtype=torch.int32, device=device))


def _indices(b: int, s_q: int, k: int, num_slots: int, device, gen: torch.Generator, p_skip: float = 0.2):
    idx = torch.stack([torch.randperm(num_slots, generator=gen)[:k] for _ in range(b * s_q)]).view(b, s_q, k)
    skip = torch.rand(b, s_q, k, generator=gen) < p_skip
    return torch.where(skip, -1, idx).to(torch.int32).to(device)


def _compare(o_ref, lse_ref, o, lse, *, lse_tol: float = 1e-4) -> None:
    assert o.shape == o_ref.shape and o.dtype == torch.bfloat16
    assert lse.shape == lse_ref.shape and lse.dtype == torch.float32
    # non-finite positions must match exactly
    assert torch.equal(torch.isnan(o), torch.isnan(o_ref)), "o: NaN positions differ"
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_ref)), "lse: NaN positions differ"
    assert torch.equal(torch.isposinf(lse), torch.isposinf(lse_ref)), "lse: +inf positions differ"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf positions differ"
    fin = torch.isfinite(o_ref)
    e, g = o_ref[fin].double(), o[fin].double()
    if e.numel():
        err = (e - g).abs()
        rel = (err.square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-30)).item()
        w = int(err.argmax())
        assert rel <= 5e-3, f"o: relative RMS {rel:.3e}; worst element {g[w].item()} vs {e[w].item()}"
    fl = torch.isfinite(lse_ref)
    if fl.any():
        err = (lse[fl].double() - lse_ref[fl].double()).abs()
        w = int(err.argmax())
        assert err.max().item() <= lse_tol, f"lse: max abs error {err.max().item():.3e} at {w}"


def _case(
    *,
    geo=TINY,
    b=2,
    s_q=1,
    h=16,
    k1=40,
    k2=0,
    page1=16,
    page2=8,
    pages=6,
    with_lens=False,
    with_sink=True,
    device="cpu",
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    d = geo["nope_dim"] + geo["rope_dim"]
    cache = _cache(pages, page1, geo, device, gen)
    q = (torch.randn(b, s_q, h, d, generator=gen) * 1.5).to(torch.bfloat16).to(device)
    idx = _indices(b, s_q, k1, cache.num_slots, device, gen)
    lens = torch.randint(0, k1 + 1, (b,), generator=gen, dtype=torch.int32).to(device) if with_lens else None
    kw = {}
    if k2:
        ec = _cache(pages * 2, page2, geo, device, gen)
        kw["extra_cache"] = ec
        kw["extra_indices"] = _indices(b, s_q, k2, ec.num_slots, device, gen)
        if with_lens:
            kw["extra_lens"] = torch.randint(0, k2 + 1, (b,), generator=gen, dtype=torch.int32).to(device)
    if with_sink:
        kw["sink"] = torch.randn(h, generator=gen).to(device)
    return q, cache, idx, lens, kw, d**-0.5


def _run_both(q, cache, idx, lens, kw, scale, **extra):
    o_ref, lse_ref = sparse_attention(q, cache, idx, lens, scale=scale, **kw)
    o, lse = sparse_attention_triton(q, cache, idx, lens, scale=scale, **kw, **extra)
    return o_ref, lse_ref, o, lse


# ---------------------------------------------------------------------------------------------
# Small shapes: interpreter on CPU, compiled kernels on a GPU (`device` fixture)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "name,kw",
    [
        ("main", dict()),
        ("main+extra", dict(k2=24)),
        ("lens", dict(k2=70, with_lens=True)),
        ("sq2", dict(s_q=2, k2=20)),
        ("h8-nosink", dict(h=8, with_sink=False, k2=10)),
        ("h12", dict(h=12, k2=30, with_lens=True)),
    ],
)
def test_tiny(name, kw, splits, device):
    q, cache, idx, lens, kwargs, scale = _case(**kw, device=device, seed=sum(map(ord, name)))
    _compare(*_run_both(q, cache, idx, lens, kwargs, scale, num_splits=splits))


@pytest.mark.parametrize(
    "cfg", [dict(prefetch=1), dict(prefetch=1, block_n=32), dict(block_n=32), dict(deq_bf16=1)], ids=str
)
@pytest.mark.parametrize("splits", [1, 3])
def test_launch_configs(cfg, splits, device, monkeypatch):
    """Every launch knob of ATTN_CONFIG computes the same thing (prefetch pipeline incl. list ends,
    ragged lengths, -1 indices, tiles split across the window/extra boundary)."""
    from dsv4fn.attend import triton as attn_triton

    monkeypatch.setitem(attn_triton.ATTN_CONFIG, "prefetch", cfg.get("prefetch", 0))
    monkeypatch.setitem(attn_triton.ATTN_CONFIG, "block_n", cfg.get("block_n", 64))
    monkeypatch.setitem(attn_triton.ATTN_CONFIG, "deq_bf16", cfg.get("deq_bf16", 0))
    q, cache, idx, lens, kw, scale = _case(k1=70, k2=90, with_lens=True, device=device, seed=21)
    _compare(*_run_both(q, cache, idx, lens, kw, scale, num_splits=splits))


def test_many_splits(device, monkeypatch):
    """16-key tiles, 11 splits: the combine streams its partials in chunks (11 = 2 full chunks + 3)."""
    from dsv4fn.attend import triton as attn_triton

    monkeypatch.setitem(attn_triton.ATTN_CONFIG, "block_n", 16)
    q, cache, idx, lens, kw, scale = _case(k1=70, k2=90, with_lens=True, device=device, seed=23)
    _compare(*_run_both(q, cache, idx, lens, kw, scale, num_splits=11))


@pytest.mark.parametrize("splits", [1, 4])
def test_v4_geometry(splits, device):
    q, cache, idx, lens, kw, scale = _case(
        geo=V4, b=2, h=16, k1=70, k2=60, page1=16, page2=8, pages=6, with_lens=True, device=device, seed=5
    )
    _compare(*_run_both(q, cache, idx, lens, kw, scale, num_splits=splits))


@pytest.mark.parametrize("splits", [1, 2])
def test_empty_rows(splits, device):
    """All indices -1 in one row, length 0 in another: o = 0, lse = +inf."""
    q, cache, idx, lens, kw, scale = _case(b=3, k2=20, with_lens=True, device=device, seed=7)
    idx[0] = -1
    kw["extra_indices"][0] = -1
    lens = torch.tensor([5, 0, 40], dtype=torch.int32, device=device)
    kw["extra_lens"] = torch.tensor([3, 0, 20], dtype=torch.int32, device=device)
    o_ref, lse_ref, o, lse = _run_both(q, cache, idx, lens, kw, scale, num_splits=splits)
    assert torch.isposinf(lse_ref[:2]).all()
    assert (o[:2] == 0).all() and torch.isposinf(lse[:2]).all()
    _compare(o_ref, lse_ref, o, lse)


def _poison_unselected(cache: PagedKVCache, idx: Tensor, lens: Tensor) -> None:
    """Every slot not in a row's first `lens` columns gets NaN e4m3 bytes, an inf scale and NaN rope."""
    cols = torch.arange(idx.shape[-1], device=idx.device)
    sel = idx[(idx >= 0) & (cols < lens.view(-1, 1, 1))].long()
    keep = torch.zeros(cache.num_slots, dtype=torch.bool, device=idx.device)
    keep[sel] = True
    rec, sc = model1._split_page(cache)
    drop = (~keep).view(cache.num_pages, cache.page_size)
    rec[drop] = 0x7F  # e4m3 NaN bytes; rope bf16 0x7f7f is finite, so plant NaN rope explicitly
    rope = rec[..., cache.nope_dim :].contiguous().view(torch.bfloat16)
    rope[drop] = float("nan")
    rec[..., cache.nope_dim :] = rope.view(torch.uint8)
    sc[drop] = 255  # scale 2^128 = inf


@pytest.mark.parametrize("splits", [1, 3])
def test_nan_in_unselected_slots_does_not_leak(splits, device):
    q, cache, idx, lens, kw, scale = _case(k2=30, with_lens=True, device=device, seed=11)
    lens = torch.tensor([17, 25], dtype=torch.int32, device=device)
    _poison_unselected(cache, idx, lens)
    _poison_unselected(kw["extra_cache"], kw["extra_indices"], kw["extra_lens"])
    o_ref, lse_ref, o, lse = _run_both(q, cache, idx, lens, kw, scale, num_splits=splits)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    _compare(o_ref, lse_ref, o, lse)


@pytest.mark.parametrize("where", ["nope", "rope"])
@pytest.mark.parametrize("splits", [1, 3])
def test_nan_in_selected_slot_appears(splits, where, device):
    q, cache, idx, lens, kw, scale = _case(b=2, k2=30, device=device, seed=13)
    ec = kw["extra_cache"]
    slot = 3
    kw["extra_indices"][1, 0, 4] = slot
    kw["extra_indices"][0][kw["extra_indices"][0] == slot] = -1  # row 0 must not see it
    rec, _ = model1._split_page(ec)
    p, off = divmod(slot, ec.page_size)
    if where == "nope":
        rec[p, off, 2] = 0x7F  # e4m3 NaN
    else:
        rec[p, off, ec.nope_dim + 2 : ec.nope_dim + 4] = torch.tensor([0xC0, 0x7F], dtype=torch.uint8)  # bf16 NaN
    o_ref, lse_ref, o, lse = _run_both(q, cache, idx, lens, kw, scale, num_splits=splits)
    assert torch.isnan(o[1]).all() and torch.isnan(lse[1]).all()
    assert torch.isfinite(o[0]).all()
    _compare(o_ref, lse_ref, o, lse)


@pytest.mark.parametrize("geo", [TINY, V4], ids=["tiny", "v4"])
def test_dequant_exact_single_key(geo, device):
    """One valid key per row: softmax weight 1, so o must equal the dequantized record exactly
    (e4m3 subnormals and every scale included)."""
    gen = torch.Generator().manual_seed(29)
    cache = _cache(4, 16, geo, device, gen)
    b, k = 24, 20
    idx = torch.full((b, 1, k), -1, dtype=torch.int32)
    slots = torch.randperm(cache.num_slots, generator=gen)[:b].to(torch.int32)
    idx[:, 0, 7] = slots
    idx = idx.to(device)
    d = geo["nope_dim"] + geo["rope_dim"]
    q = torch.randn(b, 1, 16, d, generator=gen).to(torch.bfloat16).to(device)
    o, lse = sparse_attention_triton(q, cache, idx, scale=d**-0.5, num_splits=1)
    want = model1.gather(cache, idx[:, 0, 7]).view(b, 1, 1, d).expand_as(o)
    assert torch.equal(o, want.contiguous())  # exact values; -0 and +0 compare equal (acc starts at +0)


def test_splits_agree(device):
    q, cache, idx, lens, kw, scale = _case(b=2, k1=100, k2=90, pages=8, with_lens=True, device=device, seed=17)
    o1, l1 = sparse_attention_triton(q, cache, idx, lens, scale=scale, num_splits=1, **kw)
    o4, l4 = sparse_attention_triton(q, cache, idx, lens, scale=scale, num_splits=4, **kw)
    rel = ((o1.double() - o4.double()).norm() / o1.double().norm()).item()
    assert rel <= 5e-3, rel
    fin = torch.isfinite(l1)
    assert torch.equal(fin, torch.isfinite(l4))
    assert (l1[fin] - l4[fin]).abs().max().item() <= 1e-5


def test_backend_dispatch_and_errors(device):
    from dsv4fn.attend import attend

    q, cache, idx, lens, kw, scale = _case(k2=12, device=device, seed=19)
    o, lse = attend(q, cache, idx, lens, backend="triton", **kw)
    o_ref, lse_ref = sparse_attention(q, cache, idx, lens, scale=q.shape[-1] ** -0.5, **kw)
    _compare(o_ref, lse_ref, o, lse)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention_triton(q, cache, idx.long(), scale=scale)
    with pytest.raises(ValueError, match="extra_cache"):
        sparse_attention_triton(q, cache, idx, scale=scale, extra_indices=kw["extra_indices"])
    with pytest.raises(ValueError, match="sink"):
        sparse_attention_triton(q, cache, idx, scale=scale, sink=torch.zeros(3, device=device))


def test_default_splits_from_shapes():
    cpu = torch.device("cpu")
    assert default_num_splits(1, 64, 10, cpu) > 1
    assert default_num_splits(256, 64, 10, cpu) == 1
    assert default_num_splits(1, 64, 1, cpu) == 1


def test_opcheck_schema(device):
    q, cache, idx, lens, kw, scale = _case(b=1, h=16, k1=20, k2=12, with_lens=True, device=device, seed=23)
    ec = kw["extra_cache"]
    args = (q, cache.data, idx, lens, ec.data, kw["extra_indices"], kw["extra_lens"], kw["sink"], scale)
    args = (*args, cache.page_size, ec.page_size, 32, 32, 32, 2)
    # fake-tensor tracing cannot run the interpreter: the full opcheck runs in the gpu tests
    torch.library.opcheck(sparse_attn, args, test_utils=("test_schema",))


# ---------------------------------------------------------------------------------------------
# GPU tests at real sizes
# ---------------------------------------------------------------------------------------------


def _real_case(b: int, h: int, k2: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dev = "cuda"
    d = 512
    win = 128
    main = _cache(max(2, b * 2), 128, V4, dev, gen)
    extra = _cache(max(2, b * k2 // 64 + 2), 64, V4, dev, gen)
    q = torch.randn(b, 1, h, d, generator=gen).to(torch.bfloat16).to(dev)
    idx = _indices(b, 1, win, main.num_slots, dev, gen, p_skip=0.05)
    eidx = _indices(b, 1, k2, extra.num_slots, dev, gen, p_skip=0.05)
    lens = torch.randint(1, win + 1, (b,), generator=gen, dtype=torch.int32).to(dev)
    elens = torch.randint(0, k2 + 1, (b,), generator=gen, dtype=torch.int32).to(dev)
    sink = torch.randn(h, generator=gen).to(dev)
    kw = dict(extra_cache=extra, extra_indices=eidx, extra_lens=elens, sink=sink)
    return q, main, idx, lens, kw, d**-0.5


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 32, 128])
@pytest.mark.parametrize("h,k2", [(64, 512), (128, 1024)], ids=["flash", "pro"])
def test_gpu_real_sizes(b, h, k2):
    q, cache, idx, lens, kw, scale = _real_case(b, h, k2)
    _compare(*_run_both(q, cache, idx, lens, kw, scale), lse_tol=1e-4)


@pytest.mark.gpu
def test_gpu_splits_and_graph():
    q, cache, idx, lens, kw, scale = _real_case(4, 64, 512, seed=3)
    o_ref, lse_ref = sparse_attention(q, cache, idx, lens, scale=scale, **kw)
    for splits in (1, 5):
        o, lse = sparse_attention_triton(q, cache, idx, lens, scale=scale, num_splits=splits, **kw)
        _compare(o_ref, lse_ref, o, lse)
    o_e, lse_e = sparse_attention_triton(q, cache, idx, lens, scale=scale, **kw)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sparse_attention_triton(q, cache, idx, lens, scale=scale, **kw)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        o_g, lse_g = sparse_attention_triton(q, cache, idx, lens, scale=scale, **kw)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_g, o_e) and torch.equal(lse_g, lse_e)


@pytest.mark.gpu
def test_gpu_opcheck():
    q, cache, idx, lens, kw, scale = _real_case(2, 64, 512, seed=5)
    ec = kw["extra_cache"]
    for splits in (1, 4):
        args = (q, cache.data, idx, lens, ec.data, kw["extra_indices"], kw["extra_lens"], kw["sink"], scale)
        args = (*args, cache.page_size, ec.page_size, 448, 64, 64, splits)
        torch.library.opcheck(sparse_attn, args)
