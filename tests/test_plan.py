"""`plan(...)` against a brute-force per-token construction, over random lengths and page tables."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4fn import DSV4Config, plan

CFG = DSV4Config.tiny()


def brute(cfg, prefix, extend, pt, swa):
    rows = []
    for b, (p0, e) in enumerate(zip(prefix, extend, strict=True)):
        for p in range(p0, p0 + e):
            L = p + 1
            swa_slot = lambda q: int(swa[b, q // cfg.swa_page_size]) * cfg.swa_page_size + q % cfg.swa_page_size
            win = [swa_slot(p - c) if c < cfg.window and p - c >= 0 else -1 for c in range(cfg.window_width())]
            row = dict(req=b, pos=p, swa_write=swa_slot(p), win=win, win_len=min(L, cfg.window))
            for r, name in ((cfg.csa_ratio, "csa"), (cfg.hca_ratio, "hca")):
                page = cfg.block_size // r
                slot = lambda j: int(pt[b, j // page]) * page + j % page
                row[name + "_write"] = slot(L // r - 1) if L % r == 0 else -1
                row[name + "_visible"] = L // r
                if name == "hca":
                    row["hca_idx"] = [slot(j) for j in range(L // r)]
            rows.append(row)
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(1, 70)), min_size=1, max_size=5),
    st.randoms(use_true_random=False),
)
def test_plan_matches_brute_force(reqs, rnd):
    prefix = [p for p, _ in reqs]
    extend = [e for _, e in reqs]
    longest = max(p + e for p, e in reqs)
    nblk = -(-longest // CFG.block_size) + rnd.randint(0, 2)
    nswa = -(-longest // CFG.swa_page_size) + rnd.randint(0, 2)
    b = len(reqs)
    pool = list(range(b * nblk * 2))
    rnd.shuffle(pool)
    pt = torch.tensor(pool[: b * nblk], dtype=torch.int32).view(b, nblk)
    pool = list(range(b * nswa * 2))
    rnd.shuffle(pool)
    swa = torch.tensor(pool[: b * nswa], dtype=torch.int32).view(b, nswa)
    meta = plan(CFG, prefix, extend, pt, swa)
    rows = brute(CFG, prefix, extend, pt, swa)
    assert meta.num_tokens == len(rows) == sum(extend)
    assert meta.query_start.tolist() == [sum(extend[:i]) for i in range(b + 1)]
    assert meta.token_request.tolist() == [r["req"] for r in rows]
    assert meta.positions.tolist() == [r["pos"] for r in rows]
    assert meta.swa_write_loc.tolist() == [r["swa_write"] for r in rows]
    assert meta.window_indices.tolist() == [r["win"] for r in rows]
    assert meta.window_lens.tolist() == [r["win_len"] for r in rows]
    assert meta.csa is not None and meta.hca is not None
    assert meta.csa.write_loc.tolist() == [r["csa_write"] for r in rows]
    assert meta.csa.visible.tolist() == [r["csa_visible"] for r in rows]
    assert meta.csa.lens.tolist() == [min(r["csa_visible"], CFG.index_topk) for r in rows]
    assert meta.csa.width == CFG.topk_width() and meta.csa.width % CFG.index_pad == 0
    assert meta.hca.write_loc.tolist() == [r["hca_write"] for r in rows]
    assert meta.hca.lens.tolist() == [r["hca_visible"] for r in rows]
    assert meta.hca.lens_min1.tolist() == [max(1, r["hca_visible"]) for r in rows]
    assert meta.hca.width % CFG.index_pad == 0
    assert meta.hca.indices is not None
    for row, idx in zip(rows, meta.hca.indices.tolist(), strict=True):
        n = len(row["hca_idx"])
        assert idx[:n] == row["hca_idx"] and all(v == -1 for v in idx[n:])
    assert meta.is_decode == all(e == 1 for e in extend)


def test_plan_flash_decode_widths():
    cfg = DSV4Config.flash()
    b = 3
    pt = torch.arange(b * 40, dtype=torch.int32).view(b, 40)
    swa = torch.arange(b * 80, dtype=torch.int32).view(b, 80)
    meta = plan(cfg, [9000, 130, 0], [1, 1, 1], pt, swa)
    assert meta.window_indices.shape == (3, 128)
    assert meta.csa is not None and meta.csa.width == 512
    assert meta.hca is not None and meta.hca.indices is not None and meta.hca.indices.shape[1] % 64 == 0
    assert meta.window_lens.tolist() == [128, 128, 1]
    assert meta.csa.visible.tolist() == [9001 // 4, 131 // 4, 0]


def test_plan_rejects_bad_input():
    pt = torch.zeros(2, 2, dtype=torch.int32)
    swa = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="extend_lens: expected 2 entries"):
        plan(CFG, [0, 0], [1], pt, swa)
    with pytest.raises(ValueError, match="extend_lens: expected values >= 1"):
        plan(CFG, [0, 0], [1, 0], pt, swa)
    with pytest.raises(TypeError, match="page_table: expected dtype int32"):
        plan(CFG, [0, 0], [1, 1], pt.long(), swa)
    with pytest.raises(ValueError, match="page_table: expected at least 3 columns"):
        plan(CFG, [0, 70], [1, 1], pt, torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="swa_page_table: expected shape"):
        plan(CFG, [0, 0], [1, 1], pt, torch.zeros(3, 4, dtype=torch.int32))
