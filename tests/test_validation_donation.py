"""Donated state used twice (issue 8, tier 3, `DSV4FN_VALIDATE=1`), through the public steps.

Every step that donates its input is tracked: the caches of `store_kv` / `store_index_keys`, the state and
cache of `compress`, the `LayerState` of `attention_layer` (and the caches / compressor states in it, which
the layer hands on to its inner steps). A state is one *object*: a step returns new objects that share
storage with the donated ones, and those are fresh. Passing a donated object again raises a ValueError that
names the step and argument and says to use the returned state; valid multi-step use (threading the returned
states) never raises, on the torch and Triton (interpreter) backends and in compare mode. Off, nothing is
recorded."""

import dataclasses
import gc
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from dsv4fn import (
    DSV4Config,
    _contracts,
    attention_layer,
    compress,
    init_layer_params,
    init_layer_state,
    plan,
    store_index_keys,
    store_kv,
)
from dsv4fn.layer import LayerState
from dsv4fn.state import IndexerKeyCache, KVAndScore, PagedKVCache

CFG = DSV4Config.tiny()
TINY = dict(nope_dim=32, rope_dim=32, tile=32)
USE_RETURNED = r"this state was donated to an earlier step \({}\); use the state that step returned"


@pytest.fixture
def validate_on(monkeypatch):
    monkeypatch.setattr(_contracts, "VALIDATE", True)


def _i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _err(step_arg: str, earlier: str) -> str:
    return re.escape(step_arg) + ": " + USE_RETURNED.format(earlier)


# ---------------------------------------------------------------------------------------------
# the stores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton", "compare", "compare:triton"])
def test_store_kv_threading_the_returned_cache_passes_and_reuse_raises(validate_on, backend):
    c0 = PagedKVCache.allocate(2, 16, **TINY)
    c1 = store_kv(c0, _rows(3, 64, 0), _i32(0, 5, 17), backend=backend)
    c2 = store_kv(c1, _rows(2, 64, 1), _i32(1, 30), backend=backend)  # the returned cache: fine
    assert c1 is not c0 and c2 is not c1 and c2.data.data_ptr() == c0.data.data_ptr()  # new objects, one storage
    with pytest.raises(ValueError, match=_err("store_kv(cache)", "store_kv")):
        store_kv(c0, _rows(1, 64, 2), _i32(3), backend=backend)
    with pytest.raises(ValueError, match=_err("store_kv(cache)", "store_kv")):
        store_kv(c1, _rows(1, 64, 2), _i32(3), backend=backend)
    store_kv(c2, _rows(1, 64, 2), _i32(3), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_store_index_keys_tracks_its_cache(validate_on, backend):
    k0 = IndexerKeyCache.allocate(2, 16, dim=64)
    k1 = store_index_keys(k0, _rows(2, 64, 0).float(), _i32(0, 20), backend=backend)
    store_index_keys(k1, _rows(1, 64, 1), _i32(1), backend=backend)
    with pytest.raises(ValueError, match=_err("store_index_keys(cache)", "store_index_keys")):
        store_index_keys(k0, _rows(1, 64, 2), _i32(2), backend=backend)


def test_a_refused_call_donates_nothing(validate_on):
    """A call a check refuses did not run: its state is still the live one and can be passed again."""
    c0 = PagedKVCache.allocate(2, 16, **TINY)
    with pytest.raises(ValueError, match=r"loc: value 32 at \[1\] outside \[0, 32\)"):
        store_kv(c0, _rows(2, 64, 0), _i32(0, 32))
    store_kv(c0, _rows(2, 64, 0), _i32(0, 31))


def test_off_mode_records_nothing():
    assert not _contracts.VALIDATE
    before = len(_contracts._donated)
    c0 = PagedKVCache.allocate(2, 16, **TINY)
    store_kv(c0, _rows(1, 64, 0), _i32(0))
    store_kv(c0, _rows(1, 64, 0), _i32(1))  # not checked: the caller's responsibility
    assert len(_contracts._donated) == before


def test_refused_during_cuda_graph_capture(validate_on, monkeypatch):
    """Like every tier-3 check: asked for inside a CUDA-graph capture, the step refuses (nothing recorded)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    c0 = PagedKVCache.allocate(2, 16, **TINY)
    with pytest.raises(RuntimeError, match="cannot run during CUDA-graph capture"):
        store_kv(c0, _rows(1, 64, 0), _i32(0), backend="torch")
    assert c0 not in _contracts._donated


def test_records_are_weak_and_by_identity(validate_on):
    c0 = PagedKVCache.allocate(2, 16, **TINY)
    twin = dataclasses.replace(c0)  # same storage, another object: a distinct (fresh) state
    assert twin == twin and twin != c0 and hash(twin) != hash(c0)  # eq=False: identity
    store_kv(c0, _rows(1, 64, 0), _i32(0))
    assert c0 in _contracts._donated and twin not in _contracts._donated
    n = len(_contracts._donated)
    del c0
    gc.collect()
    assert len(_contracts._donated) == n - 1


# ---------------------------------------------------------------------------------------------
# compress
# ---------------------------------------------------------------------------------------------


def _compress_setup(layer: int = 1):
    params = init_layer_params(CFG, layer)
    st = init_layer_state(CFG, layer, num_blocks=4, num_swa_pages=8, num_slots=2)
    pt = torch.arange(4, dtype=torch.int32).view(2, 2)
    sw = torch.arange(8, dtype=torch.int32).view(2, 4)
    return params, st, pt, sw


@pytest.mark.parametrize("backend", ["torch", "triton", "compare"])
def test_compress_tracks_state_and_cache(validate_on, backend):
    params, st, pt, sw = _compress_setup()
    assert params.compressor is not None and st.comp_state is not None and st.compressed is not None
    cp, f = params.compressor, params.freqs
    x = _rows(9, CFG.hidden_size, 0)
    m1, m2 = plan(CFG, [0, 0], [5, 2], pt, sw), plan(CFG, [5, 2], [1, 1], pt, sw)
    s1, _, c1 = compress(cp, st.comp_state, x[:7], m1, st.compressed, f, backend=backend)
    s2, _, c2 = compress(cp, s1, x[7:], m2, c1, f, backend=backend)
    with pytest.raises(ValueError, match=_err("compress(state)", "compress")):
        compress(cp, s1, x[7:], m2, c2, f, backend=backend)
    with pytest.raises(ValueError, match=_err("compress(cache)", "compress")):
        compress(cp, s2, x[7:], m2, c1, f, backend=backend)
    # a cache spent by a store cannot feed the compressor either (and the other way round)
    c3 = store_kv(c2, _rows(1, 64, 1), _i32(2))
    with pytest.raises(ValueError, match=_err("compress(cache)", "store_kv")):
        compress(cp, s2, x[7:], plan(CFG, [6, 3], [1, 1], pt, sw), c2, f, backend=backend)
    s3, _, c4 = compress(cp, s2, x[7:], plan(CFG, [6, 3], [1, 1], pt, sw), c3, f, backend=backend)
    with pytest.raises(ValueError, match=_err("store_kv(cache)", "compress")):
        store_kv(c3, _rows(1, 64, 1), _i32(2))
    del s3, c4


def test_compress_state_slots_within_the_state(validate_on):
    params, st, pt, sw = _compress_setup()
    assert params.compressor is not None
    meta = plan(CFG, [0], [4], pt[:1], sw[:1], _i32(2))  # the state has slots 0 and 1
    with pytest.raises(ValueError, match=r"meta\.state_slots: value 2 at \[0\] outside \[0, 2\)"):
        compress(params.compressor, st.comp_state, _rows(4, CFG.hidden_size, 0), meta, st.compressed, params.freqs)


# ---------------------------------------------------------------------------------------------
# attention_layer
# ---------------------------------------------------------------------------------------------


def _decode_loop(layer: int, backend: str, steps: int = 3):
    """Prefill 5 + 3 tokens, then `steps` decode steps of both requests; returns (states, metas, xs)."""
    params = init_layer_params(CFG, layer)
    state = init_layer_state(CFG, layer, num_blocks=4, num_swa_pages=8, num_slots=2)
    pt = torch.arange(4, dtype=torch.int32).view(2, 2)
    sw = torch.arange(8, dtype=torch.int32).view(2, 4)
    done = [5, 3]
    metas = [plan(CFG, [0, 0], done, pt, sw)]
    for _ in range(steps):
        metas.append(plan(CFG, done, [1, 1], pt, sw))
        done = [d + 1 for d in done]
    xs = [_rows(m.num_tokens, CFG.hidden_size, i) for i, m in enumerate(metas)]
    states = [state]
    for m, x in zip(metas, xs, strict=True):
        _, state, _ = attention_layer(CFG, params, state, x, m, backend=backend)
        states.append(state)
    return params, states, metas, xs


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["window", "csa", "hca"])
def test_layer_decode_loop_passes_and_old_state_raises(validate_on, layer):
    params, states, metas, xs = _decode_loop(layer, "torch")
    assert len({id(s) for s in states}) == len(states)
    old, last = states[-2], states[-1]
    m, x = metas[-1], xs[-1]
    with pytest.raises(ValueError, match=_err("attention_layer(state)", "attention_layer")):
        attention_layer(CFG, params, old, x, m)
    # a new LayerState around an old cache: named by its field, before any step wrote anything
    with pytest.raises(ValueError, match=_err("attention_layer(state.swa)", "attention_layer")):
        attention_layer(CFG, params, dataclasses.replace(last, swa=old.swa), x, m)
    if layer:
        with pytest.raises(ValueError, match=_err("attention_layer(state.comp_state)", "attention_layer")):
            attention_layer(CFG, params, dataclasses.replace(last, comp_state=old.comp_state), x, m)
        with pytest.raises(ValueError, match=_err("attention_layer(state.compressed)", "attention_layer")):
            attention_layer(CFG, params, dataclasses.replace(last, compressed=old.compressed), x, m)
        # the layer's fields cannot be fed to the steps by hand either
        assert params.compressor is not None
        with pytest.raises(ValueError, match=_err("compress(state)", "attention_layer")):
            compress(params.compressor, old.comp_state, x, m, last.compressed, params.freqs)
    if layer == 1:
        with pytest.raises(ValueError, match=_err("attention_layer(state.index_keys)", "attention_layer")):
            attention_layer(CFG, params, dataclasses.replace(last, index_keys=old.index_keys), x, m)
    with pytest.raises(ValueError, match=_err("store_kv(cache)", "attention_layer")):
        store_kv(old.swa, _rows(1, 64, 0), _i32(0))
    # none of those refused calls donated `last`: it still takes the next step
    nxt = plan(CFG, [m.prefix_lens[0].item() + 1, m.prefix_lens[1].item() + 1], [1, 1], m.page_table, m.swa_page_table)
    attention_layer(CFG, params, last, _rows(2, CFG.hidden_size, 9), nxt)


def test_layer_refuses_one_state_in_two_fields(validate_on):
    """The tiny CSA layer's two compressor states have one shape: sharing one object would run silently."""
    params, states, metas, xs = _decode_loop(1, "torch", steps=0)
    last = states[-1]
    shared = dataclasses.replace(last, index_state=last.comp_state)
    m = plan(CFG, [5, 3], [1, 1], metas[0].page_table, metas[0].swa_page_table)
    with pytest.raises(
        ValueError, match=r"attention_layer\(state\.comp_state\): the same object as state\.index_state"
    ):
        attention_layer(CFG, params, shared, _rows(2, CFG.hidden_size, 0), m)


def test_layer_outputs_equal_with_and_without_validation(monkeypatch):
    """The checks only read: the same decode loop gives the same bits with VALIDATE on and off."""
    _, off, _, _ = _decode_loop(1, "torch", steps=2)
    monkeypatch.setattr(_contracts, "VALIDATE", True)
    _, on, _, _ = _decode_loop(1, "torch", steps=2)
    for f in ("swa", "compressed", "index_keys"):
        assert torch.equal(getattr(off[-1], f).data, getattr(on[-1], f).data)
    for f in ("comp_state", "index_state"):
        assert torch.equal(getattr(off[-1], f).kv, getattr(on[-1], f).kv)


def test_layer_compare_mode_does_not_false_positive(validate_on):
    """`backend="compare"` clones the donated state for the reference run: the clones are new objects, never
    recorded, and the kernel run donates the caller's state once."""
    params, states, metas, xs = _decode_loop(1, "compare", steps=2)
    with pytest.raises(ValueError, match=_err("attention_layer(state)", "attention_layer")):
        attention_layer(CFG, params, states[0], xs[0], metas[0], backend="compare")


def test_layer_triton_decode_loop(validate_on):
    """The Triton backends (interpreter) through the layer: the inner steps' donations do not trip the check."""
    params, states, metas, xs = _decode_loop(2, "triton", steps=1)
    with pytest.raises(ValueError, match=_err("attention_layer(state)", "attention_layer")):
        attention_layer(CFG, params, states[-2], xs[-1], metas[-1], backend="triton")


def test_layer_tier1_checks_name_the_argument():
    params, states, metas, xs = _decode_loop(1, "torch", steps=0)
    st, m, x = states[-1], metas[0], xs[0]
    with pytest.raises(TypeError, match=r"state: expected a LayerState, got KVAndScore"):
        attention_layer(CFG, params, st.comp_state, x, m)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"x: expected dtype bfloat16, got float32"):
        attention_layer(CFG, params, st, x.float(), m)
    with pytest.raises(ValueError, match=rf"x: expected shape \[8, {CFG.hidden_size}\], got \[7, "):
        attention_layer(CFG, params, st, x[:7], m)
    with pytest.raises(ValueError, match=r"state: a CSA layer \(params.indexer set\) needs state.index_state"):
        attention_layer(CFG, params, dataclasses.replace(st, index_state=None), x, m)
    with pytest.raises(TypeError, match=r"cfg: expected a DSV4Config, got dict"):
        attention_layer({}, params, st, x, m)  # type: ignore[arg-type]
    assert isinstance(st, LayerState) and isinstance(st.comp_state, KVAndScore)
