"""DeepGEMM's FP8 paged MQA logits (the lightning indexer's scoring) on dsv4fn.

`fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta,
max_context_len, clean_logits=False)` with DeepGEMM's layout: q e4m3 `[b, next_n, h, d]`,
`kv_cache` uint8 `[num_blocks, block_kv, 1, d + 4]` (a page: `block_kv × d` e4m3 values, then
`block_kv` fp32 scales), weights fp32 `[b·next_n, h]`, `context_lens` int32 `[b]` or
`[b, next_n]`, `block_table` int32 `[b, max_blocks]`. Result fp32 `[b·next_n, max_context_len]`:
`logit[(i, n), j] = s_j · Σ_h w_h · relu(q_h · k_j)` for valid j, −inf elsewhere (whether or not
`clean_logits` is set: dsv4fn always cleans).

Valid keys of row (i, n): with 1-D `context_lens`, `j < context_lens[i] − next_n + n + 1` (the
causal rule over the next_n draft tokens); with 2-D, `j < context_lens[i, n]`.
`get_paged_mqa_logits_metadata` returns a schedule tensor that is accepted and ignored.
"""

import torch
from torch import Tensor

from .. import _backend
from .._contracts import check_same_device, check_tensor, require, validate_capacity, validate_range, validating
from ..state import IndexerKeyCache


def get_paged_mqa_logits_metadata(context_lens: Tensor, block_kv: int, num_sms: int) -> Tensor:
    """DeepGEMM-shaped schedule (int32 `[num_sms + 1, 2]`); dsv4fn's kernels schedule themselves."""
    check_tensor("context_lens", context_lens, dtype=torch.int32)
    require(block_kv > 0 and num_sms > 0, f"block_kv and num_sms must be positive, got {block_kv}, {num_sms}")
    return torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)


def fp8_paged_mqa_logits(
    q: Tensor,
    kv_cache: Tensor,
    weights: Tensor,
    context_lens: Tensor,
    block_table: Tensor,
    schedule_meta: Tensor | None,
    max_context_len: int,
    clean_logits: bool = False,
) -> Tensor:
    check_tensor("q", q, dtype=torch.float8_e4m3fn, ndim=4)
    b, next_n, h, d = q.shape
    check_tensor("kv_cache", kv_cache, dtype=torch.uint8, ndim=4, contiguous=True)
    nb, page, hk, tb = kv_cache.shape
    require(
        hk == 1 and tb == d + 4, f"kv_cache: expected [num_blocks, block_kv, 1, {d + 4}], got {list(kv_cache.shape)}"
    )
    check_tensor("weights", weights, dtype=torch.float32, shape=(b * next_n, h))
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2, shape=(b, None))
    check_tensor("context_lens", context_lens, dtype=torch.int32)
    require(max_context_len >= 0, f"max_context_len: expected >= 0, got {max_context_len}")
    check_same_device(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table)
    del schedule_meta, clean_logits
    dev = q.device
    n = torch.arange(next_n, device=dev, dtype=torch.int32)
    if context_lens.dim() == 1:
        require(context_lens.shape[0] == b, f"context_lens: expected shape [{b}] or [{b}, {next_n}]")
        lens = context_lens.view(b, 1) - next_n + n.view(1, next_n) + 1
    else:
        check_tensor("context_lens", context_lens, shape=(b, next_n))
        lens = context_lens
    if validating():
        validate_range("block_table", block_table, 0, nb, allow=-1)
        validate_capacity("context_lens", lens, block_table, page)
    visible = lens.clamp(0, max_context_len).reshape(-1).to(torch.int32).contiguous()
    cache = IndexerKeyCache(data=kv_cache.view(nb, page * (d + 4)), page_size=page, dim=d)
    req = torch.arange(b, device=dev, dtype=torch.int32).repeat_interleave(next_n)
    _, fn = _backend.resolve("index_logits", None, dev)
    return fn(
        q.reshape(b * next_n, h, d).contiguous(),
        weights.contiguous(),
        cache,
        block_table,
        req,
        visible,
        max_context_len,
    )
