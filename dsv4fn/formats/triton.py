"""Triton quantize + paged-store kernels for the two FP8 cache formats, byte-exact with the references.

* `dsv4fn::store_model1(cache, x, loc, page_size, nope_dim, rope_dim, tile)`: MODEL1 (`model1.py`).
  Per `tile` nope values: `e = ceil(log2(max(amax / 448, 1e-4)))` taken exactly from the fp32 bits of
  the quotient (exponent, +1 when the mantissa is not zero), value bytes `e4m3(x * 2^-e)` (a product
  by an exact power of two rounds like torch's division by `2^e`), scale byte `e + 127`, pad bytes 0;
  the rope dims are copied as raw bf16 bits.
* `dsv4fn::store_indexer_keys(cache, k, loc, page_size, dim)`: DeepGEMM's indexer keys
  (`indexer_fp8.py`): `sf = max(amax, 1e-4) / 448`, values `e4m3(k * (1 / sf))`, fp32 scale bytes.

Both skip `loc < 0` (nothing is written), read bf16 inputs as raw bits and encode e4m3 in integer
math (round to nearest even; torch's CPU results for every input, saturating above 448), so the
same code is exact on the GPU and in the Triton CPU interpreter (whose own fp8 cast rounds ties
away). IEEE division (`div_rn`) is used where the reference divides. One program per token, no
host synchronisation (CUDA-graph capturable).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from .._contracts import check_same_device
from .._triton_common import call_op, next_pow2, triton_op
from ..state import IndexerKeyCache, PagedKVCache


@triton.jit
def _e4m3_bits(v):
    """fp32 -> e4m3fn byte (int32 0..255), round to nearest even, as torch's `.to(float8_e4m3fn)`:
    |v| > 448 (inf included) saturates to +-448, NaN gives 0x7F | sign."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # normal e4m3 (|v| >= 2^-6): rebias the exponent by -120, round the mantissa to 3 bits, saturate
    an = tl.minimum(a, 0x43F00000)  # 480.0: rounds past 448, then clamped
    normal = tl.minimum(((an + 0x7FFFF + ((an >> 20) & 1)) >> 20) - (120 << 3), 0x7E)
    # subnormal e4m3: round(|v| * 2^9) to an integer, from the fp32 significand
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    s = tl.minimum(tl.maximum(141 - e, 21), 25)  # e <= 120 here; the clamp keeps shifts defined
    q = m >> s
    rem = m & ((1 << s) - 1)
    half = 1 << (s - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    code = tl.where(a >= (121 << 23), normal, q)
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return code | sign


@triton.jit
def _bf16_bits_to_f32(xi):
    """int16 bf16 bit patterns -> fp32 values (exact)."""
    return ((xi.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _store_model1_kernel(
    x_ptr,
    loc_ptr,
    cache_ptr,
    x_row_stride,
    page_stride,
    P: tl.constexpr,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    TILE: tl.constexpr,
    NUM_TILES: tl.constexpr,
    SCALE_BYTES: tl.constexpr,
    SB_P2: tl.constexpr,
    ROPE_P2: tl.constexpr,
    RECORD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    if slot >= 0:
        page = slot // P
        off = slot % P
        base = cache_ptr + page * page_stride
        rec = base + off * RECORD
        sc = base + P * RECORD + off * SCALE_BYTES
        x_row = x_ptr.to(tl.pointer_type(tl.int16)) + t.to(tl.int64) * x_row_stride
        tiles = tl.arange(0, SB_P2)
        lanes = tl.arange(0, TILE)
        col = tiles[:, None] * TILE + lanes[None, :]
        m = (tiles < NUM_TILES)[:, None] & (lanes < TILE)[None, :]
        f = _bf16_bits_to_f32(tl.load(x_row + col, mask=m, other=0))
        amax = tl.max(tl.abs(f), axis=1)
        q = tl.maximum(tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1e-4)
        qb = q.to(tl.int32, bitcast=True)
        e = (qb >> 23) - 127 + ((qb & 0x7FFFFF) != 0).to(tl.int32)  # exact ceil(log2(q))
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e, a normal fp32
        code = _e4m3_bits(f * inv[:, None])
        tl.store(rec + col, code.to(tl.uint8), mask=m)
        r = tl.arange(0, ROPE_P2)
        rope = tl.load(x_row + NOPE + r, mask=r < ROPE, other=0)
        tl.store((rec + NOPE).to(tl.pointer_type(tl.int16)) + r, rope, mask=r < ROPE)
        sbyte = tl.where(tiles < NUM_TILES, e + 127, 0)
        tl.store(sc + tiles, sbyte.to(tl.uint8), mask=tiles < SCALE_BYTES)


@triton.jit
def _store_indexer_kernel(
    k_ptr,
    loc_ptr,
    cache_ptr,
    k_row_stride,
    page_stride,
    P: tl.constexpr,
    DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    K_BF16: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    if slot >= 0:
        page = slot // P
        off = slot % P
        base = cache_ptr + page * page_stride
        cols = tl.arange(0, DIM_P2)
        m = cols < DIM
        if K_BF16:
            row = k_ptr.to(tl.pointer_type(tl.int16)) + t.to(tl.int64) * k_row_stride
            f = _bf16_bits_to_f32(tl.load(row + cols, mask=m, other=0))
        else:
            f = tl.load(k_ptr + t.to(tl.int64) * k_row_stride + cols, mask=m, other=0.0)
        amax = tl.maximum(tl.max(tl.abs(f), axis=0), 1e-4)
        sf = tl.div_rn(amax, 448.0)
        inv = tl.div_rn(1.0, sf)
        code = _e4m3_bits(f * inv)
        tl.store(base + off * DIM + cols, code.to(tl.uint8), mask=m)
        b = tl.arange(0, 4)
        sbits = sf.to(tl.int32, bitcast=True)
        sbytes = (sbits >> (8 * b)) & 0xFF  # little-endian fp32
        tl.store(base + P * DIM + off * 4 + b, sbytes.to(tl.uint8))


# ---------------------------------------------------------------------------------------------
# host checks
# ---------------------------------------------------------------------------------------------


def _check_cache_data(data: Tensor, page_bytes: int) -> None:
    if not isinstance(data, Tensor):
        raise TypeError(f"cache.data: expected a torch.Tensor, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        raise TypeError(f"cache.data: expected dtype uint8, got {data.dtype}")
    if data.dim() != 2 or data.shape[1] != page_bytes:
        raise ValueError(f"cache.data: expected shape [*, {page_bytes}], got {list(data.shape)}")
    if data.shape[1] > 1 and data.stride(1) != 1:
        raise ValueError(f"cache.data: expected unit stride in the last dim, got strides {data.stride()}")


def _check_rows(name: str, x: Tensor, dtypes: tuple[torch.dtype, ...], d: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(t) for t in dtypes)}, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"{name}: expected shape [n, {d}], got {list(x.shape)}")
    if d > 1 and x.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dim, got strides {x.stride()}")


def _check_loc(loc: Tensor, n: int) -> None:
    if not isinstance(loc, Tensor):
        raise TypeError(f"loc: expected a torch.Tensor, got {type(loc).__name__}")
    if loc.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"loc: expected dtype int32 or int64, got {loc.dtype}")
    if tuple(loc.shape) != (n,):
        raise ValueError(f"loc: expected shape [{n}], got {list(loc.shape)}")


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------


@triton_op("dsv4fn::store_model1", mutates_args=("cache",))
def store_model1_op(
    cache: Tensor, x: Tensor, loc: Tensor, page_size: int, nope_dim: int, rope_dim: int, tile: int
) -> None:
    """Quantize bf16 rows `x [n, nope + rope]` into the MODEL1 page bytes `cache [pages, page_bytes]`
    at slots `loc [n]` (< 0: skipped)."""
    n = x.shape[0]
    if n == 0:
        return
    num_tiles = nope_dim // tile
    record = nope_dim + 2 * rope_dim
    scale_bytes = (num_tiles + 1 + 7) // 8 * 8
    loc = loc.contiguous()
    torch.library.wrap_triton(_store_model1_kernel)[(n,)](
        x,
        loc,
        cache,
        x.stride(0),
        cache.stride(0),
        P=page_size,
        NOPE=nope_dim,
        ROPE=rope_dim,
        TILE=tile,
        NUM_TILES=num_tiles,
        SCALE_BYTES=scale_bytes,
        SB_P2=next_pow2(scale_bytes),
        ROPE_P2=next_pow2(max(rope_dim, 1)),
        RECORD=record,
        num_warps=4,
    )


@triton_op("dsv4fn::store_indexer_keys", mutates_args=("cache",))
def store_indexer_keys_op(cache: Tensor, k: Tensor, loc: Tensor, page_size: int, dim: int) -> None:
    """Quantize keys `k [n, dim]` (bf16 or fp32) into the indexer page bytes `cache [pages,
    page_size * (dim + 4)]` at slots `loc [n]` (< 0: skipped)."""
    n = k.shape[0]
    if n == 0:
        return
    loc = loc.contiguous()
    torch.library.wrap_triton(_store_indexer_kernel)[(n,)](
        k,
        loc,
        cache,
        k.stride(0),
        cache.stride(0),
        P=page_size,
        DIM=dim,
        DIM_P2=next_pow2(dim),
        K_BF16=k.dtype == torch.bfloat16,
        num_warps=1 if dim <= 256 else 4,
    )


# ---------------------------------------------------------------------------------------------
# backend adapters: the reference's signatures
# ---------------------------------------------------------------------------------------------


@_backend.register("store_model1", "triton")
def store_model1(cache: PagedKVCache, x: Tensor, loc: Tensor) -> PagedKVCache:
    """Triton `model1.store`: same bytes. Donates `cache`: the result shares its storage."""
    tile = cache.tile
    if tile < 2 or tile & (tile - 1) or cache.nope_dim % tile:
        raise ValueError(f"cache.tile: expected a power of two >= 2 dividing nope_dim {cache.nope_dim}, got {tile}")
    _check_cache_data(cache.data, cache.page_bytes)
    if cache.data.storage_offset() % 2 or cache.data.stride(0) % 2:
        raise ValueError("cache.data: the bf16 rope values need 2-byte aligned records (even offset and page stride)")
    if isinstance(x, Tensor) and x.dtype != torch.bfloat16 and x.is_floating_point():
        x = x.to(torch.bfloat16)  # the reference quantizes x.to(bfloat16)
    _check_rows("x", x, (torch.bfloat16,), cache.head_dim)
    _check_loc(loc, x.shape[0])
    check_same_device(x=x, loc=loc, cache=cache.data)
    call_op(store_model1_op, cache.data, x, loc, cache.page_size, cache.nope_dim, cache.rope_dim, tile)
    return PagedKVCache(
        data=cache.data, page_size=cache.page_size, nope_dim=cache.nope_dim, rope_dim=cache.rope_dim, tile=tile
    )


@_backend.register("store_indexer", "triton")
def store_indexer(cache: IndexerKeyCache, k: Tensor, loc: Tensor) -> IndexerKeyCache:
    """Triton `indexer_fp8.store`: same bytes. Donates `cache`: the result shares its storage."""
    _check_cache_data(cache.data, cache.page_size * (cache.dim + 4))
    _check_rows("k", k, (torch.bfloat16, torch.float32), cache.dim)
    _check_loc(loc, k.shape[0])
    check_same_device(k=k, loc=loc, cache=cache.data)
    call_op(store_indexer_keys_op, cache.data, k, loc, cache.page_size, cache.dim)
    return IndexerKeyCache(data=cache.data, page_size=cache.page_size, dim=cache.dim)


__all__ = ["store_indexer", "store_model1"]
