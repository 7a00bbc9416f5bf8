"""Reference indexer: brute-force logits + torch.topk (sets per row), causal rule, short sequences."""

import torch

from dsv4fn import DSV4Config, IndexerKeyCache, index_logits, index_topk, plan, prepare_query, store_index_keys
from dsv4fn.norm_rope import hadamard_matrix, rope_cos_sin, rope_frequencies

CFG = DSV4Config.tiny().with_(index_topk=6, index_pad=8)


def _setup(prefix, extend, seed):
    gen = torch.Generator().manual_seed(seed)
    b = len(prefix)
    longest = max(p + e for p, e in zip(prefix, extend, strict=True))
    nblk = -(-longest // CFG.block_size)
    pt = torch.randperm(b * nblk, generator=gen).int().view(b, nblk)
    n_swa = -(-longest // CFG.swa_page_size)
    meta = plan(CFG, prefix, extend, pt, torch.arange(b * n_swa, dtype=torch.int32).view(b, n_swa))
    page = CFG.compressed_page_size(4)
    cache = IndexerKeyCache.allocate(b * nblk, page, dim=CFG.index_head_dim)
    keys = torch.randn(b, longest // 4, CFG.index_head_dim, generator=gen)
    for r in range(b):
        j = torch.arange(longest // 4)
        cache = store_index_keys(cache, keys[r], (pt[r, j // page] * page + j % page).int())
    t = meta.num_tokens
    qi = torch.randn(t, CFG.index_heads, CFG.index_head_dim, generator=gen).bfloat16()
    w = torch.randn(t, CFG.index_heads, generator=gen)
    cos, sin = rope_cos_sin(rope_frequencies(CFG, 4), meta.positions)
    q8, wq = prepare_query(qi, w, cos, sin, CFG.index_weight_scale)
    return meta, cache, keys, qi, w, q8, wq, pt


def test_logits_and_topk_match_brute_force():
    prefix, extend = [0, 50, 7], [30, 1, 3]
    meta, cache, keys, qi, w, q8, wq, pt = _setup(prefix, extend, 0)
    logits = index_logits(q8, wq, cache, meta)
    idx, lens = index_topk(q8, wq, cache, meta)
    page = CFG.compressed_page_size(4)
    for t in range(meta.num_tokens):
        b, p = int(meta.token_request[t]), int(meta.positions[t])
        n = (p + 1) // 4  # causal rule: entries j < (p + 1) // 4
        # brute force from the stored FP8 keys (dequantized) and the FP8 query
        k8 = (
            torch.stack([cache.data[int(pt[b, j // page])][(j % page) * 64 : (j % page + 1) * 64] for j in range(n)])
            if n
            else torch.zeros(0, 64, dtype=torch.uint8)
        )
        sc = (
            torch.stack(
                [
                    cache.data[int(pt[b, j // page])][page * 64 + 4 * (j % page) : page * 64 + 4 * (j % page) + 4].view(
                        torch.float32
                    )[0]
                    for j in range(n)
                ]
            )
            if n
            else torch.zeros(0)
        )
        dots = q8[t].double() @ k8.view(torch.float8_e4m3fn).double().T  # [h, n]
        want = (dots.relu() * wq[t].double()[:, None]).sum(0) * sc.double()
        assert torch.allclose(logits[t, :n].double(), want, rtol=1e-6, atol=1e-9)
        assert logits[t, n:].isneginf().all()
        assert int(lens[t]) == min(n, CFG.index_topk)
        sel = [int(v) for v in idx[t] if v >= 0]
        assert len(sel) == int(lens[t]) and all(int(v) == -1 for v in idx[t, len(sel) :])
        if n <= CFG.index_topk:
            assert sel == [int(pt[b, j // page]) * page + j % page for j in range(n)]
        else:
            top = torch.topk(want, CFG.index_topk).indices.tolist()
            want_slots = {int(pt[b, j // page]) * page + j % page for j in top}
            kth = torch.topk(want, CFG.index_topk).values[-1]
            diff = set(sel) ^ want_slots
            for s in diff:  # only ties at the boundary may differ
                j = next(j for j in range(n) if int(pt[b, j // page]) * page + j % page == s)
                assert abs(want[j] - kth) <= 1e-6 * abs(kth) + 1e-12


def test_fp8_logits_track_exact_logits():
    """The FP8 path approximates Σ_h w_h relu(q_h · k_j) on the unquantized rotated vectors."""
    prefix, extend = [0], [64]
    meta, cache, keys, qi, w, q8, wq, pt = _setup(prefix, extend, 1)
    logits = index_logits(q8, wq, cache, meta)
    cos, sin = rope_cos_sin(rope_frequencies(CFG, 4), meta.positions)
    from dsv4fn.norm_rope import apply_rope

    q = apply_rope(qi.float(), cos[:, None], sin[:, None]).double() @ hadamard_matrix(64) / 8
    k = keys[0].double()  # stored as given (this test bypasses the compressor's rotation)
    exact = ((q @ k.T).relu() * w.double()[:, :, None]).sum(1) * CFG.index_weight_scale
    vis = torch.arange(16)[None, :] < ((meta.positions + 1) // 4)[:, None]
    rel = (logits[:, :16].double() - exact)[vis].norm() / exact[vis].norm()
    assert rel < 0.08, rel
