"""Triton quantize + paged store (`dsv4fn.formats.triton`) against the torch references, byte for byte.

Every test compares the WHOLE cache tensor after the store: written records, scale records (pad
bytes 0), and every byte the store must not touch (the caches start as random bytes). The
reference always runs on CPU (on CUDA torch divides by a Python scalar through its reciprocal, which
changes `indexer_fp8`'s `amax / 448` in the last bit); the kernels run in the Triton interpreter
without a GPU and compiled with one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest
import triton
import triton.language as tl
from torch import Tensor

from dsv4fn import _backend
from dsv4fn.formats import indexer_fp8, model1, store_index_keys, store_kv
from dsv4fn.formats import triton as tk
from dsv4fn.state import IndexerKeyCache, PagedKVCache

V4 = dict(nope_dim=448, rope_dim=64, tile=64)
TINY = dict(nope_dim=32, rope_dim=32, tile=32)
SEED = 8086


def _gen(k: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + k)


def _e4m3_midpoints() -> Tensor:
    """fp32 values half-way between consecutive positive e4m3 values (subnormal and normal)."""
    grid = torch.arange(0, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return (grid[:-1] + grid[1:]) / 2  # exact in fp32 and in bf16 (4 significant bits)


def _model1_x(n: int, geo: dict, gen: torch.Generator) -> Tensor:
    """bf16 [n, d] with varied tile magnitudes and the corner cases of the quantizer."""
    nope, rope, tile = geo["nope_dim"], geo["rope_dim"], geo["tile"]
    nt = nope // tile
    x = torch.randn(n, nope + rope, generator=gen)
    e = torch.randint(-40, 41, (n, nt, 1), generator=gen).float()
    x[:, :nope] = (x[:, :nope].view(n, nt, tile) * torch.exp2(e)).view(n, nope)
    rows = torch.arange(n)
    last = (nt - 1) * tile
    x[rows % 8 == 1, :tile] *= 1e-7  # amax far below the 1e-4 * 448 floor
    x[rows % 8 == 2, :tile] = 0.0  # an all-zero tile
    x[rows % 8 == 3, last:nope] = torch.randn(int((rows % 8 == 3).sum()), tile, generator=gen) * 1e-39  # subnormals
    x[rows % 8 == 4, last:nope] *= 2.0**-120  # bf16 near its smallest normals, with subnormal entries
    # ties: a tile whose amax is exactly 448 * 2^s holds e4m3 midpoints * 2^s (round-to-nearest-even)
    mids = _e4m3_midpoints()
    for r in rows[rows % 8 == 5].tolist():
        s = int(torch.randint(-12, 12, (1,), generator=gen))
        pick = mids[torch.randint(0, mids.numel(), (tile,), generator=gen)]
        sign = torch.where(torch.rand(tile, generator=gen) < 0.5, -1.0, 1.0)
        vals = pick * sign
        vals[0] = 448.0
        x[r, last:nope] = vals * 2.0**s
    # exact zeros (both signs) inside tiles
    x[:, 5::37] = 0.0
    x[rows % 3 == 0, 7::41] = -0.0
    xb = x.to(torch.bfloat16)
    # rope dims: arbitrary bf16 bit patterns (NaN payloads, infs, subnormals) must be copied raw
    bits = torch.randint(-(2**15), 2**15, (n, rope), generator=gen, dtype=torch.int32).to(torch.int16)
    xb.view(torch.int16)[rows % 4 == 0, nope:] = bits[rows % 4 == 0]
    return xb


def _loc(n: int, num_slots: int, gen: torch.Generator, p_skip: float = 0.15) -> Tensor:
    loc = torch.randperm(num_slots, generator=gen)[:n]
    skip = torch.rand(n, generator=gen) < p_skip
    return torch.where(skip, -1, loc).to(torch.int32)


def _random_cache(cls, *args, gen: torch.Generator, **kw):
    c = cls.allocate(*args, **kw)
    c.data.copy_(torch.randint(0, 256, c.data.shape, generator=gen, dtype=torch.int32).to(torch.uint8))
    return c


def _assert_bytes_equal(name: str, expect: Tensor, got: Tensor) -> None:
    got = got.cpu()
    assert got.shape == expect.shape and got.dtype == expect.dtype
    bad = (got != expect).nonzero()
    if bad.shape[0]:
        p, b = bad[0].tolist()
        raise AssertionError(
            f"{name}: {bad.shape[0]} cache bytes differ, first at page {p} byte {b}: "
            f"{got[p, b].item()} != {expect[p, b].item()}"
        )


# ---------------------------------------------------------------------------------------------
# the e4m3 encoder alone, on every bf16 value and on fp32 ties
# ---------------------------------------------------------------------------------------------


@triton.jit
def _encode_kernel(v_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(v_ptr + i, mask=m, other=0.0)
    tl.store(o_ptr + i, tk._e4m3_bits(v).to(tl.uint8), mask=m)


def test_e4m3_encoder_matches_torch(device):
    gen = _gen(1)
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    mids = _e4m3_midpoints()
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2 + 1)])
    near = torch.cat([near, -near, torch.tensor([448.0, 464.0, 463.99997, 480.0, 2.0**-10, 2.0**-10 * 1.0001])])
    rnd_bits = torch.randint(100 << 23, 136 << 23, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    rnd = rnd_bits.view(torch.float32) * torch.where(torch.rand(1 << 18, generator=gen) < 0.5, -1.0, 1.0)
    v = torch.cat([every_bf16, near, rnd]).contiguous()
    # the encoder saturates |v| > 448 to +-448 (the quantizer never exceeds 448 anyway); torch's own cast of
    # out-of-range values changed between versions (2.11: NaN above 464, 2.13: +-448), so saturate first
    expect = v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    out = torch.empty(v.numel(), dtype=torch.uint8, device=device)
    block = 1 << 16 if device == "cpu" else 1024
    _encode_kernel[(triton.cdiv(v.numel(), block),)](v.to(device), out, v.numel(), BLOCK=block)
    got = out.cpu()
    bad = (got != expect).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{bad.numel()} encodings differ, e.g. {v[i].item()!r}: {got[i].item():#x} != {expect[i].item():#x}"
        )


# ---------------------------------------------------------------------------------------------
# MODEL1
# ---------------------------------------------------------------------------------------------

M1_CASES = [
    ("v4-p64", V4, 64, 14, 200),
    ("v4-p128", V4, 128, 6, 160),
    ("tiny-p16", TINY, 16, 24, 200),
]


@pytest.mark.parametrize("case", M1_CASES, ids=[c[0] for c in M1_CASES])
def test_store_model1_bytes(case, device):
    name, geo, page, pages, n = case
    gen = _gen(2)
    ref = _random_cache(PagedKVCache, pages, page, gen=gen, **geo)
    got = PagedKVCache(data=ref.data.clone().to(device), page_size=page, **geo)
    x = _model1_x(n, geo, gen)
    loc = _loc(n, ref.num_slots, gen)
    expect = model1.store(ref, x, loc)
    out = tk.store_model1(got, x.to(device), loc.to(device))
    assert isinstance(out, PagedKVCache) and out.data.data_ptr() == got.data.data_ptr()
    assert (out.page_size, out.nope_dim, out.rope_dim, out.tile) == (page, *geo.values())
    _assert_bytes_equal(f"model1 {name}", expect.data, out.data)


def test_store_model1_sequence_and_step(device):
    """Several stores into one cache through the public step (overwrites, all-skipped batch, empty batch)."""
    gen = _gen(3)
    ref = _random_cache(PagedKVCache, 5, 64, gen=gen, **V4)
    cache = PagedKVCache(data=ref.data.clone().to(device), page_size=64, **V4)
    for i, n in enumerate((40, 40, 7, 0)):
        x = _model1_x(n, V4, gen)
        loc = _loc(n, ref.num_slots, gen) if i != 2 else torch.full((n,), -1, dtype=torch.int32)
        ref = model1.store(ref, x, loc)
        cache = store_kv(cache, x.to(device), loc.to(device), backend="triton")
        _assert_bytes_equal(f"model1 step {i}", ref.data, cache.data)


def test_store_model1_strided_rows(device):
    gen = _gen(4)
    ref = _random_cache(PagedKVCache, 4, 16, gen=gen, **TINY)
    cache = PagedKVCache(data=ref.data.clone().to(device), page_size=16, **TINY)
    wide = _model1_x(30, dict(nope_dim=64, rope_dim=32, tile=32), gen)
    x = wide[:, :64]  # rows with stride 96
    loc = _loc(30, ref.num_slots, gen)
    ref = model1.store(ref, x, loc)
    cache = tk.store_model1(cache, x.to(device), loc.to(device))
    _assert_bytes_equal("model1 strided", ref.data, cache.data)


def test_store_model1_dequantizes(device):
    """Sanity beside byte equality: the stored records dequantize to x within e4m3 precision."""
    gen = _gen(5)
    cache = PagedKVCache.allocate(3, 64, device=device, **V4)
    x = (torch.randn(100, 512, generator=gen) * 3).to(torch.bfloat16)
    loc = torch.randperm(cache.num_slots, generator=gen)[:100].to(torch.int32)
    cache = tk.store_model1(cache, x.to(device), loc.to(device))
    back = model1.gather(PagedKVCache(data=cache.data.cpu(), page_size=64, **V4), loc)
    assert torch.equal(back[:, 448:], x[:, 448:])
    err = (back[:, :448].float() - x[:, :448].float()).abs()
    assert (err <= x[:, :448].float().abs() * 2.0**-4 + 2.0**-9 * 8).all()


# ---------------------------------------------------------------------------------------------
# indexer keys
# ---------------------------------------------------------------------------------------------


def _indexer_k(n: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    k = torch.randn(n, dim, generator=gen) * torch.exp2(torch.randint(-40, 41, (n, 1), generator=gen).float())
    rows = torch.arange(n)
    k[rows % 8 == 1] *= 1e-9  # amax below the 1e-4 floor
    k[rows % 8 == 2] = 0.0  # all zero
    k[rows % 8 == 3] *= 2.0**-110  # tiny values, some subnormal in bf16
    mids = _e4m3_midpoints()
    for r in rows[rows % 8 == 5].tolist():  # amax = 448 * 2^s: sf = 2^s exactly, values on e4m3 ties
        s = int(torch.randint(-12, 12, (1,), generator=gen))
        vals = mids[torch.randint(0, mids.numel(), (dim,), generator=gen)]
        vals = vals * torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
        vals[0] = 448.0
        k[r] = vals * 2.0**s
    k[:, 3::29] = 0.0
    k[rows % 3 == 0, 11::31] = -0.0
    return k.to(dtype)


IX_CASES = [
    ("bf16-d128-p64", torch.bfloat16, 128, 64, 8, 200),
    ("fp32-d128-p64", torch.float32, 128, 64, 8, 200),
    ("fp32-d128-p16", torch.float32, 128, 16, 24, 250),
    ("bf16-d32-p16", torch.bfloat16, 32, 16, 12, 150),
]


@pytest.mark.parametrize("case", IX_CASES, ids=[c[0] for c in IX_CASES])
def test_store_indexer_bytes(case, device):
    name, dtype, dim, page, pages, n = case
    gen = _gen(6)
    ref = _random_cache(IndexerKeyCache, pages, page, dim=dim, gen=gen)
    got = IndexerKeyCache(data=ref.data.clone().to(device), page_size=page, dim=dim)
    k = _indexer_k(n, dim, dtype, gen)
    loc = _loc(n, ref.num_slots, gen)
    expect = indexer_fp8.store(ref, k, loc)
    out = tk.store_indexer(got, k.to(device), loc.to(device))
    assert isinstance(out, IndexerKeyCache) and out.data.data_ptr() == got.data.data_ptr()
    _assert_bytes_equal(f"indexer {name}", expect.data, out.data)


def test_store_indexer_step_int64_loc(device):
    gen = _gen(7)
    ref = _random_cache(IndexerKeyCache, 4, 64, dim=128, gen=gen)
    cache = IndexerKeyCache(data=ref.data.clone().to(device), page_size=64, dim=128)
    k = _indexer_k(90, 128, torch.float32, gen)
    loc = _loc(90, ref.num_slots, gen)
    ref = indexer_fp8.store(ref, k, loc)
    cache = store_index_keys(cache, k.to(device), loc.to(device), backend="triton")
    _assert_bytes_equal("indexer step", ref.data, cache.data)
    k2 = _indexer_k(20, 128, torch.bfloat16, gen)
    loc2 = _loc(20, ref.num_slots, gen).long()
    ref = indexer_fp8.store(ref, k2, loc2)
    cache = tk.store_indexer(cache, k2.to(device), loc2.to(device))
    _assert_bytes_equal("indexer int64 loc", ref.data, cache.data)


# ---------------------------------------------------------------------------------------------
# dispatch, errors, op schemas
# ---------------------------------------------------------------------------------------------


def test_backend_registered(device):
    dev = torch.device(device)
    assert _backend.resolve("store_model1", "triton", dev) == ("triton", tk.store_model1)
    assert _backend.resolve("store_indexer", "triton", dev) == ("triton", tk.store_indexer)


def test_bad_inputs(device):
    cache = PagedKVCache.allocate(2, 16, device=device, **TINY)
    x = torch.randn(3, 64, device=device).to(torch.bfloat16)
    loc = torch.zeros(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="x"):
        tk.store_model1(cache, x[:, :60], loc)
    with pytest.raises(ValueError, match="loc"):
        tk.store_model1(cache, x, loc[:2])
    with pytest.raises(TypeError, match="loc"):
        tk.store_model1(cache, x, loc.float())
    bad = PagedKVCache(data=cache.data[:, :-8], page_size=16, **TINY)
    with pytest.raises(ValueError, match=r"cache\.data"):
        tk.store_model1(bad, x, loc)
    odd = PagedKVCache.allocate(2, 16, nope_dim=48, rope_dim=16, tile=24, device=device)
    with pytest.raises(ValueError, match="tile"):
        tk.store_model1(odd, torch.zeros(3, 64, dtype=torch.bfloat16, device=device), loc)
    ic = IndexerKeyCache.allocate(2, 16, dim=32, device=device)
    with pytest.raises(TypeError, match="k"):
        tk.store_indexer(ic, torch.zeros(3, 32, dtype=torch.float16, device=device), loc)
    with pytest.raises(ValueError, match="k"):
        tk.store_indexer(ic, torch.zeros(3, 33, device=device), loc)


def test_ops_schema(device):
    """opcheck's schema (declared mutation) and autograd-registration tests; full opcheck: gpu test."""
    gen = _gen(8)
    utils = ("test_schema", "test_autograd_registration")
    c = PagedKVCache.allocate(4, 16, device=device, **TINY)
    x = _model1_x(20, TINY, gen).to(device)
    loc = _loc(20, c.num_slots, gen).to(device)
    torch.library.opcheck(torch.ops.dsv4fn.store_model1.default, (c.data, x, loc, 16, 32, 32, 32), test_utils=utils)
    ic = IndexerKeyCache.allocate(4, 16, dim=32, device=device)
    k = _indexer_k(20, 32, torch.float32, gen).to(device)
    torch.library.opcheck(torch.ops.dsv4fn.store_indexer_keys.default, (ic.data, k, loc, 16, 32), test_utils=utils)


# ---------------------------------------------------------------------------------------------
# GPU: V4 sizes (4096 tokens), full opcheck, CUDA-graph capture
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("page", [64, 128])
def test_gpu_v4_model1(page):
    gen = _gen(9)
    n = 4096
    pages = 2 * n // page
    ref = _random_cache(PagedKVCache, pages, page, gen=gen, **V4)
    cache = PagedKVCache(data=ref.data.cuda(), page_size=page, **V4)
    x = _model1_x(n, V4, gen)
    loc = _loc(n, ref.num_slots, gen)
    ref = model1.store(ref, x, loc)
    cache = tk.store_model1(cache, x.cuda(), loc.cuda())
    torch.cuda.synchronize()
    _assert_bytes_equal(f"gpu model1 p{page}", ref.data, cache.data)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_v4_indexer(dtype):
    gen = _gen(10)
    n = 4096
    ref = _random_cache(IndexerKeyCache, 2 * n // 64, 64, dim=128, gen=gen)
    cache = IndexerKeyCache(data=ref.data.cuda(), page_size=64, dim=128)
    k = _indexer_k(n, 128, dtype, gen)
    loc = _loc(n, ref.num_slots, gen)
    ref = indexer_fp8.store(ref, k, loc)
    cache = tk.store_indexer(cache, k.cuda(), loc.cuda())
    torch.cuda.synchronize()
    _assert_bytes_equal(f"gpu indexer {dtype}", ref.data, cache.data)


@pytest.mark.gpu
def test_gpu_opcheck():
    gen = _gen(11)
    c = PagedKVCache.allocate(8, 64, device="cuda", **V4)
    x = _model1_x(50, V4, gen).cuda()
    loc = _loc(50, c.num_slots, gen).cuda()
    torch.library.opcheck(torch.ops.dsv4fn.store_model1.default, (c.data, x, loc, 64, 448, 64, 64))
    ic = IndexerKeyCache.allocate(8, 64, dim=128, device="cuda")
    for dtype in (torch.bfloat16, torch.float32):
        k = _indexer_k(50, 128, dtype, gen).cuda()
        torch.library.opcheck(torch.ops.dsv4fn.store_indexer_keys.default, (ic.data, k, loc, 64, 128))


@pytest.mark.gpu
def test_gpu_cuda_graph_decode():
    """The decode-size store captures into a CUDA graph and replays with new inputs."""
    gen = _gen(12)
    ref = _random_cache(PagedKVCache, 16, 64, gen=gen, **V4)
    cache = PagedKVCache(data=ref.data.cuda(), page_size=64, **V4)
    ic_ref = _random_cache(IndexerKeyCache, 16, 64, dim=128, gen=gen)
    ic = IndexerKeyCache(data=ic_ref.data.cuda(), page_size=64, dim=128)
    x = torch.zeros(32, 512, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(32, 128, device="cuda")
    loc = torch.full((32,), -1, dtype=torch.int32, device="cuda")
    tk.store_model1(cache, x, loc)  # compile outside the capture
    tk.store_indexer(ic, k, loc)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tk.store_model1(cache, x, loc)
        tk.store_indexer(ic, k, loc)
    for _ in range(3):
        xn, kn, ln = _model1_x(32, V4, gen), _indexer_k(32, 128, torch.float32, gen), _loc(32, ref.num_slots, gen)
        x.copy_(xn)
        k.copy_(kn)
        loc.copy_(ln)
        g.replay()
        ref = model1.store(ref, xn, ln)
        ic_ref = indexer_fp8.store(ic_ref, kn, ln)
    torch.cuda.synchronize()
    _assert_bytes_equal("gpu graph model1", ref.data, cache.data)
    _assert_bytes_equal("gpu graph indexer", ic_ref.data, ic.data)
