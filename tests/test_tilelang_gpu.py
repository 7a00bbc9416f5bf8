"""TileLang kernels on the GPU: numerics vs the torch reference at V4-Flash / V4-Pro sizes, exact
dequantization, CUDA-graph capture, the stream workaround, opcheck, and the fused indexer top-k vs the
reference sets.

Compile budget (one cold device call): every kernel this file needs is compiled up front, side by side
(`_tilelang_compat.precompile`), by the module fixture `_kernels_compiled`:
  attention ws  : direct + split/combine for 64 heads (Flash) and 128 heads (Pro), direct for 8 heads;
                  cluster merge of 2 splits for 64, 128 and 96 heads, of 3 for 64 and 128
  attention old : legacy split + combine, 64 heads (test_attention_exact_dequant[legacy] only: 16 rows of
                  2 blocks take the split path in both kernels)
  indexer       : logits; chunk top-k + merge for topk 512 and 1024
  workaround    : two tiny kernels (test_out_idx_workaround_real_compile)
All attention tests use page size 64 for both caches and scale 512**-0.5 so they share these kernels."""

import importlib

import pytest
import torch

pytest.importorskip("tilelang")

from dsv4fn import _backend  # noqa: E402
from dsv4fn.attend.reference import sparse_attention as ref_attention  # noqa: E402
from dsv4fn.formats import indexer_fp8, model1  # noqa: E402
from dsv4fn.index_topk.reference import paged_logits as ref_logits  # noqa: E402
from dsv4fn.index_topk.reference import select_topk  # noqa: E402
from dsv4fn.state import IndexerKeyCache, PagedKVCache  # noqa: E402

pytestmark = pytest.mark.gpu
FP8_MMA_RTOL = 1e-3  # see test_index_logits_matches_reference
SCALE = 512**-0.5

compat = importlib.import_module("dsv4fn._tilelang_compat")
attn = importlib.import_module("dsv4fn.attend.tilelang")
idx = importlib.import_module("dsv4fn.index_topk.tilelang")


@pytest.fixture(scope="module", autouse=True)
def _kernels_compiled():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hs = [(h, s) for h in (64, 128) for s in (False, True)]
    jobs = [lambda h=h, s=s: attn._kernels("ws", h, 448, 64, 64, 64, 64, SCALE, s) for h, s in hs]
    merges = [(64, 2), (128, 2), (96, 2), (64, 3), (128, 3)]
    jobs += [lambda h=h, n=n: attn._kernels("ws", h, 448, 64, 64, 64, 64, SCALE, True, True, n) for h, n in merges]
    # (h, split, pair, merge, lazy): the eager-rescale kernels (WS_LAZY off) the lazy rescale is checked against, the
    # unpaired kernels pair mode is
    more = [(64, False, True, 0, False), (64, True, False, 0, False), (64, True, False, 2, False)]
    more += [(128, False, True, 0, False), (128, False, False, 0, True), (96, False, False, 0, True)]
    jobs += [
        lambda e=e: attn._kernels_for("ws", e[0], 448, 64, 64, 64, 64, SCALE, e[1], True, e[2], e[3], e[4])
        for e in more
    ]
    jobs += [
        lambda: attn._kernels("ws", 8, 448, 64, 64, 64, 64, SCALE, False),
        lambda: attn._kernels("legacy", 64, 448, 64, 64, 64, 64, SCALE, True),
        lambda: idx._logits_kernel(64, 128, 64, *idx._LOGITS_TILING),
    ]
    tilings = (idx.CHUNK_SMALL, idx.CHUNK_LARGE, idx.CHUNK_DEEP)
    jobs += [lambda k=k, c=c: idx._chunk_topk_kernel(64, 128, 64, k, *c) for k in (512, 1024) for c in tilings]
    nt = idx.MERGE_THREADS
    jobs += [lambda k=k, c=c: idx._topk_merge_kernel(k, 64, c, nt) for k in (512, 1024) for c in (32, 64)]
    compat.precompile(jobs)


def _model1_cache(n_slots: int, page: int, gen: torch.Generator, x: torch.Tensor | None = None) -> PagedKVCache:
    """Slots 0..n_slots-1 hold random tokens (or `x`); one more page of slots holds NaN bytes (e4m3 0x7F,
    bf16 0x7F7F is finite but huge, e4m3 NaN is what matters) that must never leak into outputs."""
    pages = -(-n_slots // page) + 1
    cache = PagedKVCache.allocate(pages, page, device="cuda")
    cache.data.fill_(0x7F)
    if x is None:
        x = torch.randn(n_slots, 512, generator=gen, device="cuda") * 2
    return model1.store(cache, x.to(torch.bfloat16), torch.arange(n_slots, device="cuda", dtype=torch.int32))


def _attn_inputs(b: int, h: int, win: int, k2: int, seed: int, sink: bool = True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n1, n2 = b * win + 64, b * k2 * 2 + 64
    c1 = _model1_cache(n1, 64, g)
    c2 = _model1_cache(n2, 64, g)
    q = torch.randn(b, 1, h, 512, generator=g, device="cuda").to(torch.bfloat16)
    i1 = torch.randint(0, n1, (b, 1, win), generator=g, device="cuda", dtype=torch.int32)
    i2 = torch.randint(0, n2, (b, 1, k2), generator=g, device="cuda", dtype=torch.int32)
    l1 = torch.randint(0, win + 1, (b,), generator=g, device="cuda", dtype=torch.int32)
    l2 = torch.randint(0, k2 + 1, (b,), generator=g, device="cuda", dtype=torch.int32)
    l1[0], l2[0] = 0, 0  # an empty row: o = 0, lse = +inf
    if b > 1:
        l1[1], l2[1] = win, k2
        i2[1, 0, ::7] = -1  # holes inside the list
    if b > 2:
        l1[2], l2[2] = 1, 0  # a single key
    # columns past each row's length point at poisoned (NaN) slots
    i1 = torch.where(torch.arange(win, device="cuda") >= l1.view(b, 1, 1), n1 + 3, i1).to(torch.int32)
    i2 = torch.where(torch.arange(k2, device="cuda") >= l2.view(b, 1, 1), n2 + 5, i2).to(torch.int32)
    s = torch.randn(h, generator=g, device="cuda") if sink else None
    return q, c1, i1, l1, c2, i2, l2, s


def _check_attn(expect, got):
    report = _backend.default_compare(expect, got)
    assert report is None, report


@pytest.mark.parametrize("b", [1, 32, 128])
@pytest.mark.parametrize(("h", "k2"), [(64, 512), (128, 1024)], ids=["flash", "pro"])
def test_attention_matches_reference(b, h, k2):
    """b=1 and 32 take the split + combine path (Pro b=32 too: 2 head blocks x 32 rows), b=128 the direct one."""
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(b, h, 128, k2, seed=b + h)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
    _check_attn(ref_attention(q, c1, i1, l1, **kw), attn.sparse_attention(q, c1, i1, l1, **kw))


def _exact_dequant_inputs(n: int, seed: int) -> torch.Tensor:
    """Tokens whose 64-wide tiles span 2^-20 .. 2^25: e4m3 subnormals (scale at its 1e-4 floor) and UE8M0
    bytes above 142 (tile amax > 448 * 2^15), the two edges of the kernel's exact dequantization."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = torch.randint(-20, 26, (n, 8, 1), generator=g, device="cuda").float()
    spread = torch.rand(n, 8, 64, generator=g, device="cuda") * 14  # values down to 2^-14 of the tile's max
    sign = torch.where(torch.rand(n, 8, 64, generator=g, device="cuda") < 0.5, -1.0, 1.0)
    return (sign * torch.exp2(e - spread)).view(n, 512)


@pytest.mark.parametrize("impl", ["ws", "legacy"])
def test_attention_exact_dequant(impl, monkeypatch):
    """One key per row, no sink: softmax weight exactly 1, so o must equal the dequantized record bit for bit
    (model1.gather) in every head; lse = scale * q.k (natural log). The other 63 columns of each row point
    at NaN slots and must not leak."""
    monkeypatch.setattr(attn, "ATTN_IMPL", impl)
    b, h = 16, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    cache = _model1_cache(b * 3, 64, g, _exact_dequant_inputs(b * 3, seed=6))
    slots = torch.arange(b, device="cuda", dtype=torch.int32) * 3 + 1
    ind = torch.full((b, 1, 64), b * 3 + 7, device="cuda", dtype=torch.int32)  # NaN page
    ind[:, 0, 0] = slots
    lens = torch.ones(b, device="cuda", dtype=torch.int32)
    q = (torch.randn(b, 1, h, 512, generator=g, device="cuda") * 1e-3).to(torch.bfloat16)
    assert attn._impl_for(cache.data, cache.data, 448, 64, 64) == impl
    o, lse = attn.sparse_attention(q, cache, ind, lens, scale=SCALE)
    kv = model1.gather(cache, slots)  # bf16 [b, 512]
    # value equality (+0 == -0: the reference keeps an e4m3 -0 as -0, the fp32 accumulator of P V makes it +0)
    assert torch.equal(o, kv.view(b, 1, 1, 512).expand(b, 1, h, 512))
    dots = (q.double() @ kv.double().view(b, 1, 512, 1)).view(b, 1, h).permute(0, 2, 1)
    # fp32 accumulation of 512 products (wgmma) vs fp64: bound by the sum of |q||k|, not by |q.k|
    mag = (q.double().abs() @ kv.double().abs().view(b, 1, 512, 1)).view(b, 1, h).permute(0, 2, 1)
    assert bool(((lse.double() - dots * SCALE).abs() <= (2.0**-20 * mag + 1e-6) * SCALE).all())


def test_attention_head_tails_and_no_extra():
    """8 heads (one masked 64-row head block); 104 rows keep the single-pass kernel."""
    q, c1, i1, l1, *_ = _attn_inputs(104, 8, 128, 64, seed=8, sink=False)
    _check_attn(ref_attention(q, c1, i1, l1, scale=SCALE), attn.sparse_attention(q, c1, i1, l1, scale=SCALE))
    _check_attn(ref_attention(q, c1, i1, scale=SCALE), attn.sparse_attention(q, c1, i1, scale=SCALE))


def test_attention_cuda_graph_and_side_stream():
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(32, 64, 128, 512, seed=7)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
    eager = attn.sparse_attention(q, c1, i1, l1, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the launch must follow torch's current stream
        on_side = attn.sparse_attention(q, c1, i1, l1, **kw)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side[0], eager[0]) and torch.equal(on_side[1], eager[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.sparse_attention(q, c1, i1, l1, **kw)
    q.copy_(torch.randn_like(q.float()).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    again = attn.sparse_attention(q, c1, i1, l1, **kw)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])


@pytest.mark.parametrize("h", [128, 96], ids=["pro", "96heads"])
def test_attention_pair_mode_matches_unpaired(h, monkeypatch):
    """Two head blocks on the direct path run paired (a 2-CTA cluster: each CTA dequantizes half of every block's
    keys and bulk-copies it into the peer's K tile): the same tiles and math as the unpaired kernel, so the same
    bits - with holes, empty and one-key rows, NaN-poisoned slots past each length, a masked head tail (96) -
    eagerly and replayed from a CUDA graph with new queries."""
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(70, h, 128, 1024, seed=21)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
    assert attn.choose_splits(70, 1, h, 128, 1024, "ws") == 1 and attn._pair_mode(False)
    paired = attn.sparse_attention(q, c1, i1, l1, **kw)
    _check_attn(ref_attention(q, c1, i1, l1, **kw), paired)
    monkeypatch.setattr(attn, "WS_PAIR", "off")
    unpaired = attn.sparse_attention(q, c1, i1, l1, **kw)
    assert torch.equal(paired[0], unpaired[0]) and torch.equal(paired[1], unpaired[1])
    monkeypatch.setattr(attn, "WS_PAIR", "direct")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.sparse_attention(q, c1, i1, l1, **kw)
    q.copy_(torch.randn_like(q.float()).to(torch.bfloat16))
    out[0].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(attn, "WS_PAIR", "off")
    again = attn.sparse_attention(q, c1, i1, l1, **kw)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])


@pytest.mark.parametrize(("b", "h", "k2"), [(300, 64, 512), (140, 128, 1024)], ids=["flash", "pro-pair"])
def test_attention_next_wave_prefetch(b, h, k2, monkeypatch):
    """More rows than one wave holds (V4-Flash: 132 CTAs, V4-Pro: 66 pairs): each CTA prefetches into L2 what the
    next wave's CTA reads first (WS_PREFETCH) - rows of the next wave with an empty window (the prefetched keys come
    from the extra list), holes, an empty row, the last wave's rows (nothing after them). Prefetching never changes
    a result: the same bits with it off, and the reference's values."""
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(b, h, 128, k2, seed=b + 7)
    nxt = attn._prefetch_rows(h, torch.cuda.get_device_properties(0).multi_processor_count)
    assert 0 < nxt < b and attn.choose_splits(b, 1, h, 128, k2, "ws") == 1
    l1[nxt : nxt + 8] = 0  # window empty: the prefetch reads the extra list
    i2[nxt + 1, 0, ::3] = -1  # holes among the keys it prefetches
    l1[nxt + 2], l2[nxt + 2] = 0, 0  # an empty row
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
    got = attn.sparse_attention(q, c1, i1, l1, **kw)
    _check_attn(ref_attention(q, c1, i1, l1, **kw), got)
    monkeypatch.setattr(attn, "WS_PREFETCH", False)
    off = attn.sparse_attention(q, c1, i1, l1, **kw)
    assert torch.equal(got[0], off[0]) and torch.equal(got[1], off[1])


# key = factor x the row's query of one head: its score jumps ~1.6, 3.9, 9.8, 130 (log2)
SPIKES = (0.05, 0.12, 0.3, 4.0)


@pytest.mark.parametrize(
    ("b", "h", "k2"), [(128, 64, 512), (40, 64, 512), (4, 64, 512), (70, 128, 1024)],
    ids=["flash-direct", "flash-merge", "flash-split", "pro-pair"],
)  # fmt: skip
def test_attention_lazy_rescale_with_growing_maxima(b, h, k2, monkeypatch):
    """Rows whose running max grows block after block, by less and by more than the lazy rescale's 2^8 (keys built
    from one head's query of the row, in the extra list's blocks 1, 3, 5, 7; other heads see them as ordinary
    keys): the kernels keep a stale max while P <= 2^8 and rescale a warp's rows when one moves it - on the direct,
    cluster-merge, split + combine and pair-mode paths - against the reference, and against the eager rescale
    (WS_LAZY off)."""
    g = torch.Generator(device="cuda").manual_seed(b + h + 5)
    n1, n2 = b * 128 + 64, b * k2 * 2 + 64
    q = torch.randn(b, 1, h, 512, generator=g, device="cuda").to(torch.bfloat16)
    x2 = torch.randn(n2, 512, generator=g, device="cuda") * 2
    spike_slots = torch.arange(b * len(SPIKES), device="cuda").view(b, len(SPIKES))
    heads = torch.arange(b, device="cuda") * 7 % h  # the head each row's spikes follow
    for t, f in enumerate(SPIKES):
        x2[spike_slots[:, t]] = f * q[torch.arange(b), 0, heads].float()
    c1, c2 = _model1_cache(n1, 64, g), _model1_cache(n2, 64, g, x2)
    i1 = torch.randint(0, n1, (b, 1, 128), generator=g, device="cuda", dtype=torch.int32)
    i2 = torch.randint(len(SPIKES) * b, n2, (b, 1, k2), generator=g, device="cuda", dtype=torch.int32)
    for t in range(len(SPIKES)):
        i2[:, 0, 64 * (2 * t + 1) + 5] = spike_slots[:, t].to(torch.int32)
    l1 = torch.full((b,), 128, device="cuda", dtype=torch.int32)
    l2 = torch.full((b,), k2, device="cuda", dtype=torch.int32)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=torch.randn(h, generator=g, device="cuda"))
    kw["scale"] = SCALE
    splits = attn.choose_splits(b, 1, h, 128, k2, "ws")
    merged = attn.cluster_merge(splits, 128, k2, attn._programs(b, 1, h))
    assert (splits, merged) == {128: (1, 0), 40: (3, 2), 4: (splits, 0), 70: (1, 0)}[b] and (b != 4 or splits > 3)
    ref = ref_attention(q, c1, i1, l1, **kw)
    got = attn.sparse_attention(q, c1, i1, l1, **kw)
    _check_attn(ref, got)
    monkeypatch.setattr(attn, "WS_LAZY", False)
    eager = attn.sparse_attention(q, c1, i1, l1, **kw)
    _check_attn(ref, eager)
    _check_attn(eager, got)  # P rounded to bf16 against another max: within the tolerance of each other


@pytest.mark.parametrize(
    ("b", "h", "k2", "ns"),
    [(64, 64, 512, 2), (40, 64, 512, 2), (32, 128, 1024, 2), (24, 96, 1024, 2), (32, 64, 512, 3), (16, 128, 1024, 3)],
    ids=["flash-b64", "flash-b40", "pro-b32", "96heads-b24", "flash-b32", "pro-b16"],
)
def test_attention_cluster_merge(b, h, k2, ns, monkeypatch):
    """The split path merged in a cluster of `ns` CTAs (3: output rows shared between CTAs mid-row; flash b40: 3
    splits by the heuristic, merged in 2) against the reference and against partials + combine over the same
    splits (the same math summed in another order: equal LSEs, outputs within one bf16 rounding); deterministic,
    and replayed from a CUDA graph into NaN-poisoned outputs with new queries. Holes, empty and one-key rows,
    NaN-poisoned slots past each length, a masked head tail (96)."""
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(b, h, 128, k2, seed=b + h + 1)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
    assert attn.cluster_merge(attn.choose_splits(b, 1, h, 128, k2, "ws"), 128, k2, b * -(-h // 64)) == ns
    expect = ref_attention(q, c1, i1, l1, **kw)
    merged = attn.sparse_attention(q, c1, i1, l1, **kw)
    _check_attn(expect, merged)
    again = attn.sparse_attention(q, c1, i1, l1, **kw)
    assert torch.equal(merged[0], again[0]) and torch.equal(merged[1], again[1])
    monkeypatch.setattr(attn, "CLUSTER_MERGE", False)
    monkeypatch.setattr(attn, "FORCE_SPLITS", ns)  # the combine over the same splits
    combined = attn.sparse_attention(q, c1, i1, l1, **kw)
    _check_attn(expect, combined)
    torch.testing.assert_close(merged[1], combined[1], rtol=1e-6, atol=0)
    mo, co = merged[0].float(), combined[0].float()
    assert bool(((mo - co).abs() <= co.abs().maximum(mo.abs()) * 2**-7 + 1e-6).all())
    monkeypatch.setattr(attn, "CLUSTER_MERGE", True)
    monkeypatch.setattr(attn, "FORCE_SPLITS", None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.sparse_attention(q, c1, i1, l1, **kw)
    q.copy_(torch.randn_like(q.float()).to(torch.bfloat16))
    out[0].fill_(float("nan"))
    out[1].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    eager = attn.sparse_attention(q, c1, i1, l1, **kw)
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    _check_attn(ref_attention(q, c1, i1, l1, **kw), eager)


def test_no_recompile_per_batch_size():
    """Batch, query count, index widths, cache sizes and split count are symbolic: new sizes reuse the
    compiled kernels (TileLang's JIT caches and `_kernels` do not grow)."""
    jits = (attn._attend_ws_kernel, attn._combine_kernel, idx._logits_kernel)
    before = [len(j._kernel_cache) for j in jits], attn._kernels_for.cache_info().currsize
    for b, k2 in ((3, 64), (5, 192), (60, 256), (100, 128), (101, 320)):  # split: merged in 3s, 3s, 2s; direct
        q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(b, 64, 128, k2, seed=b)
        kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=SCALE)
        attn.sparse_attention(q, c1, i1, l1, **kw)
    for t, n in ((3, 1000), (7, 2048)):
        q8, w, cache, pt, req, vis = _indexer_inputs(t, n, seed=t)
        idx.paged_logits(q8, w, cache, pt, req, vis, n)
    torch.cuda.synchronize()
    assert ([len(j._kernel_cache) for j in jits], attn._kernels_for.cache_info().currsize) == before


def test_attention_opcheck():
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(2, 64, 128, 64, seed=3)
    args = (q, c1.data, i1, l1, c2.data, i2, l2, s, 64, 64, 448, 64, 64, SCALE)
    torch.library.opcheck(torch.ops.dsv4fn.tl_sparse_attention, args, test_utils=("test_schema", "test_faketensor"))


# ---- indexer -----------------------------------------------------------------------------------


def _indexer_inputs(t: int, n_keys: int, seed: int, hi: int = 64, di: int = 128, page: int = 64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = -(-n_keys // page)
    cache = IndexerKeyCache.allocate(t * blocks + 1, page, dim=di, device="cuda")
    perm = torch.randperm(t * blocks, generator=g, device="cuda").to(torch.int32) + 1
    page_table = perm.view(t, blocks)
    keys = torch.randn(t * blocks * page, di, generator=g, device="cuda")
    slots = (page_table.view(-1, 1) * page + torch.arange(page, device="cuda")).view(-1).to(torch.int32)
    cache = indexer_fp8.store(cache, keys, slots)
    q8, _ = indexer_fp8.quantize_rows(torch.randn(t, hi, di, generator=g, device="cuda"))
    w = torch.randn(t, hi, generator=g, device="cuda") * 0.1
    visible = torch.randint(1, n_keys + 1, (t,), generator=g, device="cuda", dtype=torch.int32)
    visible[0] = n_keys
    if t > 1:
        visible[1] = min(300, n_keys)  # at most topk: all entries in order
    if t > 4 and n_keys >= 8192:
        visible[2], visible[3], visible[4] = 0, 4096 + 100, 513  # nothing; a short last chunk; topk + 1
    req = torch.arange(t, device="cuda", dtype=torch.int32)
    return q8, w.contiguous(), cache, page_table.contiguous(), req, visible


@pytest.mark.parametrize(("t", "n_keys"), [(1, 4096), (32, 16384), (128, 8192)])
def test_index_logits_matches_reference(t, n_keys):
    q8, w, cache, pt, req, vis = _indexer_inputs(t, n_keys, seed=t)
    expect = ref_logits(q8, w, cache, pt, req, vis, n_keys)
    got = idx.paged_logits(q8, w, cache, pt, req, vis, n_keys)
    assert torch.equal(torch.isinf(expect), torch.isinf(got))
    fin = torch.isfinite(expect)
    # Looser than fp32's 1e-5: Hopper's FP8 tensor cores accumulate q8.k8 with a reduced-precision
    # (~2^-13 relative) adder, not in full fp32 (the reason DeepGEMM compares by correlation). Measured
    # worst error ~2e-4 of the largest |logit|; allow 1e-3 of each row's largest |logit|.
    scale = expect.masked_fill(~fin, 0).abs().amax(-1, keepdim=True)
    err = (expect - got).masked_fill(~fin, 0).abs()
    worst = int(err.argmax())
    assert bool((err <= FP8_MMA_RTOL * scale + 1e-6).all()), (err.view(-1)[worst].item(), scale.max().item())


_TILINGS = {"small": idx.CHUNK_SMALL, "large": idx.CHUNK_LARGE, "deep": idx.CHUNK_DEEP}


def _check_topk_sets(q8, w, cache, pt, req, vis, n_keys, topk, width, g_idx, g_len):
    logits = ref_logits(q8, w, cache, pt, req, vis, n_keys)
    e_idx, e_len = select_topk(logits, vis, topk, width, pt, req, cache.page_size)
    assert torch.equal(e_len, g_len)
    trivial = vis <= topk
    assert torch.equal(g_idx[trivial], e_idx[trivial])  # all entries, in order, -1 padded
    # sets per row; a differing entry is allowed only when its logit ties the k-th within fp32 noise
    page = cache.page_size
    for r in torch.nonzero(~trivial).view(-1).tolist():
        es, gs = set(e_idx[r].tolist()) - {-1}, set(g_idx[r].tolist()) - {-1}
        assert len(gs) == len(es) == topk and -1 not in g_idx[r, :topk].tolist()
        if es != gs:
            row = logits[r]
            kth = torch.topk(row, topk).values[-1].item()
            tol = FP8_MMA_RTOL * row[torch.isfinite(row)].abs().max().item() + 1e-6  # kernel logits' precision
            j = torch.arange(n_keys, device="cuda")
            slot = (pt[r].long()[j // page] * page + j % page).tolist()
            slot_logit = dict(zip(slot[: int(vis[r])], row[: int(vis[r])].tolist(), strict=True))
            for sl in es ^ gs:
                assert sl in slot_logit, (r, sl)
                assert abs(slot_logit[sl] - kth) <= tol, (r, sl, slot_logit[sl], kth)
    assert torch.all(g_idx[:, topk:] == -1)


@pytest.mark.parametrize("topk", [512, 1024])
@pytest.mark.parametrize(("t", "n_keys"), [(1, 4096), (32, 16384), (128, 8192)])
@pytest.mark.parametrize("tiling", ["small", "large", "deep"])
def test_index_topk_fused_matches_reference_sets(t, n_keys, topk, tiling, monkeypatch):
    """Chunks of 2048 (small) or 4096 keys (large: one page a step; deep: four): 1 to 8 per token; rows with
    nothing visible, a short last chunk, top-k + 1."""
    monkeypatch.setattr(idx, "FORCE_CHUNK_TILING", _TILINGS[tiling])
    q8, w, cache, pt, req, vis = _indexer_inputs(t, n_keys, seed=t + topk)
    width = topk + 64
    g_idx, g_len = idx.index_topk_fused(q8, w, cache, pt, req, vis, topk, width, max_visible=n_keys)
    _check_topk_sets(q8, w, cache, pt, req, vis, n_keys, topk, width, g_idx, g_len)


def test_index_topk_fused_unstaged_merge(monkeypatch):
    """256k keys in 2048-key chunks: 65536 candidates a row, more than the merge stages in shared memory (it reads
    them from global memory)."""
    monkeypatch.setattr(idx, "FORCE_CHUNK_TILING", idx.CHUNK_SMALL)
    n_keys = 262144
    assert -(-n_keys // (idx.CHUNK_SMALL[0] * 64)) * 512 > idx.MERGE_STAGE
    q8, w, cache, pt, req, vis = _indexer_inputs(2, n_keys, seed=9)
    vis[1] = n_keys - 1000
    g_idx, g_len = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 576, max_visible=n_keys)
    _check_topk_sets(q8, w, cache, pt, req, vis, n_keys, 512, 576, g_idx, g_len)


@pytest.mark.parametrize("tiling", ["small", "large", "deep"])
def test_index_topk_fused_heavy_ties(tiling, monkeypatch):
    """Every row's pages are drawn from three pages, so each logit value repeats ~n/192 times: the k-th is
    tied many times over (the radix select's last digit and its tie order, never an early exit)."""
    monkeypatch.setattr(idx, "FORCE_CHUNK_TILING", _TILINGS[tiling])
    q8, w, cache, pt, req, vis = _indexer_inputs(8, 16384, seed=5)
    g = torch.Generator(device="cuda").manual_seed(6)
    pick = torch.randint(0, 3, pt.shape, generator=g, device="cuda")
    pt = torch.gather(pt, 1, pick).contiguous()
    vis.fill_(16384)
    g_idx, g_len = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=16384)
    assert torch.equal(g_len, torch.full_like(g_len, 512))
    logits = ref_logits(q8, w, cache, pt, req, vis, 16384)
    top = torch.topk(logits, 512, dim=-1).values
    kth = top[:, -1:]
    # slots repeat across a row here, so compare logits: the selected multiset is the top-512 multiset
    j = torch.arange(16384, device="cuda")
    slot_of = pt.long()[:, j // 64] * 64 + j % 64  # [t, n]
    for r in range(8):
        lg_of_slot = dict(zip(slot_of[r].tolist(), logits[r].tolist(), strict=True))
        got = torch.tensor([lg_of_slot[s] for s in g_idx[r].tolist()], device="cuda")
        tol = FP8_MMA_RTOL * logits[r].abs().max().item() + 1e-6
        assert bool((got >= kth[r] - tol).all()), r
        assert abs(got.sum().item() - top[r].sum().item()) <= 512 * tol, r


def test_index_topk_fused_cuda_graph_deterministic_and_opcheck():
    q8, w, cache, pt, req, vis = _indexer_inputs(32, 16384, seed=11)
    eager = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=16384)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=16384)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager[1], out[1]) and torch.equal(eager[0], out[0])  # no atomics: same order too
    # opcheck's schema test multiplies the inputs, which torch cannot do for fp8 tensors: fake-tensor only
    args = (q8, w, cache.data, pt, req, vis, 64, 512, 512, 16384)
    torch.library.opcheck(torch.ops.dsv4fn.tl_index_topk_fused, args, test_utils=("test_faketensor",))
    largs = (q8, w, cache.data, pt, req, vis, 64, 16384)
    torch.library.opcheck(torch.ops.dsv4fn.tl_index_logits, largs, test_utils=("test_faketensor",))


def test_out_idx_workaround_real_compile():
    """One `compat.jit` factory compiling two functions with different parameter counts."""
    T = compat.T

    @compat.jit(out_idx=[-1])
    def factory(n: int, three: bool):
        if three:

            @T.prim_func
            def f3(A: T.Tensor[(n,), T.float32], B: T.Tensor[(n,), T.float32], C: T.Tensor[(n,), T.float32]):
                with T.Kernel(1, threads=32):
                    for i in T.Parallel(n):
                        C[i] = A[i] + B[i]

            return f3

        @T.prim_func
        def f2(A: T.Tensor[(n,), T.float32], C: T.Tensor[(n,), T.float32]):
            with T.Kernel(1, threads=32):
                for i in T.Parallel(n):
                    C[i] = A[i] * 2

        return f2

    a = torch.randn(32, device="cuda")
    assert torch.equal(factory(32, True)(a, a), a + a)
    assert torch.equal(factory(32, False)(a), a * 2)
