"""FlashMLA's sparse FP8 decode interface for the DSV4 ("MODEL1", 584-byte) cache, on dsv4fn.

Same argument names, shapes, dtypes and results as `flash_mla.flash_mla_with_kvcache` in sparse
FP8 mode: `k_cache` `[num_blocks, page_block_size, 1, 584]` (uint8 or float8_e4m3fn view of pages
laid out as FlashMLA's `quantize_k_cache` does, page stride padded to a multiple of 576 bytes),
`indices` int32 `[b, s_q, topk]` holding `page * page_block_size + offset` (−1 skipped), optional
`topk_length` int32 `[b]`, the same for `extra_*`; `attn_sink` fp32 `[h]`. Returns
`out` bf16 `[b, s_q, h, 512]` and `lse` fp32 `[b, h, s_q]` (natural log, sink not included;
`+inf` and `out = 0` for a query with nothing to attend — lengths of 0 are accepted).

Rejected with a clear error: dense mode (`indices=None`), `causal=True`, `is_fp8_kvcache=False`,
`head_dim_v != 512`, and V3.2's 656-byte layout. The scheduler metadata is accepted and otherwise
ignored (dsv4fn plans elsewhere), but, as in FlashMLA, it pins the shapes of the first call.
"""

import dataclasses

import torch
from torch import Tensor

from .._contracts import check_tensor, require
from ..attend import attend
from ..state import PagedKVCache, page_bytes_model1

MODEL1 = dict(nope_dim=448, rope_dim=64, tile=64)
TOKEN_BYTES = 584


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Stands in for FlashMLA's scheduler object: remembers the shapes of the first call."""

    config: tuple | None = None


def get_mla_metadata(*args: object, **kwargs: object) -> tuple[FlashMLASchedMeta, None]:
    """Like FlashMLA's: arguments are accepted for compatibility and ignored."""
    return FlashMLASchedMeta(), None


def _as_cache(name: str, k: Tensor) -> PagedKVCache:
    check_tensor(name, k, dtype=(torch.uint8, torch.float8_e4m3fn), ndim=4)
    nb, page, hk, tb = k.shape
    require(hk == 1, f"{name}: expected num_heads_k 1, got {hk}")
    if tb == 656:
        raise ValueError(f"{name}: V3.2's 656-byte FP8 layout is not supported; dsv4fn reads the DSV4 584-byte layout")
    require(tb == TOKEN_BYTES, f"{name}: expected {TOKEN_BYTES} bytes per token (MODEL1), got {tb}")
    pb = page_bytes_model1(page, **MODEL1)
    require(
        k.stride(3) == 1 and k.stride(1) == TOKEN_BYTES and (nb == 1 or k.stride(0) == pb),
        f"{name}: expected FlashMLA's page layout (page stride {pb} bytes, token stride 584), got strides {k.stride()}",
    )
    u8 = k.view(torch.uint8)
    data = u8.as_strided((nb, pb), (pb, 1))
    return PagedKVCache(data=data, page_size=page, **MODEL1)


def flash_mla_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    block_table: Tensor | None,
    cache_seqlens: Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Tensor | None = None,
    attn_sink: Tensor | None = None,
    extra_k_cache: Tensor | None = None,
    extra_indices_in_kvcache: Tensor | None = None,
    topk_length: Tensor | None = None,
    extra_topk_length: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """FlashMLA's sparse decode (see the module docstring). Dispatches to the dsv4fn backend chosen
    by `DSV4FN_BACKEND` (default "auto")."""
    require(
        isinstance(tile_scheduler_metadata, FlashMLASchedMeta),
        "tile_scheduler_metadata: expected the object returned by dsv4fn.compat.flash_mla.get_mla_metadata",
        TypeError,
    )
    require(num_splits is None, "num_splits: must be None (as in FlashMLA)")
    if indices is None:
        raise ValueError("dense FlashMLA mode (indices=None) is not supported: dsv4fn implements the sparse FP8 path")
    require(not causal, "causal: must be False in sparse mode")
    require(is_fp8_kvcache, "is_fp8_kvcache: must be True in sparse mode")
    require(head_dim_v == 512, f"head_dim_v: expected 512, got {head_dim_v}")
    del block_table, cache_seqlens  # unused in sparse mode, as in FlashMLA
    check_tensor("q", q, dtype=torch.bfloat16, ndim=4)
    require(q.shape[-1] == 512, f"q: expected head dim 512, got {q.shape[-1]}")
    cache = _as_cache("k_cache", k_cache)
    extra = _as_cache("extra_k_cache", extra_k_cache) if extra_k_cache is not None else None
    require(
        (extra is None) == (extra_indices_in_kvcache is None), "extra_k_cache and extra_indices_in_kvcache go together"
    )
    cfg = (
        q.shape[0],
        q.shape[1],
        q.shape[2],
        k_cache.shape[1],
        indices.shape[-1],
        None if extra_k_cache is None else extra_k_cache.shape[1],
        None if extra_indices_in_kvcache is None else extra_indices_in_kvcache.shape[-1],
    )
    meta = tile_scheduler_metadata
    if meta.config is None:
        meta.config = cfg
    elif meta.config != cfg:
        raise ValueError(
            "tile_scheduler_metadata: shapes (b, s_q, h, page, topk, extra page, extra topk) changed from "
            f"{meta.config} to {cfg}; get a new one from get_mla_metadata() when shapes change (as in FlashMLA)"
        )
    return attend(
        q,
        cache,
        indices,
        topk_length,
        extra_cache=extra,
        extra_indices=extra_indices_in_kvcache,
        extra_lens=extra_topk_length,
        sink=attn_sink,
        scale=softmax_scale,
    )
