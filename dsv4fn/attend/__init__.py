"""`attend`: sparse attention over the window cache (main) and a compressed cache (extra)."""

import torch
from jaxtyping import BFloat16, Float32, Int32
from torch import Tensor

from .. import _backend
from .._contracts import (
    check_page_layout,
    check_same_device,
    check_tensor,
    contract,
    require,
    validate_range,
    validating,
)
from ..state import PagedKVCache
from .reference import sparse_attention

_backend.register("attend", "torch")(sparse_attention)


def _check_cache(name: str, cache: PagedKVCache, d: int) -> None:
    require(isinstance(cache, PagedKVCache), f"{name}: expected a PagedKVCache, got {type(cache).__name__}", TypeError)
    # pages on 8-byte boundaries: the kernels read 8-byte words and bf16 rope values from the page bytes
    check_page_layout(f"{name}.data", cache.data, page_bytes=cache.page_bytes, align=8)
    require(cache.head_dim == d, f"{name}: head dim {cache.head_dim} != q head dim {d}")


def _tilelang_fast(cache: PagedKVCache, extra: PagedKVCache | None) -> bool:
    """Whether "auto" may pick the TileLang attention: its warp-specialized kernel takes the V4 geometry
    (448 + 64, tile 64) on pages of whole 576-byte records, 16-byte aligned; other layouts would run its
    legacy kernel, slower than Triton."""
    return all(
        (c.nope_dim, c.rope_dim, c.tile) == (448, 64, 64)
        and c.data.stride(0) % 576 == 0
        and (torch.compiler.is_compiling() or c.data.data_ptr() % 16 == 0)  # Dynamo cannot read data_ptr
        for c in ((cache,) if extra is None else (cache, extra))
    )


def _lone_long_row(queries: int, k2: int) -> bool:
    """One query over a very long compressed list (a 1M-token HCA row has 8192 entries): "auto" keeps Triton,
    whose split combine streams the partials (H100, bench/results/h100, cold L2: 42.8 against TileLang's 47.3 us
    for V4-Flash, 42.8 against 46.1 for V4-Pro); from 8 rows, or at 64k (512 entries), TileLang is as fast
    or faster (batch 8 at 1M: 50.4 against 72.9)."""
    return queries == 1 and k2 >= 4096


def _check_lens(name: str, lens: Tensor | None, b: int) -> None:
    if lens is not None:
        check_tensor(name, lens, dtype=torch.int32, shape=(b,))


@contract
def attend(
    q: BFloat16[Tensor, "b s_q h d"],
    cache: PagedKVCache,
    indices: Int32[Tensor, "b s_q k1"],
    lens: Int32[Tensor, " b"] | None = None,
    *,
    extra_cache: PagedKVCache | None = None,
    extra_indices: Int32[Tensor, "b s_q k2"] | None = None,
    extra_lens: Int32[Tensor, " b"] | None = None,
    sink: Float32[Tensor, " h"] | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[BFloat16[Tensor, "b s_q h d"], Float32[Tensor, "b h s_q"]]:
    """Sparse FP8-cache attention with FlashMLA's DSV4 semantics (spec §6).

    q bf16 `[b, s_q, h, d]`; `indices` int32 `[b, s_q, k]` cache slots (−1 = none); `lens` int32 `[b]`
    cuts each row's list short; the same for the extra cache. `sink` fp32 `[h]`. Returns
    (o bf16 `[b, s_q, h, d]`, lse fp32 `[b, h, s_q]`, natural log; o = 0 and lse = +inf for a query
    with nothing to attend).
    """
    check_tensor("q", q, dtype=torch.bfloat16, ndim=4, last_dim_contiguous=True)
    b, s_q, h, d = q.shape
    _check_cache("cache", cache, d)
    check_tensor("indices", indices, dtype=torch.int32, ndim=3, shape=(b, s_q, None))
    _check_lens("lens", lens, b)
    require((extra_cache is None) == (extra_indices is None), "extra_cache and extra_indices go together")
    if extra_cache is not None and extra_indices is not None:
        _check_cache("extra_cache", extra_cache, d)
        check_tensor("extra_indices", extra_indices, dtype=torch.int32, ndim=3, shape=(b, s_q, None))
    else:
        require(extra_lens is None, "extra_lens given without extra_cache")
    _check_lens("extra_lens", extra_lens, b)
    if sink is not None:
        check_tensor("sink", sink, dtype=torch.float32, shape=(h,))
    check_same_device(q=q, cache=cache.data, indices=indices, lens=lens, sink=sink, extra_indices=extra_indices)
    if validating():
        validate_range("indices", indices, 0, cache.num_slots, allow=-1)
        if extra_cache is not None and extra_indices is not None:
            validate_range("extra_indices", extra_indices, 0, extra_cache.num_slots, allow=-1)
        if lens is not None:
            validate_range("lens", lens, 0, indices.shape[-1] + 1)
        if extra_lens is not None and extra_indices is not None:
            validate_range("extra_lens", extra_lens, 0, extra_indices.shape[-1] + 1)
    k2 = 0 if extra_indices is None else extra_indices.shape[-1]

    def tilelang_fits(name: str) -> bool:
        return name != "tilelang" or (_tilelang_fast(cache, extra_cache) and not _lone_long_row(b * s_q, k2))

    _, fn = _backend.resolve("attend", backend, q.device, tilelang_fits)
    return fn(
        q,
        cache,
        indices,
        lens,
        extra_cache=extra_cache,
        extra_indices=extra_indices,
        extra_lens=extra_lens,
        sink=sink,
        scale=d**-0.5 if scale is None else float(scale),
    )


__all__ = ["attend", "sparse_attention"]
