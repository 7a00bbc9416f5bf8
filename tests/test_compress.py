"""Compressor reference: chunking invariance (bitwise), a loop-per-token oracle, hand-checked cases."""

import random

import pytest
import torch

from dsv4fn import DSV4Config, compress, plan
from dsv4fn.compress import CompressorParams
from dsv4fn.compress.reference import pool
from dsv4fn.formats import model1
from dsv4fn.norm_rope import rope_frequencies
from dsv4fn.state import PagedKVCache

CFG = DSV4Config.tiny()


def _params(ratio: int, dim: int, overlap: bool, hidden: int, seed: int) -> CompressorParams:
    g = torch.Generator().manual_seed(seed)
    coff = 2 if overlap else 1
    return CompressorParams(
        wkv=(torch.randn(coff * dim, hidden, generator=g) * hidden**-0.5).bfloat16(),
        wgate=(torch.randn(coff * dim, hidden, generator=g) * hidden**-0.5).bfloat16(),
        ape=torch.randn(ratio, coff * dim, generator=g),
        norm=1 + 0.1 * torch.randn(dim, generator=g),
        ratio=ratio,
        dim=dim,
        overlap=overlap,
        rotate=False,
    )


def _run_steps(p: CompressorParams, xs: list[torch.Tensor], steps: list[list[int]], cfg=CFG):
    """Feed each request's tokens in the given chunk sizes (steps[k][b] tokens of request b at step k).
    Returns (final state, per-request entries bf16 [L // r, dc] in window order, cache)."""
    nb = len(xs)
    blocks = max(x.shape[0] for x in xs) // cfg.block_size + 2
    pt = torch.arange(nb * blocks, dtype=torch.int32).view(nb, blocks)
    sw = torch.arange(nb * 64, dtype=torch.int32).view(nb, 64)  # distinct window pages (VALIDATE checks)
    state = p.empty_state(nb)
    state.kv.normal_()  # garbage in a fresh slot must not matter
    cache = PagedKVCache.allocate(
        nb * blocks, cfg.block_size // p.ratio, nope_dim=cfg.nope_dim, rope_dim=cfg.rope_dim, tile=cfg.quant_tile
    )
    done = [0] * nb
    ents: list[list[torch.Tensor]] = [[] for _ in range(nb)]
    freqs = rope_frequencies(cfg, p.ratio if p.ratio in (cfg.csa_ratio, cfg.hca_ratio) else 4)
    for step in steps:
        live = [b for b in range(nb) if step[b] > 0]
        meta = plan(
            cfg,
            [done[b] for b in live],
            [step[b] for b in live],
            pt[live],
            sw[live],
            torch.tensor(live, dtype=torch.int32),
        )
        x = torch.cat([xs[b][done[b] : done[b] + step[b]] for b in live])
        state, e, cache = compress(p, state, x, meta, cache, freqs, backend="torch")
        s = meta.stream(p.ratio)
        k = 0
        for b in live:
            for i in range(step[b]):
                if s.write_loc[k] >= 0:
                    ents[b].append(e[k])
                k += 1
            done[b] += step[b]
    return state, [torch.stack(v) if v else torch.zeros(0, p.dim, dtype=torch.bfloat16) for v in ents], cache


def _random_split(n: int, rnd: random.Random) -> list[int]:
    out = []
    while n > 0:
        k = rnd.choice([1, 1, 2, 3, rnd.randint(1, n)])
        k = min(k, n)
        out.append(k)
        n -= k
    return out


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False), (2, False), (2, True)], ids=lambda v: str(v))
@pytest.mark.parametrize("seed", [0, 1])
def test_chunking_invariance_is_bitwise(ratio, overlap, seed):
    rnd = random.Random(seed)
    hidden, dim = 64, 64
    cfg = (
        CFG.with_(csa_ratio=ratio, hca_ratio=ratio * 2 if ratio != 16 else 4, compress_ratios=(ratio,))
        if ratio not in (4, 16)
        else CFG
    )
    p = _params(ratio, dim, overlap, hidden, seed)
    lens = [rnd.randint(1, 70) for _ in range(3)]
    xs = [torch.randn(n, hidden).bfloat16() for n in lens]
    one_shot = _run_steps(p, xs, [lens], cfg)
    splits = [_random_split(n, rnd) for n in lens]
    n_steps = max(len(s) for s in splits)
    steps = [[s[k] if k < len(s) else 0 for s in splits] for k in range(n_steps)]
    chunked = _run_steps(p, xs, steps, cfg)
    assert torch.equal(one_shot[0].kv, chunked[0].kv)
    assert torch.equal(one_shot[0].score, chunked[0].score)
    for a, b in zip(one_shot[1], chunked[1], strict=True):
        assert a.shape[0] == b.shape[0] and torch.equal(a, b)
    assert torch.equal(one_shot[2].data, chunked[2].data)


def _token_loop_oracle(p: CompressorParams, x: torch.Tensor, freqs: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepSeek's decode path, one token at a time, fp64, softmax by torch (an independent restatement)."""
    r, dc, ov = p.ratio, p.dim, p.overlap
    coff = 2 if ov else 1
    kv_s = torch.zeros(coff * r, coff * dc, dtype=torch.float64)
    sc_s = torch.full((coff * r, coff * dc), float("-inf"), dtype=torch.float64)
    out = []
    for pos in range(x.shape[0]):
        kv = x[pos].double() @ p.wkv.double().T
        sc = x[pos].double() @ p.wgate.double().T + p.ape[pos % r].double()
        slot = (r if ov else 0) + pos % r
        kv_s[slot], sc_s[slot] = kv, sc
        if (pos + 1) % r == 0:
            if ov:
                cand_kv = torch.cat([kv_s[:r, :dc], kv_s[r:, dc:]])
                cand_sc = torch.cat([sc_s[:r, :dc], sc_s[r:, dc:]])
            else:
                cand_kv, cand_sc = kv_s, sc_s
            e = (torch.softmax(cand_sc, dim=0) * cand_kv).sum(0)
            e = e * torch.rsqrt(e.square().mean() + eps) * p.norm.double()
            j = pos // r
            ang = (j * r) * freqs.double()
            re, im = e[dc - 2 * freqs.shape[0] :: 2].clone(), e[dc - 2 * freqs.shape[0] + 1 :: 2].clone()
            e[dc - 2 * freqs.shape[0] :: 2] = re * torch.cos(ang) - im * torch.sin(ang)
            e[dc - 2 * freqs.shape[0] + 1 :: 2] = re * torch.sin(ang) + im * torch.cos(ang)
            out.append(e)
            if ov:
                kv_s[:r], sc_s[:r] = kv_s[r:].clone(), sc_s[r:].clone()
            kv_s[r if ov else 0 :] = 0
            sc_s[r if ov else 0 :] = float("-inf")
    return torch.stack(out) if out else torch.zeros(0, dc, dtype=torch.float64)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False)])
def test_matches_token_loop_oracle(ratio, overlap):
    p = _params(ratio, 64, overlap, 48, 7)
    x = torch.randn(53, 48).bfloat16()
    _, ents, cache = _run_steps(p, [x], [[53]])
    freqs = rope_frequencies(CFG, ratio)
    want = _token_loop_oracle(p, x, freqs, CFG.norm_eps)
    got = ents[0].double()
    assert got.shape == want.shape == (53 // ratio, 64)
    err = (got - want).abs() / want.abs().amax(-1, keepdim=True)
    assert err.max() < 2**-7, f"worst {err.max():.3e}"  # one bf16 rounding
    # the cache holds the FP8 form of exactly these entries, at slots page_table[0, j // P] * P + j % P
    stored = model1.gather(cache, torch.arange(53 // ratio))
    nope, rope, sb = model1.quantize_tokens(ents[0], CFG.nope_dim, CFG.quant_tile)
    assert torch.equal(stored, model1.dequantize_tokens(nope, rope, sb, CFG.quant_tile))


def test_hand_checked_overlap_first_window_and_ape_slots():
    """r = 2, overlap, dc = 1: entry 0 pools only window 0's `b` halves (the `a` candidates of window -1
    are absent); entry 1 pools window 0's `a` halves and window 1's `b` halves; ape by slot in window."""
    e0 = (2.0 * 1 + 4.0 * torch.e) / (1 + torch.e)  # b halves of tokens 0, 1 with ape b = (0, 1)
    e1 = (1.0 * 1 + 3.0 * torch.e**0.5 + 6.0 * 1 + 8.0 * torch.e) / (1 + torch.e**0.5 + 1 + torch.e)
    ckv = torch.tensor([[[0.0], [0.0], [2.0], [4.0]], [[1.0], [3.0], [6.0], [8.0]]])
    csc = torch.tensor([[[float("-inf")], [float("-inf")], [0.0], [1.0]], [[0.0], [0.5], [0.0], [1.0]]])
    assert torch.allclose(pool(ckv, csc).squeeze(-1), torch.tensor([e0, e1], dtype=torch.float32))


def test_carried_state_after_prefill_is_canonical():
    """r = 4 overlap, 6 tokens: rows 0..3 = window 0 (both halves, scores with ape), rows 4..5 = tokens
    4, 5, rows 6..7 = (0, -inf). A 3-token prefill keeps rows 0..3 empty (no complete window yet)."""
    p = _params(4, 64, True, 32, 3)
    x = torch.randn(6, 32).bfloat16()
    st, _, _ = _run_steps(p, [x], [[6]])
    kv = x.double() @ p.wkv.double().T
    sc = (x.double() @ p.wgate.double().T).float() + p.ape[torch.tensor([0, 1, 2, 3, 0, 1])]
    assert torch.equal(st.kv[0, :6], kv.float())
    assert torch.equal(st.score[0, :6], sc.float())
    assert st.kv[0, 6:].eq(0).all() and st.score[0, 6:].isneginf().all()
    st3, ents, _ = _run_steps(p, [x[:3]], [[3]])
    assert ents[0].shape[0] == 0
    assert st3.score[0, :4].isneginf().all() and torch.equal(st3.kv[0, 4:7], kv[:3].float())
