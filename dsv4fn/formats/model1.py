"""The MODEL1 FP8 attention cache (FlashMLA's DSV4 layout), reference implementation.

Per token: `nope_dim` e4m3 bytes + `rope_dim` bf16 values (the data record, 576 B for 448 + 64),
then a scale record of one UE8M0 byte per `tile` nope values plus a pad byte (8 B). A page stores
its `P` data records first, then its `P` scale records; the page stride is padded up to a multiple
of the data record size.

Quantization of one tile `x` (bf16 input, fp32 math), FlashMLA's `tests/quant.py` rule:
    scale = 2 ** ceil(log2(max(amax(x) / 448, 1e-4)))      (a power of two; byte = log2 + 127)
    byte  = e4m3fn(x / scale)                               (round to nearest even)
Dequantization `e4m3 * scale` is exact in bf16 and fp32. The pad byte is written as 0.
"""

import torch
from torch import Tensor

from ..state import PagedKVCache

FP8_MAX = 448.0
SCALE_FLOOR = 1e-4


def ue8m0_scale(amax: Tensor) -> Tensor:
    """Power-of-two scale (fp32) for tiles with fp32 `amax` (already abs-maxed)."""
    return torch.pow(
        2.0, torch.clamp_min(amax.float() / amax.new_full((), FP8_MAX, dtype=torch.float32), SCALE_FLOOR).log2().ceil()
    )


def quantize_tokens(x: Tensor, nope_dim: int, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """`x` bf16 `[n, d]` -> (nope e4m3 as uint8 `[n, nope]`, rope bf16 `[n, d - nope]`, scale bytes uint8
    `[n, nope/tile]`)."""
    n = x.shape[0]
    nope = x[:, :nope_dim].reshape(n, nope_dim // tile, tile)
    scale = ue8m0_scale(nope.abs().amax(dim=-1))  # [n, tiles] fp32
    q = (nope.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    scale_byte = (scale.log2() + 127).to(torch.uint8)
    return q.view(torch.uint8).reshape(n, nope_dim), x[:, nope_dim:].contiguous(), scale_byte


def dequantize_tokens(nope_u8: Tensor, rope: Tensor, scale_byte: Tensor, tile: int) -> Tensor:
    """Inverse of `quantize_tokens`, exact, bf16 `[n, d]`."""
    n, nope_dim = nope_u8.shape
    vals = nope_u8.view(torch.float8_e4m3fn).float().reshape(n, nope_dim // tile, tile)
    scale = torch.pow(2.0, scale_byte.float() - 127.0).unsqueeze(-1)
    nope = (vals * scale).reshape(n, nope_dim).to(torch.bfloat16)
    return torch.cat([nope, rope.to(torch.bfloat16)], dim=-1)


def _split_page(cache: PagedKVCache) -> tuple[Tensor, Tensor]:
    """Views (data records `[pages, P, record]`, scale records `[pages, P, scale_bytes]`) of the cache."""
    p = cache.page_size
    rec = cache.data[:, : p * cache.record_bytes].view(cache.num_pages, p, cache.record_bytes)
    sc = cache.data[:, p * cache.record_bytes : p * cache.token_bytes].view(cache.num_pages, p, cache.scale_bytes)
    return rec, sc


def store(cache: PagedKVCache, x: Tensor, loc: Tensor) -> PagedKVCache:
    """Quantize bf16 `x [n, d]` and write token i at slot `loc[i]`; `loc < 0` is skipped.

    Donates `cache`: the returned cache shares (and supersedes) its storage.
    """
    keep = loc >= 0
    x, loc = x[keep], loc[keep].long()
    nope, rope, sb = quantize_tokens(x.to(torch.bfloat16), cache.nope_dim, cache.tile)
    rec, sc = _split_page(cache)
    page, off = loc // cache.page_size, loc % cache.page_size
    record = torch.cat([nope, rope.contiguous().view(torch.uint8)], dim=-1)
    rec[page, off] = record
    pad = torch.zeros(sb.shape[0], cache.scale_bytes - sb.shape[1], dtype=torch.uint8, device=sb.device)
    sc[page, off] = torch.cat([sb, pad], dim=-1)
    return PagedKVCache(
        data=cache.data, page_size=cache.page_size, nope_dim=cache.nope_dim, rope_dim=cache.rope_dim, tile=cache.tile
    )


def gather(cache: PagedKVCache, loc: Tensor) -> Tensor:
    """Dequantized bf16 records at slots `loc` (any shape); slots < 0 read as 0."""
    flat = loc.reshape(-1).long()
    safe = flat.clamp_min(0)
    rec, sc = _split_page(cache)
    page, off = safe // cache.page_size, safe % cache.page_size
    r = rec[page, off]  # [n, record]
    s = sc[page, off, : cache.num_tiles]
    out = dequantize_tokens(
        r[:, : cache.nope_dim].contiguous(), r[:, cache.nope_dim :].contiguous().view(torch.bfloat16), s, cache.tile
    )
    out = torch.where((flat >= 0).unsqueeze(-1), out, torch.zeros_like(out))
    return out.reshape(*loc.shape, cache.head_dim)


def dequantize_cache(cache: PagedKVCache) -> Tensor:
    """Every slot of the cache, dequantized, bf16 `[n_pages * P, d]`."""
    return gather(cache, torch.arange(cache.num_slots, device=cache.data.device))
