"""TileLang kernels on the GPU: numerics vs the torch reference at V4-Flash / V4-Pro sizes, CUDA-graph
capture, the stream workaround, opcheck, and the fused indexer top-k vs the reference sets."""

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

attn = importlib.import_module("dsv4fn.attend.tilelang")
idx = importlib.import_module("dsv4fn.index_topk.tilelang")


def _model1_cache(n_slots: int, page: int, gen: torch.Generator) -> PagedKVCache:
    """Slots 0..n_slots-1 hold random tokens; one more page of slots holds NaN bytes (e4m3 0x7F,
    bf16 0x7F7F is finite but huge, e4m3 NaN is what matters) that must never leak into outputs."""
    pages = -(-n_slots // page) + 1
    cache = PagedKVCache.allocate(pages, page, device="cuda")
    cache.data.fill_(0x7F)
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
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(b, h, 128, k2, seed=b + h)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=512**-0.5)
    _check_attn(ref_attention(q, c1, i1, l1, **kw), attn.sparse_attention(q, c1, i1, l1, **kw))


@pytest.mark.parametrize("h", [8, 96])
def test_attention_head_tails_and_no_extra(h):
    q, c1, i1, l1, *_ = _attn_inputs(4, h, 128, 64, seed=h, sink=False)
    _check_attn(ref_attention(q, c1, i1, l1, scale=0.07), attn.sparse_attention(q, c1, i1, l1, scale=0.07))
    _check_attn(ref_attention(q, c1, i1, scale=0.07), attn.sparse_attention(q, c1, i1, scale=0.07))


def test_attention_cuda_graph_and_side_stream():
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(32, 64, 128, 512, seed=7)
    kw = dict(extra_cache=c2, extra_indices=i2, extra_lens=l2, sink=s, scale=512**-0.5)
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


def test_attention_opcheck():
    q, c1, i1, l1, c2, i2, l2, s = _attn_inputs(2, 64, 128, 64, seed=3)
    args = (q, c1.data, i1, l1, c2.data, i2, l2, s, 64, 64, 448, 64, 64, 512**-0.5)
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


@pytest.mark.parametrize("topk", [512, 1024])
@pytest.mark.parametrize(("t", "n_keys"), [(1, 4096), (32, 16384), (128, 8192)])
def test_index_topk_fused_matches_reference_sets(t, n_keys, topk):
    q8, w, cache, pt, req, vis = _indexer_inputs(t, n_keys, seed=t + topk)
    width = topk
    logits = ref_logits(q8, w, cache, pt, req, vis, n_keys)
    e_idx, e_len = select_topk(logits, vis, topk, width, pt, req, cache.page_size)
    g_idx, g_len = idx.index_topk_fused(q8, w, cache, pt, req, vis, topk, width, max_visible=n_keys)
    assert torch.equal(e_len, g_len)
    trivial = vis <= topk
    assert torch.equal(g_idx[trivial], e_idx[trivial])  # all entries, in order
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
            slot_logit = dict(zip(slot, row.tolist(), strict=True))
            for sl in es ^ gs:
                assert abs(slot_logit[sl] - kth) <= tol, (r, sl, slot_logit[sl], kth)
    assert torch.all(g_idx[:, topk:] == -1)


def test_index_topk_fused_cuda_graph_and_opcheck():
    q8, w, cache, pt, req, vis = _indexer_inputs(32, 16384, seed=11)
    eager = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=16384)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = idx.index_topk_fused(q8, w, cache, pt, req, vis, 512, 512, max_visible=16384)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager[1], out[1])
    assert torch.equal(eager[0].sort(-1).values, out[0].sort(-1).values)
    # opcheck's schema test multiplies the inputs, which torch cannot do for fp8 tensors: fake-tensor only
    args = (q8, w, cache.data, pt, req, vis, 64, 512, 512, 16384)
    torch.library.opcheck(torch.ops.dsv4fn.tl_index_topk_fused, args, test_utils=("test_faketensor",))
    largs = (q8, w, cache.data, pt, req, vis, 64, 16384)
    torch.library.opcheck(torch.ops.dsv4fn.tl_index_logits, largs, test_utils=("test_faketensor",))


def test_out_idx_workaround_real_compile():
    """One `compat.jit` factory compiling two functions with different parameter counts."""
    compat = importlib.import_module("dsv4fn._tilelang_compat")
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
