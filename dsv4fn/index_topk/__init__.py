"""`index_topk`: the lightning indexer — FP8 paged MQA logits over visible CSA entries, then top-k."""

import torch
from jaxtyping import Float8e4m3fn, Float32, Int32
from torch import Tensor

from .. import _backend
from .._contracts import (
    check_page_layout,
    check_same_device,
    check_tensor,
    contract,
    require,
    validate_capacity,
    validate_range,
    validating,
)
from ..state import CompressedStreamMeta, DSV4AttnMetadata, IndexerKeyCache
from .reference import key_slots, paged_logits, prepare_query, select_topk

_backend.register("index_logits", "torch")(paged_logits)
_backend.register("topk", "torch")(select_topk)


def _compare_topk(expect: tuple[Tensor, Tensor], got: tuple[Tensor, Tensor]) -> str | None:
    """Index sets per row must match (ties break either way only when the caller checks logits)."""
    (ei, el), (gi, gl) = expect, got
    if not torch.equal(el, gl):
        return "lengths differ"
    es, gs = ei.sort(dim=-1).values, gi.sort(dim=-1).values
    bad = (es != gs).any(dim=-1).nonzero()
    return None if bad.numel() == 0 else f"{bad.shape[0]} rows select different sets (first row {bad[0].item()})"


_backend.register_comparator("topk", _compare_topk)


def _check(q8: Tensor, weights: Tensor, cache: IndexerKeyCache, meta: DSV4AttnMetadata) -> CompressedStreamMeta:
    require(meta.csa is not None, "metadata has no CSA stream (config without a ratio-4 layer)")
    assert meta.csa is not None
    t = meta.num_tokens
    check_tensor("q8", q8, dtype=torch.float8_e4m3fn, ndim=3, shape=(t, None, cache.dim), contiguous=True)
    check_tensor("weights", weights, dtype=torch.float32, shape=(t, q8.shape[1]), contiguous=True)
    require(
        isinstance(cache, IndexerKeyCache), f"cache: expected IndexerKeyCache, got {type(cache).__name__}", TypeError
    )
    check_page_layout("cache.data", cache.data, page_bytes=cache.page_size * (cache.dim + 4), align=4)
    require(
        cache.page_size == meta.csa.page_size,
        f"cache.page_size: expected {meta.csa.page_size} (block_size / ratio), got {cache.page_size}",
    )
    check_same_device(q8=q8, weights=weights, cache=cache.data, page_table=meta.page_table)
    if validating():
        validate_range("page_table", meta.page_table, 0, cache.num_pages, allow=-1)
        validate_capacity("meta.csa.visible", meta.csa.visible, meta.page_table, cache.page_size)
    return meta.csa


def _tilelang_logits_fast(backend: str, q8: Tensor, cache: IndexerKeyCache) -> bool:
    """Whether "auto" may pick a backend for the logits: TileLang where it takes the geometry (page 64, dim 128,
    16..256 heads in steps of 16) and wins (H200, bench/results/h200: 22.6 / 44.4 / 79.0 / 144.1 us at t = 32 /
    64 / 128 / 256 against Triton's 26.7 / 48.7 / 91.4 / 175.9; at t = 1 Triton takes 2.5 us, TileLang 11.5)."""
    if backend != "tilelang":
        return True
    hi = q8.shape[1]
    return q8.shape[0] >= 32 and cache.page_size == 64 and cache.dim == 128 and hi % 16 == 0 and 16 <= hi <= 256


def logits_width(meta: DSV4AttnMetadata) -> int:
    """Columns of the logits buffer: the longest visible list rounded up to a cache page."""
    assert meta.csa is not None
    page = meta.csa.page_size
    return max(page, -(-(meta.max_seq_len // meta.csa.ratio) // page) * page)


@contract
def index_logits(
    q8: Float8e4m3fn[Tensor, "t hi di"],
    weights: Float32[Tensor, "t hi"],
    cache: IndexerKeyCache,
    meta: DSV4AttnMetadata,
    *,
    backend: str | None = None,
) -> Float32[Tensor, "t width"]:
    """fp32 `[t, width]` logits `s_k · Σ_h w'_h · relu(q8_h · k8_j)` for `j < visible[t]`, −inf after."""
    return _logits(q8, weights, cache, meta, _check(q8, weights, cache, meta), logits_width(meta), backend)


def _logits(
    q8: Tensor, weights: Tensor, cache: IndexerKeyCache, meta: DSV4AttnMetadata, csa: CompressedStreamMeta,
    width: int, backend: str | None,
) -> Tensor:  # fmt: skip
    """`index_logits` after its checks (index_topk has made them already); `width` = `logits_width(meta)`."""
    _, fn = _backend.resolve("index_logits", backend, q8.device, lambda b: _tilelang_logits_fast(b, q8, cache))
    return fn(q8, weights, cache, meta.page_table, meta.token_request, csa.visible, width)


def _fused_topk(backend: str | None, q8: Tensor, cache: IndexerKeyCache, topk: int, max_visible: int):
    """The fused indexer + top-k (never writes the logits) on CUDA: when the TileLang backend is chosen
    explicitly (argument or DSV4FN_BACKEND), and under "auto" where it beats logits + top-k
    (`tilelang.fused_is_fast`); "compare" keeps the two-step path."""
    name = backend or _backend.default_backend()
    if q8.device.type != "cuda" or name not in ("tilelang", "auto"):
        return None

    def fast(b: str) -> bool:
        from .tilelang import fused_is_fast  # (imported only once "auto" has loaded the TileLang backend)

        t, hi = q8.shape[0], q8.shape[1]
        sms = _backend.sm_count(q8.device)
        return b == "tilelang" and fused_is_fast(t, hi, max_visible, topk, cache.page_size, cache.dim, sms)

    try:
        got, fn = _backend.resolve("index_topk_fused", name, q8.device, fast if name == "auto" else None)
    except ValueError:  # TileLang not installed
        return None
    return fn if got == "tilelang" else None


@contract
def index_topk(
    q8: Float8e4m3fn[Tensor, "t hi di"],
    weights: Float32[Tensor, "t hi"],
    cache: IndexerKeyCache,
    meta: DSV4AttnMetadata,
    *,
    topk: int | None = None,
    backend: str | None = None,
) -> tuple[Int32[Tensor, "t k"], Int32[Tensor, " t"]]:
    """Top-k CSA entries per query token: (cache slots int32 `[t, pad(topk)]`, −1 padded; lengths
    int32 `[t]` = min(visible, topk)). Rows with `visible <= topk` select all entries in order."""
    csa = _check(q8, weights, cache, meta)
    k = meta.topk if topk is None else topk
    require(1 <= k <= csa.width, f"topk: expected 1..{csa.width} (the index width), got {k}")
    width = logits_width(meta)  # the longest visible list: the logits' columns, the fused op's bound
    fused = _fused_topk(backend, q8, cache, k, width)
    if fused is not None:
        return fused(
            q8, weights, cache, meta.page_table, meta.token_request, csa.visible, k, csa.width, max_visible=width
        )
    logits = _logits(q8, weights, cache, meta, csa, width, backend)
    _, fn = _backend.resolve("topk", backend, q8.device)
    return fn(logits, csa.visible, k, csa.width, meta.page_table, meta.token_request, csa.page_size)


__all__ = ["index_logits", "index_topk", "key_slots", "logits_width", "prepare_query", "select_topk"]
