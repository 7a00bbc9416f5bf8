"""Cache byte formats: MODEL1 pages byte-identical to FlashMLA's layout, DeepGEMM's indexer layout."""

import math
import struct

import pytest
import torch

from dsv4fn.formats import indexer_fp8, model1, store_index_keys, store_kv
from dsv4fn.state import IndexerKeyCache, PagedKVCache, page_bytes_model1


def _e4m3_byte(v: float) -> int:
    """Independent scalar e4m3fn encoder (round to nearest even), for |v| <= 448."""
    sign = 0x80 if (v < 0 or (v == 0 and math.copysign(1, v) < 0)) else 0
    a = abs(v)
    if a == 0:
        return sign
    best, best_err = 0, float("inf")
    for code in range(0x7F):  # every finite non-negative code, pick nearest, ties to even mantissa
        e, m = code >> 3, code & 7
        val = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        err = abs(val - a)
        if err < best_err or (err == best_err and (code & 1) == 0):
            best, best_err = code, err
    return sign | best


def _flashmla_page_bytes(x: torch.Tensor, nope: int, rope: int, tile: int) -> bytes:
    """One page the way FlashMLA's tests/quant.py lays it out: P data records (nope e4m3, rope bf16),
    then P scale records (UE8M0 per tile, pad), page padded to a multiple of the record size."""
    p = x.shape[0]
    data, scales = b"", b""
    for i in range(p):
        row = x[i]
        rec = b""
        sc = b""
        for t in range(nope // tile):
            seg = row[t * tile : (t + 1) * tile].float()
            amax = seg.abs().max().item()
            s = 2.0 ** math.ceil(math.log2(max(amax / 448.0, 1e-4)))
            rec += bytes(_e4m3_byte(v / s) for v in seg.tolist())
            sc += bytes([int(math.log2(s)) + 127])
        rec += row[nope:].contiguous().view(torch.uint8).numpy().tobytes()
        data += rec
        scales += sc + bytes(((len(sc) + 1 + 7) // 8) * 8 - len(sc))  # pad to 8 bytes (MODEL1: 7 + 1)
    raw = data + scales
    pad = page_bytes_model1(p, nope, rope, tile) - len(raw)
    return raw + bytes(pad)


@pytest.mark.parametrize("geom", [(448, 64, 64, 4), (32, 32, 32, 16)], ids=["model1-P4", "tiny-P16"])
def test_model1_page_bytes_match_flashmla_layout(geom):
    nope, rope, tile, p = geom
    torch.manual_seed(1)
    x = (torch.randn(p, nope + rope) * torch.logspace(-6, 2, p).unsqueeze(1)).to(torch.bfloat16)
    x[0, :tile] = 0  # a zero tile: scale floor, zero bytes
    x[1, 3] = -0.0
    cache = PagedKVCache.allocate(2, p, nope_dim=nope, rope_dim=rope, tile=tile)
    cache.data.fill_(0xAB)  # bytes not written by the store keep this
    cache = store_kv(cache, x, torch.arange(p, 2 * p, dtype=torch.int32))  # page 1
    expect = _flashmla_page_bytes(x, nope, rope, tile)
    got = cache.data[1].numpy().tobytes()
    used = p * (nope + 2 * rope + ((nope // tile + 1 + 7) // 8) * 8)
    assert got[:used] == expect[:used]
    assert set(cache.data[0].tolist()) == {0xAB}, "page 0 was not addressed and must be untouched"


def test_model1_sizes_and_flashmla_view():
    assert page_bytes_model1(128, 448, 64, 64) == 74880
    assert page_bytes_model1(64, 448, 64, 64) == 37440
    assert page_bytes_model1(2, 448, 64, 64) == 1728
    assert page_bytes_model1(256, 448, 64, 64) == 149760
    c = PagedKVCache.allocate(3, 64)
    assert c.token_bytes == 584 and c.record_bytes == 576
    v = c.as_flashmla()
    assert v.shape == (3, 64, 1, 584) and v.stride() == (37440, 584, 584, 1)


def test_model1_roundtrip_exact_and_scales_are_powers_of_two():
    torch.manual_seed(2)
    x = (torch.randn(300, 512) * 3).to(torch.bfloat16)
    nope, rope, sb = model1.quantize_tokens(x, 448, 64)
    y = model1.dequantize_tokens(nope, rope, sb, 64)
    # dequant(e4m3) * 2^k is exact: dividing by the same scale gives back the same bytes
    scale = torch.pow(2.0, sb.float() - 127).repeat_interleave(64, dim=1)
    assert torch.all((sb > 0) & (sb < 255))
    back = (y[:, :448].float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(back, nope)
    assert torch.equal(y[:, :448].float(), nope.view(torch.float8_e4m3fn).float() * scale)
    assert torch.equal(y[:, 448:], x[:, 448:])
    rel = (y[:, :448].float() - x[:, :448].float()).abs() / x[:, :448].float().abs().amax(-1, keepdim=True)
    assert rel.max() <= 2**-4  # e4m3 has 3 mantissa bits: half-ulp of the tile max
    # subnormal and zero e4m3 bytes dequantize exactly
    u = torch.arange(256, dtype=torch.uint8).view(4, 64)
    u[:, 0x7F % 64] = 0  # avoid NaN codes 0x7F / 0xFF
    u[1, 0x3F] = 0
    u[3, 0x3F] = 0
    sbytes = torch.full((4, 1), 120, dtype=torch.uint8)
    deq = model1.dequantize_tokens(u, torch.zeros(4, 0, dtype=torch.bfloat16), sbytes, 64)
    ref = u.view(torch.float8_e4m3fn).float() * 2.0**-7
    assert torch.equal(deq.float(), ref)


def test_store_skips_negative_locations_and_gather_reads_back():
    torch.manual_seed(3)
    c = PagedKVCache.allocate(4, 16, nope_dim=32, rope_dim=32, tile=32)
    before = c.data.clone()
    x = torch.randn(5, 64).to(torch.bfloat16)
    c = store_kv(c, x, torch.full((5,), -1, dtype=torch.int32))
    assert torch.equal(c.data, before)
    loc = torch.tensor([3, -1, 40, 63, 17], dtype=torch.int32)
    c = store_kv(c, x, loc)
    got = model1.gather(c, loc)
    nope, rope, sb = model1.quantize_tokens(x, 32, 32)
    want = model1.dequantize_tokens(nope, rope, sb, 32)
    assert torch.equal(got[loc >= 0], want[loc >= 0])
    assert torch.equal(got[1], torch.zeros(64, dtype=torch.bfloat16))


def test_indexer_cache_layout_matches_deepgemm():
    torch.manual_seed(4)
    p, d = 64, 128
    k = (torch.randn(p, d) * torch.logspace(-7, 1, p).unsqueeze(1)).to(torch.bfloat16)
    cache = IndexerKeyCache.allocate(3, p, dim=d)
    cache = store_index_keys(cache, k, torch.arange(2 * p, 3 * p, dtype=torch.int32))
    page = cache.data[2].numpy().tobytes()
    assert len(page) == p * 132
    for i in (0, 1, 31, 63):
        row = k[i].float()
        amax = max(row.abs().max().item(), 1e-4)
        sf = torch.tensor(amax, dtype=torch.float32) / 448.0
        inv = (1.0 / sf).item()
        want_vals = (row * torch.tensor(inv, dtype=torch.float32)).to(torch.float8_e4m3fn).view(torch.uint8)
        assert page[i * d : (i + 1) * d] == want_vals.numpy().tobytes()
        (scale,) = struct.unpack("<f", page[p * d + 4 * i : p * d + 4 * i + 4])
        assert scale == sf.item()
    v = cache.as_deepgemm()
    assert v.shape == (3, 64, 1, 132)
    vals, scales = indexer_fp8.gather(cache, torch.tensor([128, -1, 191]))
    assert scales[1] == 0 and torch.equal(vals[1].float(), torch.zeros(128))
    assert torch.allclose(indexer_fp8.dequantize(vals[[0]], scales[[0]]), k[[0]].float(), rtol=0.07, atol=1e-6)


def test_store_rejects_bad_input():
    c = PagedKVCache.allocate(2, 16, nope_dim=32, rope_dim=32, tile=32)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16"):
        store_kv(c, torch.randn(3, 64), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="x: expected shape"):
        store_kv(c, torch.randn(3, 48).bfloat16(), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="loc: expected dtype int32"):
        store_kv(c, torch.randn(3, 64).bfloat16(), torch.zeros(3, dtype=torch.int64))
