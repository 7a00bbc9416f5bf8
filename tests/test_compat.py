"""Drop-in entry points: FlashMLA's and DeepGEMM's signatures and documented semantics."""

import pytest
import torch

from dsv4fn import IndexerKeyCache, PagedKVCache, store_index_keys, store_kv
from dsv4fn.compat import deep_gemm, flash_mla
from dsv4fn.formats import indexer_fp8, model1


def _model1_cache(nb: int, page: int, gen: torch.Generator):
    c = PagedKVCache.allocate(nb, page)
    x = torch.randn(nb * page, 512, generator=gen).bfloat16()
    c = store_kv(c, x, torch.arange(nb * page, dtype=torch.int32))
    return c, model1.dequantize_cache(c).double()


def _flashmla_ref(q, kv_all, idx, lens, kv2, idx2, lens2, sink, scale):
    """FlashMLA tests/ref.py semantics, row by row in fp64."""
    b, s_q, h, d = q.shape
    out = torch.zeros(b, s_q, h, d, dtype=torch.float64)
    lse = torch.full((b, h, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        for s in range(s_q):
            keys = []
            for kv, ix, ln in ((kv_all, idx, lens), (kv2, idx2, lens2)):
                if kv is None:
                    continue
                n = ix.shape[-1] if ln is None else int(ln[i])
                keys += [kv[j] for j in ix[i, s, :n].tolist() if j >= 0]
            if not keys:
                continue
            k = torch.stack(keys)
            sc = q[i, s].double() @ k.T * scale  # [h, n]
            l = torch.logsumexp(sc, -1)
            o = torch.softmax(sc, -1) @ k
            if sink is not None:
                o = o * (torch.exp(l) / (torch.exp(l) + torch.exp(sink.double())))[:, None]
            out[i, s], lse[i, :, s] = o, l
    return out, lse


@pytest.mark.parametrize("s_q", [1, 2])
def test_flash_mla_with_kvcache_matches_flashmla_semantics(s_q):
    gen = torch.Generator().manual_seed(s_q)
    swa, kv1 = _model1_cache(3, 64, gen)
    c4, kv2 = _model1_cache(4, 32, gen)
    b, h = 4, 16
    q = torch.randn(b, s_q, h, 512, generator=gen).bfloat16()
    idx = torch.randint(0, 192, (b, s_q, 64), generator=gen, dtype=torch.int32)
    idx[0] = -1  # all indices -1 in the main list of row 0
    idx2 = torch.randint(0, 128, (b, s_q, 64), generator=gen, dtype=torch.int32)
    topk_length = torch.tensor([64, 37, 0, 64], dtype=torch.int32)  # shorter than the list; zero length
    extra_len = torch.tensor([0, 5, 0, 63], dtype=torch.int32)  # row 0, 2: nothing at all to attend
    sink = torch.randn(h, generator=gen)
    meta, _ = flash_mla.get_mla_metadata(torch.zeros(1), 64, 1)
    kw = dict(
        is_fp8_kvcache=True,
        indices=idx,
        attn_sink=sink,
        extra_k_cache=c4.as_flashmla(),
        extra_indices_in_kvcache=idx2,
        topk_length=topk_length,
        extra_topk_length=extra_len,
    )
    out, lse = flash_mla.flash_mla_with_kvcache(
        q, swa.as_flashmla().view(torch.float8_e4m3fn), None, None, 512, meta, **kw
    )
    ro, rl = _flashmla_ref(q, kv1, idx, topk_length, kv2, idx2, extra_len, sink, 512**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (b, s_q, h, 512)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, s_q)
    assert torch.isposinf(lse[0]).all() and torch.isposinf(lse[2]).all() and out[[0, 2]].eq(0).all()
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse.double()[fin] - rl[fin]).abs().max() <= 1e-5
    rel = (out.double() - ro).norm() / ro.norm()
    assert rel <= 5e-3
    # the scheduler object pins shapes, as FlashMLA's does
    flash_mla.flash_mla_with_kvcache(q, swa.as_flashmla(), None, None, 512, meta, **kw)
    with pytest.raises(ValueError, match=r"shapes .* changed"):
        flash_mla.flash_mla_with_kvcache(
            q[:2],
            swa.as_flashmla(),
            None,
            None,
            512,
            meta,
            **{
                **kw,
                "indices": idx[:2],
                "extra_indices_in_kvcache": idx2[:2],
                "topk_length": topk_length[:2],
                "extra_topk_length": extra_len[:2],
            },
        )


def test_flash_mla_rejections():
    gen = torch.Generator().manual_seed(0)
    swa, _ = _model1_cache(1, 64, gen)
    q = torch.randn(1, 1, 8, 512).bfloat16()
    meta, _ = flash_mla.get_mla_metadata()
    idx = torch.zeros(1, 1, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="dense FlashMLA mode"):
        flash_mla.flash_mla_with_kvcache(
            q, swa.as_flashmla(), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 512, meta
        )
    with pytest.raises(ValueError, match="656-byte"):
        flash_mla.flash_mla_with_kvcache(
            q, torch.zeros(1, 64, 1, 656, dtype=torch.uint8), None, None, 512, meta, is_fp8_kvcache=True, indices=idx
        )
    with pytest.raises(ValueError, match="head_dim_v: expected 512"):
        flash_mla.flash_mla_with_kvcache(q, swa.as_flashmla(), None, None, 448, meta, is_fp8_kvcache=True, indices=idx)
    with pytest.raises(ValueError, match="causal"):
        flash_mla.flash_mla_with_kvcache(
            q, swa.as_flashmla(), None, None, 512, meta, causal=True, is_fp8_kvcache=True, indices=idx
        )


def _deepgemm_ref(q, kv_cache, weights, context_lens, block_table, max_len):
    """DeepGEMM's documented paged MQA logits, per row in fp64 (causal over next_n for 1-D lens)."""
    b, next_n, h, d = q.shape
    page = kv_cache.shape[1]
    out = torch.full((b * next_n, max_len), float("-inf"), dtype=torch.float64)
    for i in range(b):
        for n in range(next_n):
            L = int(context_lens[i, n]) if context_lens.dim() == 2 else int(context_lens[i]) - next_n + n + 1
            for j in range(min(max(L, 0), max_len)):
                blk = kv_cache[int(block_table[i, j // page])]
                vals = blk.view(-1)[: page * d].view(page, d)[j % page].view(torch.float8_e4m3fn).double()
                s = blk.view(-1)[page * d :].view(torch.float32)[j % page].double()
                out[i * next_n + n, j] = ((q[i, n].double() @ vals).relu() * weights[i * next_n + n].double()).sum() * s
    return out


@pytest.mark.parametrize("two_d", [False, True])
def test_fp8_paged_mqa_logits_matches_deepgemm_semantics(two_d):
    gen = torch.Generator().manual_seed(3)
    b, next_n, h, d, page, nb = 3, 2, 8, 128, 64, 6
    cache = IndexerKeyCache.allocate(nb, page, dim=d)
    cache = store_index_keys(
        cache, torch.randn(nb * page, d, generator=gen), torch.arange(nb * page, dtype=torch.int32)
    )
    kv = cache.as_deepgemm()
    q8, _ = indexer_fp8.quantize_rows(torch.randn(b, next_n, h, d, generator=gen))
    w = torch.randn(b * next_n, h, generator=gen)
    bt = torch.randperm(nb, generator=gen).int()[: b * 2].view(b, 2)
    lens = (
        torch.tensor([[1, 2], [70, 0], [128, 100]], dtype=torch.int32)
        if two_d
        else torch.tensor([1, 70, 128], dtype=torch.int32)
    )  # 1 with next_n 2: the first draft row sees nothing
    sched = deep_gemm.get_paged_mqa_logits_metadata(lens, 64, 132)
    got = deep_gemm.fp8_paged_mqa_logits(q8, kv, w, lens, bt, sched, 128, clean_logits=True)
    want = _deepgemm_ref(q8, kv, w, lens, bt, 128)
    assert got.shape == (b * next_n, 128) and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got.double()[fin], want[fin], rtol=1e-5, atol=1e-6)
