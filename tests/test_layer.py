"""The attention layer: chunked prefill + decode == one-shot prefill (bitwise), == dense evaluation."""

import random

import pytest
import torch

from dsv4fn import DSV4Config, attention_layer, init_layer_params, init_layer_state, plan
from dsv4fn.dense import dense_layer

CFG = DSV4Config.tiny()


def _run(cfg, layer, seqs, steps, seed=0):
    nb = len(seqs)
    longest = max(s.shape[0] for s in seqs)
    nblk, nswa = -(-longest // cfg.block_size), -(-longest // cfg.swa_page_size)
    g = torch.Generator().manual_seed(seed + 99)
    pt = torch.randperm(nb * nblk, generator=g).int().view(nb, nblk)
    sw = torch.randperm(nb * nswa, generator=g).int().view(nb, nswa)
    params = init_layer_params(cfg, layer, seed=seed)
    state = init_layer_state(cfg, layer, num_blocks=nb * nblk, num_swa_pages=nb * nswa, num_slots=nb)
    outs = [torch.full_like(s, float("nan")) for s in seqs]
    done = [0] * nb
    for step in steps:
        live = [b for b in range(nb) if step[b]]
        meta = plan(
            cfg,
            [done[b] for b in live],
            [step[b] for b in live],
            pt[live],
            sw[live],
            torch.tensor(live, dtype=torch.int32),
            max_seq_len=longest,
        )
        x = torch.cat([seqs[b][done[b] : done[b] + step[b]] for b in live])
        out, state, _ = attention_layer(cfg, params, state, x, meta, backend="torch")
        k = 0
        for b in live:
            outs[b][done[b] : done[b] + step[b]] = out[k : k + step[b]]
            k += step[b]
            done[b] += step[b]
    return outs, state, params


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["window", "csa", "hca"])
def test_chunked_prefill_and_decode_equal_one_shot_bitwise(layer):
    rnd = random.Random(layer)
    lens = [75, 40, 18]
    seqs = [torch.randn(n, CFG.hidden_size).bfloat16() for n in lens]
    one, st1, _ = _run(CFG, layer, seqs, [lens])
    steps, done = [], [0, 0, 0]
    while any(d < n for d, n in zip(done, lens, strict=True)):
        step = [min(n - d, rnd.choice([1, 1, 3, 17])) for d, n in zip(done, lens, strict=True)]
        steps.append(step)
        done = [d + s for d, s in zip(done, step, strict=True)]
    two, st2, _ = _run(CFG, layer, seqs, steps)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    for sa, sb in ((st1.comp_state, st2.comp_state), (st1.index_state, st2.index_state)):
        if sa is not None:
            assert torch.equal(sa.kv, sb.kv) and torch.equal(sa.score, sb.score)


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["window", "csa", "hca"])
def test_layer_equals_dense_evaluation(layer):
    lens = [90, 33]
    seqs = [torch.randn(n, CFG.hidden_size).bfloat16() for n in lens]
    outs, _, params = _run(CFG, layer, seqs, [[30, 33], [60, 0]])
    for s, o in zip(seqs, outs, strict=True):
        ref = dense_layer(CFG, params, s)
        assert torch.isfinite(o).all()
        err = (o.float() - ref.float()).square().mean().sqrt() / ref.float().square().mean().sqrt()
        assert err < 5e-3, err
        assert torch.equal(o, ref), "same rounding points and batch-invariant math: expected bit equality"


def test_flash_geometry_csa_layer_small_batch():
    """V4-Flash sizes (64 heads, d 512, window 128, top-k 512) with a short hidden size for CPU time."""
    cfg = DSV4Config.flash().with_(
        hidden_size=256, q_lora_rank=128, o_lora_rank=64, index_heads=8, compress_ratios=(0, 4, 128)
    )
    lens = [600]
    seqs = [torch.randn(n, cfg.hidden_size).bfloat16() for n in lens]
    outs, _, params = _run(cfg, 1, seqs, [[599], [1]])
    ref = dense_layer(cfg, params, seqs[0])
    err = (outs[0].float() - ref.float()).square().mean().sqrt() / ref.float().square().mean().sqrt()
    assert err < 5e-3
