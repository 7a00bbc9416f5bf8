"""CPU checks of the TileLang kernels: each one lowers to CUDA for sm_90a (no GPU needed) at V4-Flash
and V4-Pro sizes, and the `_tilelang_compat` workarounds behave. A kernel that stops compiling fails here."""

import importlib

import pytest

pytest.importorskip("tilelang")

compat = importlib.import_module("dsv4fn._tilelang_compat")
attn = importlib.import_module("dsv4fn.attend.tilelang")
idx = importlib.import_module("dsv4fn.index_topk.tilelang")

SCALE = 512**-0.5


def _lower(prim_func, pass_configs=None) -> str:
    src = compat.lower_source(prim_func, pass_configs=pass_configs)
    assert "__global__" in src, "no CUDA kernel was generated"
    return src


@pytest.mark.parametrize(
    ("h", "split"),
    [(64, False), (64, True), (128, False), (128, True)],
    ids=["flash", "flash-split", "pro", "pro-split"],
)
def test_attention_lowers(h, split):
    src = _lower(attn.build_attend(h, 448, 64, 64, 128, 64, SCALE, split), attn.PASS_CONFIGS)
    assert "wgmma" in src  # both GEMMs use Hopper warpgroup MMA
    assert "attend_partial_kernel" in src if split else "attend_direct_kernel" in src


def test_attention_small_heads_and_combine_lower():
    # 8 heads: a masked 64-row head block
    src = _lower(attn.build_attend(8, 448, 64, 64, 64, 64, SCALE, False), attn.PASS_CONFIGS)
    assert "wgmma" in src
    assert "attend_combine_kernel" in _lower(attn.build_combine(128, 512))


def test_attention_rejects_tiny_geometry():
    import torch

    from dsv4fn.state import PagedKVCache

    cache = PagedKVCache.allocate(2, 16, nope_dim=32, rope_dim=32, tile=32)
    q = torch.randn(1, 1, 8, 64).to(torch.bfloat16)
    idx_ = torch.zeros(1, 1, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache"):
        attn.sparse_attention(q, cache, idx_, scale=0.125)


@pytest.mark.parametrize("hi", [64])
def test_indexer_logits_and_fused_passes_lower(hi):
    for build, name in [
        (idx.build_logits, "index_logits_kernel"),
        (idx.build_hist, "index_hist_kernel"),
        (idx.build_select, "index_select_kernel"),
    ]:
        src = _lower(build(hi, 128, 64))
        assert name in src
        assert "wgmma" in src  # fp8 K·Qᵀ on warpgroup MMA


@pytest.mark.parametrize("topk", [512, 1024], ids=["flash", "pro"])
def test_topk_passes_lower(topk):
    assert "index_threshold_kernel" in _lower(idx.build_threshold(topk))
    assert "index_finish_kernel" in _lower(idx.build_finish(topk, 64))


# ---- workarounds -------------------------------------------------------------------------------


def _two_param_counts(jit_factory, monkeypatch):
    """Compile two functions from one factory with a stubbed backend that, like TileLang's adapters,
    normalises `out_idx` in place; return the out_idx each compile resolved to."""
    import sys

    import tilelang.language as T
    from tilelang.jit.adapter.base import BaseKernelAdapter

    tj = sys.modules["tilelang.jit"]  # the module (the package attribute `tilelang.jit` is the decorator)

    seen = []

    def fake_compile(prim_func, out_idx=None, **_):
        adapter = type("_A", (), {})()
        adapter.params = list(prim_func.params)
        resolved = BaseKernelAdapter._legalize_result_idx(adapter, out_idx)  # mutates `out_idx` in place
        seen.append(list(resolved))
        return object()

    monkeypatch.setattr(tj, "compile", fake_compile)

    @jit_factory(out_idx=[-1])
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
                    C[i] = A[i]

        return f2

    factory(32, True)
    factory(32, False)
    return seen


def test_out_idx_not_shared_between_compiles(monkeypatch):
    seen = _two_param_counts(compat.jit, monkeypatch)
    assert seen == [[2], [1]], seen  # each compile resolves -1 against its own parameter list


def test_out_idx_upstream_bug_still_present(monkeypatch):
    """Documents why `compat.jit` exists: plain `tilelang.jit` leaks the first compile's indices into
    the second. If this starts failing, upstream fixed the adapter and the workaround can go."""
    import tilelang

    with pytest.raises(ValueError, match="result_idx"):  # the second compile sees the first one's [2]
        _two_param_counts(tilelang.jit, monkeypatch)


def test_backend_registration():
    from dsv4fn import _backend

    assert "tilelang" in _backend.available("attend")
    assert "tilelang" in _backend.available("index_logits")
    assert "tilelang" in _backend.available("index_topk_fused")
