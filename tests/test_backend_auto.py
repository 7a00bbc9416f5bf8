"""What "auto" picks on CUDA, per call (the choice is host logic: checked here without a GPU by resolving for
a CUDA device; the kernels themselves are verified by the GPU tests)."""

import pytest
import torch

from dsv4fn import _backend
from dsv4fn.attend import _lone_long_row, _tilelang_fast
from dsv4fn.index_topk import _tilelang_logits_fast
from dsv4fn.state import IndexerKeyCache, PagedKVCache

CUDA = torch.device("cuda")
pytest.importorskip("tilelang")


def _pick(step: str, accepts) -> str:
    return _backend.resolve(step, "auto", CUDA, accepts)[0]


def test_attention_auto_prefers_tilelang_only_where_its_fast_kernel_applies():
    v4 = PagedKVCache.allocate(2, 64)
    tiny = PagedKVCache.allocate(2, 16, nope_dim=32, rope_dim=32, tile=32)
    assert _pick("attend", lambda b: b != "tilelang" or _tilelang_fast(v4, v4)) == "tilelang"
    assert _pick("attend", lambda b: b != "tilelang" or _tilelang_fast(v4, tiny)) == "triton"
    assert _pick("attend", lambda b: b != "tilelang" or _tilelang_fast(tiny, None)) == "triton"
    # a page stride that is not whole 576-byte records: the legacy TileLang kernel would run, Triton is faster
    odd = torch.zeros(2, v4.page_bytes + 8, dtype=torch.uint8)[:, : v4.page_bytes]
    v4_odd = PagedKVCache(data=odd, page_size=64, nope_dim=448, rope_dim=64, tile=64)
    assert v4.data.stride(0) % 576 == 0 and not _tilelang_fast(v4_odd, None)


@pytest.mark.parametrize(
    ("queries", "k2", "lone"), [(1, 8192, True), (1, 512, False), (8, 8192, False), (2, 4096, False)]
)
def test_attention_auto_keeps_triton_for_one_query_over_a_long_list(queries, k2, lone):
    v4 = PagedKVCache.allocate(2, 64)
    assert _lone_long_row(queries, k2) is lone

    def fits(b: str) -> bool:  # as attend() builds it
        return b != "tilelang" or (_tilelang_fast(v4, v4) and not _lone_long_row(queries, k2))

    assert _pick("attend", fits) == ("triton" if lone else "tilelang")


@pytest.mark.parametrize(("t", "hi", "page", "want"), [(32, 64, 64, "tilelang"), (1, 64, 64, "triton"),
                                                      (128, 8, 64, "triton"), (128, 64, 32, "triton")])  # fmt: skip
def test_logits_auto_by_batch_and_geometry(t, hi, page, want):
    q8 = torch.zeros(t, hi, 128, dtype=torch.float8_e4m3fn)
    cache = IndexerKeyCache.allocate(2, page, dim=128)
    assert _pick("index_logits", lambda b: _tilelang_logits_fast(b, q8, cache)) == want


def test_auto_on_cpu_is_the_reference():
    assert _backend.resolve("attend", "auto", torch.device("cpu"))[0] == "torch"
