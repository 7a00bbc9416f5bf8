"""The page-layout, capacity and position checks fire through the public steps (not only as helpers)."""

import pytest
import torch

from dsv4fn import DSV4Config, _contracts, attend, compress, plan, store_index_keys, store_kv
from dsv4fn.compress import CompressorParams
from dsv4fn.norm_rope import rope_frequencies
from dsv4fn.state import IndexerKeyCache, PagedKVCache

CFG = DSV4Config.tiny()
TINY = dict(nope_dim=32, rope_dim=32, tile=32)


def _misaligned(c: PagedKVCache) -> PagedKVCache:
    """The same pages one byte into a larger buffer: page 0 no longer starts on an 8-byte boundary."""
    buf = torch.zeros(c.data.numel() + 1, dtype=torch.uint8)
    data = buf[1:].view(c.data.shape)
    return PagedKVCache(data=data, page_size=c.page_size, nope_dim=c.nope_dim, rope_dim=c.rope_dim, tile=c.tile)


def test_attend_and_store_refuse_misaligned_pages():
    c = _misaligned(PagedKVCache.allocate(2, 16, **TINY))
    q = torch.randn(1, 1, 4, 64).bfloat16()
    idx = torch.zeros(1, 1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache\.data: expected the first page at a multiple of 8 bytes"):
        attend(q, c, idx, scale=0.1)
    with pytest.raises(ValueError, match=r"cache\.data: expected the first page at a multiple of 8 bytes"):
        store_kv(c, torch.randn(2, 64).bfloat16(), torch.tensor([0, 1], dtype=torch.int32))


def test_store_index_keys_refuses_overlapping_pages():
    ic = IndexerKeyCache.allocate(3, 16, dim=64)
    pb = 16 * 68
    overlapping = ic.data.view(-1)[: 2 * pb].as_strided((2, pb), (pb - 4, 1))
    bad = IndexerKeyCache(data=overlapping, page_size=16, dim=64)
    with pytest.raises(ValueError, match=r"cache\.data: pages overlap"):
        store_index_keys(bad, torch.randn(1, 64).bfloat16(), torch.tensor([0], dtype=torch.int32))


def _params(ratio: int = 4, dim: int = 64) -> CompressorParams:
    g = torch.Generator().manual_seed(0)
    h = CFG.hidden_size
    return CompressorParams(
        wkv=(torch.randn(2 * dim, h, generator=g) * h**-0.5).bfloat16(),
        wgate=(torch.randn(2 * dim, h, generator=g) * h**-0.5).bfloat16(),
        ape=torch.randn(ratio, 2 * dim, generator=g),
        norm=1 + 0.1 * torch.randn(dim, generator=g),
        ratio=ratio,
        dim=dim,
        overlap=True,
        rotate=False,
    )


def test_compress_refuses_positions_going_backwards(monkeypatch):
    monkeypatch.setattr(_contracts, "VALIDATE", True)
    p = _params()
    pt = torch.arange(4, dtype=torch.int32).view(1, 4)
    sw = torch.zeros(1, 8, dtype=torch.int32)
    cache = PagedKVCache.allocate(4, CFG.block_size // 4, **TINY)
    freqs = rope_frequencies(CFG, 4)
    state = p.empty_state(1)
    x = torch.randn(8, CFG.hidden_size).bfloat16()
    slots = torch.tensor([0], dtype=torch.int32)
    state, _, cache = compress(p, state, x[:5], plan(CFG, [0], [5], pt, sw, slots), cache, freqs, backend="torch")
    state, _, cache = compress(p, state, x[5:6], plan(CFG, [5], [1], pt, sw, slots), cache, freqs, backend="torch")
    with pytest.raises(ValueError, match=r"meta\.prefix_lens: request 0 \(state slot 0\) starts at position 3"):
        compress(p, state, x[3:4], plan(CFG, [3], [1], pt, sw, slots), cache, freqs, backend="torch")


def test_norm_rope_helpers_name_bad_arguments():
    from dsv4fn import apply_rope, hadamard, norm_rope, rms_normalize

    x = torch.randn(3, 4, 64)
    cos, sin = torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    assert norm_rope(x, None, 1e-6, cos, sin).shape == x.shape  # valid calls still work
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor, got torch.int32"):
        rms_normalize(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight: expected shape \[64\], got \[32\]"):
        rms_normalize(x, torch.ones(32))
    with pytest.raises(ValueError, match=r"sin: expected the shape of cos"):
        apply_rope(x, cos, sin[..., :8])
    with pytest.raises(ValueError, match=r"cos: expected a last dim of 1\.\.32"):
        apply_rope(x, torch.randn(3, 1, 40), torch.randn(3, 1, 40))
    with pytest.raises(ValueError, match=r"cos: leading dims \[5, 1\] do not broadcast"):
        norm_rope(x, None, 1e-6, torch.randn(5, 1, 16), torch.randn(5, 1, 16))
    with pytest.raises(ValueError, match=r"power of two for the Hadamard transform, got 48"):
        hadamard(torch.randn(2, 48))
