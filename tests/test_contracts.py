"""Debug tiers: always-on host checks, DSV4FN_DEBUG=1 shape contracts, DSV4FN_VALIDATE=1 value checks."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import dsv4fn
from dsv4fn import _contracts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True, timeout=300
    )


SETUP = """
import torch, dsv4fn as D
cfg = D.DSV4Config.tiny()
pt = torch.arange(8, dtype=torch.int32).view(2, 4); sw = torch.arange(16, dtype=torch.int32).view(2, 8)
meta = D.plan(cfg, [0, 5], [7, 1], pt, sw)
p = D.init_layer_params(cfg, 1)
st = D.init_layer_state(cfg, 1, num_blocks=8, num_swa_pages=16, num_slots=2)
"""


def test_off_mode_is_the_identity():
    assert not _contracts.DEBUG

    def f(x: int) -> int:
        return x

    assert _contracts.contract(f) is f
    assert not hasattr(dsv4fn.compress, "__wrapped__"), "with DSV4FN_DEBUG unset the step is the plain function"


def test_debug_catches_batch_mismatch_between_x_and_metadata():
    r = _run(
        SETUP
        + """
x = torch.randn(meta.num_tokens + 1, cfg.hidden_size).bfloat16()
try:
    D.compress(p.compressor, st.comp_state, x, meta, st.compressed, p.freqs)
except Exception as e:
    print(type(e).__name__, e)
""",
        DSV4FN_DEBUG="1",
    )
    assert "ContractError" in r.stdout, r.stdout + r.stderr
    assert "compress(meta).token_request: expected Int32[Tensor, 't'], got int32[8]" in r.stdout, r.stdout
    assert "'t': 9" in r.stdout


def test_debug_catches_q_vs_indices_batch_mismatch_in_attend():
    r = _run(
        SETUP
        + """
q = torch.randn(3, 1, 8, 64).bfloat16()
try:
    D.attend(q, st.swa, meta.window_indices.view(2, 1, -1)[:2], sink=p.sink)
except Exception as e:
    print(type(e).__name__, e)
""",
        DSV4FN_DEBUG="1",
    )
    assert "ContractError" in r.stdout and "indices" in r.stdout and "'b': 3" in r.stdout, r.stdout + r.stderr


def test_debug_mode_runs_whole_csa_and_hca_layers():
    """Tier 2 over real steps: attend with two caches of different sizes (their dims are their own), the
    indexer steps, compress; the outputs equal the off mode's."""
    code = (
        SETUP
        + """
torch.manual_seed(0)
x = torch.randn(meta.num_tokens, cfg.hidden_size).bfloat16()
for layer in (1, 2):
    p = D.init_layer_params(cfg, layer)
    st = D.init_layer_state(cfg, layer, num_blocks=8, num_swa_pages=16, num_slots=2)
    out, _, _ = D.attention_layer(cfg, p, st, x, meta)
    print(layer, float(out.float().abs().sum()))
"""
    )
    on, off = _run(code, DSV4FN_DEBUG="1"), _run(code)
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout == off.stdout and on.stdout.count("\n") == 2, on.stdout + off.stdout


def test_debug_catches_state_invariant():
    r = _run(
        SETUP
        + """
bad = D.KVAndScore(kv=st.comp_state.kv[:, :4], score=st.comp_state.score[:, :4], ratio=4, dim=64, overlap=True)
torch.manual_seed(0)
x = torch.randn(meta.num_tokens, cfg.hidden_size).bfloat16()
try:
    D.compress(p.compressor, bad, x, meta, st.compressed, p.freqs)
except Exception as e:
    print(type(e).__name__, e)
""",
        DSV4FN_DEBUG="1",
    )
    assert "ContractError" in r.stdout and "rows=4 but coff*ratio=8" in r.stdout, r.stdout + r.stderr


def test_validate_catches_out_of_range_indices_and_donated_state():
    r = _run(
        SETUP
        + """
q = torch.randn(meta.num_tokens, 1, 8, 64).bfloat16()
idx = meta.window_indices.view(-1, 1, meta.window_indices.shape[1]).clone()
idx[1, 0, 0] = 10**6
try:
    D.attend(q, st.swa, idx, meta.window_lens, sink=p.sink)
except ValueError as e:
    print("A", e)
torch.manual_seed(0)
x = torch.randn(meta.num_tokens, cfg.hidden_size).bfloat16()
s1, _, c = D.compress(p.compressor, st.comp_state, x, meta, st.compressed, p.freqs)
try:
    D.compress(p.compressor, st.comp_state, x, meta, c, p.freqs)
except ValueError as e:
    print("B", e)
""",
        DSV4FN_VALIDATE="1",
    )
    assert "A indices: value 1000000 at [1, 0, 0] outside" in r.stdout, r.stdout + r.stderr
    assert "B compress(state): this state was donated" in r.stdout, r.stdout + r.stderr


def test_always_on_checks_name_the_argument():
    cfg = dsv4fn.DSV4Config.tiny()
    cache = dsv4fn.PagedKVCache.allocate(2, 16, nope_dim=32, rope_dim=32, tile=32)
    q = torch.randn(2, 1, 8, 64).bfloat16()
    idx = torch.zeros(2, 1, 16, dtype=torch.int32)
    with pytest.raises(TypeError, match="q: expected dtype bfloat16, got float32"):
        dsv4fn.attend(q.float(), cache, idx)
    with pytest.raises(ValueError, match=r"indices: expected shape \[2, 1, \*\], got \[3, 1, 16\]"):
        dsv4fn.attend(q, cache, torch.zeros(3, 1, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="sink: expected shape"):
        dsv4fn.attend(q, cache, idx, sink=torch.zeros(4))
    with pytest.raises(ValueError, match="cache: head dim 512 != q head dim 64"):
        dsv4fn.attend(q, dsv4fn.PagedKVCache.allocate(1, 64), idx)
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        dsv4fn.attend(q, cache, idx, backend="cuda")
    del cfg


def test_off_mode_adds_no_overhead():
    """With the tiers off, `attend`'s wrapper work is the O(1) host checks only (no contract frames)."""
    cache = dsv4fn.PagedKVCache.allocate(2, 16, nope_dim=32, rope_dim=32, tile=32)
    q = torch.randn(1, 1, 8, 64).bfloat16()
    idx = torch.zeros(1, 1, 16, dtype=torch.int32)
    from dsv4fn.attend import attend

    assert not hasattr(attend, "__wrapped__")
    t0 = time.perf_counter()
    for _ in range(20):
        attend(q, cache, idx)
    assert (time.perf_counter() - t0) / 20 < 0.05
