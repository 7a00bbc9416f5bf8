"""Cache byte formats: MODEL1 FP8 attention cache and DeepGEMM's FP8 indexer key cache.

`store_kv` / `store_index_keys` are the backend-dispatched quantize + paged-store steps.
"""

import torch
from jaxtyping import BFloat16, Float, Int32
from torch import Tensor

from .. import _backend
from .._contracts import (
    check_not_donated,
    check_page_layout,
    check_same_device,
    check_tensor,
    contract,
    mark_donated,
    require,
    validate_range,
    validating,
)
from ..state import IndexerKeyCache, PagedKVCache
from . import indexer_fp8, model1

_backend.register("store_model1", "torch")(model1.store)
_backend.register("store_indexer", "torch")(indexer_fp8.store)


@contract
def store_kv(
    cache: PagedKVCache, x: BFloat16[Tensor, "n d"], loc: Int32[Tensor, " n"], *, backend: str | None = None
) -> PagedKVCache:
    """FP8-quantize bf16 rows `x [n, d]` into the MODEL1 cache at slots `loc [n]` (−1 skipped). Donates
    `cache` (with `DSV4FN_VALIDATE=1`, passing it to a step again raises: use the returned cache)."""
    require(isinstance(cache, PagedKVCache), f"cache: expected a PagedKVCache, got {type(cache).__name__}", TypeError)
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(None, cache.head_dim), last_dim_contiguous=True)
    check_tensor("loc", loc, dtype=torch.int32, shape=(x.shape[0],))
    check_page_layout("cache.data", cache.data, page_bytes=cache.page_bytes, align=8)
    check_same_device(x=x, loc=loc, cache=cache.data)
    checking = validating()
    if checking:
        check_not_donated("store_kv", {"cache": cache})
        validate_range("loc", loc, 0, cache.num_slots, allow=-1)
    _, fn = _backend.resolve("store_model1", backend, x.device)
    out = fn(cache, x, loc)
    if checking:
        mark_donated("store_kv", (cache,), (out,))
    return out


@contract
def store_index_keys(
    cache: IndexerKeyCache, k: Float[Tensor, "n dim"], loc: Int32[Tensor, " n"], *, backend: str | None = None
) -> IndexerKeyCache:
    """FP8-quantize keys `k [n, dim]` (per-key fp32 scale) into the indexer cache at `loc`. Donates `cache`
    (with `DSV4FN_VALIDATE=1`, passing it to a step again raises: use the returned cache)."""
    require(
        isinstance(cache, IndexerKeyCache), f"cache: expected an IndexerKeyCache, got {type(cache).__name__}", TypeError
    )
    check_tensor("k", k, dtype=(torch.bfloat16, torch.float32), ndim=2, shape=(None, cache.dim))
    check_tensor("loc", loc, dtype=torch.int32, shape=(k.shape[0],))
    check_page_layout("cache.data", cache.data, page_bytes=cache.page_size * (cache.dim + 4), align=4)
    check_same_device(k=k, loc=loc, cache=cache.data)
    checking = validating()
    if checking:
        check_not_donated("store_index_keys", {"cache": cache})
        validate_range("loc", loc, 0, cache.num_slots, allow=-1)
    _, fn = _backend.resolve("store_indexer", backend, k.device)
    out = fn(cache, k, loc)
    if checking:
        mark_donated("store_index_keys", (cache,), (out,))
    return out


__all__ = ["indexer_fp8", "model1", "store_index_keys", "store_kv"]
