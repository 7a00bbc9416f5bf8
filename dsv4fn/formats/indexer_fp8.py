"""DeepGEMM's paged FP8 indexer key cache and the FP8 indexer query, reference implementation.

Keys: per key a non-power-of-two fp32 scale `s = max(amax, 1e-4) / 448` and `e4m3(k * (1/s))`
(DeepGEMM's `per_custom_dims_cast_to_fp8` rule). A page of `P` keys stores `P × dim` value bytes,
then `P` fp32 scales (little-endian): 132 bytes per key for dim 128.
Queries: the same rule per (token, head); the scale is folded into the head weights.
"""

import torch
from torch import Tensor

from ..state import IndexerKeyCache

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row FP8 over the last dim: (e4m3 values, fp32 scale `[...]`)."""
    amax = x.abs().float().amax(dim=-1, keepdim=True).clamp(AMAX_FLOOR)
    # tensor / tensor is a correctly rounded division on every device (CUDA turns `/ 448.0` into
    # a multiplication by fl(1/448), 1 ulp off in about half of the cases)
    sf = amax / amax.new_full((), FP8_MAX)
    q = (x.float() * (1.0 / sf)).to(torch.float8_e4m3fn)
    return q, sf.squeeze(-1)


def _split_page(cache: IndexerKeyCache) -> tuple[Tensor, Tensor]:
    p, d = cache.page_size, cache.dim
    vals = cache.data[:, : p * d].view(cache.num_pages, p, d)
    scales = cache.data[:, p * d :].view(cache.num_pages, p, 4)
    return vals, scales


def store(cache: IndexerKeyCache, k: Tensor, loc: Tensor) -> IndexerKeyCache:
    """Quantize keys `k [n, dim]` and write key i at slot `loc[i]`; `loc < 0` is skipped. Donates."""
    keep = loc >= 0
    k, loc = k[keep], loc[keep].long()
    q, sf = quantize_rows(k)
    vals, scales = _split_page(cache)
    page, off = loc // cache.page_size, loc % cache.page_size
    vals[page, off] = q.view(torch.uint8)
    scales[page, off] = sf.contiguous().view(torch.uint8).view(-1, 4)
    return IndexerKeyCache(data=cache.data, page_size=cache.page_size, dim=cache.dim)


def gather(cache: IndexerKeyCache, loc: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 values `[..., dim]`, fp32 scales `[...]`) at slots `loc`; slots < 0 give 0 / 0."""
    flat = loc.reshape(-1).long()
    safe = flat.clamp_min(0)
    vals, scales = _split_page(cache)
    page, off = safe // cache.page_size, safe % cache.page_size
    v = vals[page, off].view(torch.float8_e4m3fn)
    s = scales[page, off].contiguous().view(torch.float32).squeeze(-1)
    valid = flat >= 0
    v = torch.where(valid.unsqueeze(-1), v.float(), 0.0).to(torch.float8_e4m3fn)
    s = torch.where(valid, s, 0.0)
    return v.reshape(*loc.shape, cache.dim), s.reshape(loc.shape)


def dequantize(values: Tensor, scales: Tensor) -> Tensor:
    return values.float() * scales.unsqueeze(-1)
