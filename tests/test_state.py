"""Frozen pytree state and config: tree_map round trips, static fields stay static, presets."""

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

from dsv4fn import DSV4Config, IndexerKeyCache, KVAndScore, PagedKVCache, plan


def test_kvandscore_is_a_frozen_pytree_with_static_sizes():
    s = KVAndScore.empty(3, ratio=128, dim=16, overlap=False)
    leaves, spec = pytree.tree_flatten(s)
    assert len(leaves) == 2 and all(isinstance(x, torch.Tensor) for x in leaves)
    t = pytree.tree_map(lambda x: x + 1, s)
    assert isinstance(t, KVAndScore) and t.ratio == 128 and t.dim == 16 and t.overlap is False
    assert torch.equal(t.kv, s.kv + 1)
    assert pytree.tree_unflatten(leaves, spec).ratio == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ratio = 4  # type: ignore[misc]
    keys = [pytree.keystr(k) for k, _ in pytree.tree_flatten_with_path(s)[0]]
    assert keys == [".kv", ".score"]
    assert s.score.isneginf().all() and s.kv.eq(0).all()
    ov = KVAndScore.empty(1, ratio=4, dim=8, overlap=True)
    assert ov.kv.shape == (1, 8, 16)


def test_metadata_pytree_round_trip_keeps_nested_streams():
    cfg = DSV4Config.tiny()
    meta = plan(cfg, [3, 40], [5, 1], torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32))
    leaves, spec = pytree.tree_flatten(meta)
    back = pytree.tree_unflatten([None if x is None else x.clone() for x in leaves], spec)
    assert back.window == cfg.window and back.csa is not None and back.csa.ratio == cfg.csa_ratio
    assert back.hca is not None and back.hca.indexed is False
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(leaves, pytree.tree_leaves(back), strict=True))


def test_caches_are_pytrees_and_compile_fullgraph():
    c = PagedKVCache.allocate(2, 64)
    k = IndexerKeyCache.allocate(2)
    c2 = pytree.tree_map(lambda x: x.clone(), c)
    assert c2.page_size == 64 and c2.nope_dim == 448 and c2.data.data_ptr() != c.data.data_ptr()
    assert pytree.tree_map(lambda x: x, k).dim == 128

    @torch.compile(fullgraph=True, backend="eager")
    def bump(s: KVAndScore) -> KVAndScore:
        return KVAndScore(kv=s.kv * 2, score=s.score, ratio=s.ratio, dim=s.dim, overlap=s.overlap)

    s = KVAndScore.empty(1, ratio=4, dim=2, overlap=True)
    s = dataclasses.replace(s, kv=torch.randn_like(s.kv))
    out = bump(s)
    assert out.ratio == 4 and torch.equal(out.kv, s.kv * 2)


def test_first_kernel_call_under_compile_fullgraph(monkeypatch):
    """A process whose first call of a step is compiled (fullgraph): resolving its backend imports the kernel module,
    which Dynamo cannot trace - the import runs at trace time (resolved for a CUDA device: host logic only)."""
    from dsv4fn import _backend

    monkeypatch.setattr(_backend, "_loaded", set())

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        name, _ = _backend.resolve("attend", "triton", torch.device("cuda"))
        return x + len(name)

    assert torch.equal(step(torch.ones(2)), torch.full((2,), 7.0))
    assert ("attend", "triton") in _backend._loaded


def test_import_loads_no_kernel_library_nor_dynamo():
    """`import dsv4fn` imports neither Triton nor Dynamo (which imports triton.language): a Triton interpreter run sets
    TRITON_INTERPRET after importing dsv4fn and before its first kernel module, and imports stay cheap."""
    code = "import sys, dsv4fn; print(sorted(m for m in ('triton', 'tilelang', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_config_presets():
    f, p, t = DSV4Config.flash(), DSV4Config.pro(), DSV4Config.tiny()
    assert (f.num_heads, f.head_dim, f.nope_dim, f.window, f.index_topk) == (64, 512, 448, 128, 512)
    assert f.num_layers == 43 and f.compress_ratios[:2] == (0, 0)
    assert f.compress_ratios.count(4) == 21 and f.compress_ratios.count(128) == 20
    assert p.num_layers == 61 and p.compress_ratios[:2] == (128, 128)
    assert p.compress_ratios.count(4) == 30 and p.compress_ratios.count(128) == 31
    assert (p.num_heads, p.index_topk, p.q_lora_rank, p.o_groups) == (128, 1024, 1536, 16)
    assert abs(f.softmax_scale - 512**-0.5) < 1e-12
    assert abs(f.index_weight_scale - 0.0110485) < 1e-6
    assert f.compressed_page_size(4) == 64 and f.compressed_page_size(128) == 2
    assert t.num_quant_tiles == 1 and f.num_quant_tiles == 7
    with pytest.raises(ValueError, match="rope_dim"):
        f.with_(rope_dim=63)
    with pytest.raises(ValueError, match="layer ratio 8"):
        f.with_(compress_ratios=(0, 8))


def test_yarn_frequencies_follow_the_spec():
    from dsv4fn import rope_frequencies
    from dsv4fn.config import yarn_correction_range

    f = DSV4Config.flash()
    assert yarn_correction_range(f, 160000.0) == (15.0, 25.0)
    base = 1.0 / (160000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    fr = rope_frequencies(f, 4)
    assert torch.equal(fr[:16], base[:16])
    assert torch.allclose(fr[25:], base[25:] / 16)
    assert torch.all(fr[16:25] < base[16:25]) and torch.all(fr[16:25] > base[16:25] / 16)
    plain = rope_frequencies(f, 0)
    assert torch.allclose(plain, 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)))
