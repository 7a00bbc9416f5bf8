"""Reference sparse attention: equals dense softmax attention under the equivalent mask, with the sink."""

import pytest
import torch

from dsv4fn import PagedKVCache, attend
from dsv4fn.formats import model1


def _cache(
    n_pages: int, page: int, nope: int, rope: int, tile: int, gen: torch.Generator
) -> tuple[PagedKVCache, torch.Tensor]:
    c = PagedKVCache.allocate(n_pages, page, nope_dim=nope, rope_dim=rope, tile=tile)
    x = torch.randn(n_pages * page, nope + rope, generator=gen).bfloat16()
    c = model1.store(c, x, torch.arange(n_pages * page, dtype=torch.int32))
    return c, model1.dequantize_cache(c).double()


def _dense(q, kv_all, mask, sink, scale):
    """Dense attention over every slot of the (concatenated) caches with a boolean mask [b, s_q, n]."""
    s = torch.einsum("bshd,nd->bshn", q.double(), kv_all) * scale
    s = s.masked_fill(~mask[:, :, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    o = torch.einsum("bshn,nd->bshd", e, kv_all) / den
    lse = (m + den.log()).squeeze(-1)
    o = o * torch.sigmoid(lse - sink.double()[None, None, :]).unsqueeze(-1)
    empty = ~mask.any(-1)
    o[empty] = 0
    lse[empty] = float("inf")
    return o, lse.permute(0, 2, 1)


@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("geom", [(32, 32, 32), (448, 64, 64)], ids=["tiny", "model1"])
def test_sparse_equals_dense_under_mask(s_q, geom):
    gen = torch.Generator().manual_seed(s_q)
    nope, rope, tile = geom
    d = nope + rope
    b, h = 3, 8
    c1, kv1 = _cache(4, 16, nope, rope, tile, gen)
    c2, kv2 = _cache(3, 8, nope, rope, tile, gen)
    n1, n2 = kv1.shape[0], kv2.shape[0]
    q = torch.randn(b, s_q, h, d, generator=gen).bfloat16()
    idx1 = torch.stack([torch.randperm(n1, generator=gen)[:24] for _ in range(b * s_q)]).view(b, s_q, 24).int()
    idx2 = torch.stack([torch.randperm(n2, generator=gen)[:16] for _ in range(b * s_q)]).view(b, s_q, 16).int()
    idx1[0, 0, 5] = -1
    idx2[1, -1, :3] = -1
    lens1 = torch.tensor([24, 10, 0], dtype=torch.int32)
    lens2 = torch.tensor([16, 16, 5], dtype=torch.int32)
    sink = torch.randn(h, generator=gen)
    scale = d**-0.5
    o, lse = attend(q, c1, idx1, lens1, extra_cache=c2, extra_indices=idx2, extra_lens=lens2, sink=sink, scale=scale)
    mask = torch.zeros(b, s_q, n1 + n2, dtype=torch.bool)
    for bi in range(b):
        for si in range(s_q):
            for j in idx1[bi, si, : lens1[bi]].tolist():
                if j >= 0:
                    mask[bi, si, j] = True
            for j in idx2[bi, si, : lens2[bi]].tolist():
                if j >= 0:
                    mask[bi, si, n1 + j] = True
    ro, rlse = _dense(q, torch.cat([kv1, kv2]), mask, sink, scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin].double(), rlse[fin], atol=1e-5, rtol=1e-6)
    err = (o.double() - ro).square().mean().sqrt() / ro.square().mean().sqrt()
    assert err < 5e-3, err
    assert (o.double() - ro).abs().max() <= 2**-7 * ro.abs().max()  # bf16 rounding only


def test_empty_rows_nan_isolation_and_selected_nan():
    gen = torch.Generator().manual_seed(5)
    c, _ = _cache(2, 16, 32, 32, 32, gen)
    rec, sc = model1._split_page(c)
    rec[1, 3, :] = 0x7F  # NaN e4m3 bytes and NaN bf16 rope in slot 19
    q = torch.randn(3, 1, 4, 64, generator=gen).bfloat16()
    idx = torch.tensor([[[0, 1, 19, -1]], [[-1, -1, -1, -1]], [[19, 2, 3, 4]]], dtype=torch.int32)
    lens = torch.tensor([2, 4, 4], dtype=torch.int32)  # row 0 stops before the NaN slot
    o, lse = attend(q, c, idx, lens, sink=torch.zeros(4))
    assert torch.isfinite(o[0]).all() and torch.isfinite(lse[0]).all()
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isposinf(lse[1]).all()
    assert torch.isnan(o[2]).all(), "a NaN in a selected slot must show up"
    o0, lse0 = attend(q[:1], c, idx[:1, :, :2], sink=torch.zeros(4))
    assert torch.equal(o0, o[:1]) and torch.equal(lse0, lse[:1])


def test_rows_are_independent_of_the_batch():
    gen = torch.Generator().manual_seed(6)
    c, _ = _cache(4, 16, 448, 64, 64, gen)
    q = torch.randn(5, 1, 16, 512, generator=gen).bfloat16()
    idx = torch.randint(-1, 64, (5, 1, 32), generator=gen, dtype=torch.int32)
    sink = torch.randn(16, generator=gen)
    o_all, l_all = attend(q, c, idx, sink=sink)
    for i in range(5):
        oi, li = attend(q[i : i + 1], c, idx[i : i + 1], sink=sink)
        assert torch.equal(o_all[i : i + 1], oi) and torch.equal(l_all[i : i + 1], li)
