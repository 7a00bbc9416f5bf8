"""The checks of issue 8 that `dsv4fn._contracts` adds as helpers: page layout / alignment of cache bytes
(tier 1), lengths within the page table's capacity and positions that never go backwards on a
compressor-state slot (tier 3, DSV4FN_VALIDATE=1). Each error names the argument, the expected and the
actual value; with the tier off the tier-3 helpers read nothing (meta tensors pass)."""

import gc

import pytest
import torch

from dsv4fn import _contracts
from dsv4fn._contracts import check_page_layout, validate_capacity, validate_positions
from dsv4fn.state import IndexerKeyCache, PagedKVCache

TINY = dict(nope_dim=32, rope_dim=32, tile=32)


@pytest.fixture
def validate_on(monkeypatch):
    monkeypatch.setattr(_contracts, "VALIDATE", True)


def _i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# tier 1: page layout
# ---------------------------------------------------------------------------------------------


def test_page_layout_accepts_the_allocated_layouts():
    c = PagedKVCache.allocate(3, 16, **TINY)
    assert check_page_layout("cache.data", c.data, page_bytes=c.page_bytes, align=8) is c.data
    v4 = PagedKVCache.allocate(2, 64)
    check_page_layout("cache.data", v4.data, page_bytes=v4.page_bytes, align=8)
    ic = IndexerKeyCache.allocate(3, 64, dim=128)
    check_page_layout("cache.data", ic.data, page_bytes=ic.page_size * 132, align=4)
    # FlashMLA-style extra padding between pages: a wider stride that keeps the alignment is fine
    wide = torch.zeros(3, v4.page_bytes + 576, dtype=torch.uint8)[:, : v4.page_bytes]
    check_page_layout("k_cache", wide, page_bytes=v4.page_bytes, align=8)
    # one page: its stride does not matter
    one = torch.zeros(1, v4.page_bytes + 4, dtype=torch.uint8)[:, : v4.page_bytes]
    check_page_layout("k_cache", one, page_bytes=v4.page_bytes, align=8)


def test_page_layout_errors_name_the_argument():
    c = PagedKVCache.allocate(3, 16, **TINY)
    pb = c.page_bytes
    assert pb % 8 == 0
    with pytest.raises(TypeError, match=r"cache\.data: expected dtype uint8, got int8"):
        check_page_layout("cache.data", c.data.view(torch.int8), page_bytes=pb, align=8)
    with pytest.raises(ValueError, match=rf"cache.data: expected shape \[\*, {pb + 8}\], got \[3, {pb}\]"):
        check_page_layout("cache.data", c.data, page_bytes=pb + 8, align=8)
    with pytest.raises(ValueError, match=r"cache\.data: expected rank 2, got rank 1"):
        check_page_layout("cache.data", c.data.view(-1), page_bytes=pb, align=8)
    misaligned_stride = torch.zeros(3, pb + 4, dtype=torch.uint8)[:, :pb]
    with pytest.raises(
        ValueError, match=rf"extra_cache.data: expected a page stride that is a multiple of 8 bytes, got {pb + 4}"
    ):
        check_page_layout("extra_cache.data", misaligned_stride, page_bytes=pb, align=8)
    check_page_layout("indexer", misaligned_stride, page_bytes=pb, align=4)  # 4-byte pages are fine there
    buf = torch.zeros(3 * pb + 8, dtype=torch.uint8)
    shifted = buf[3 : 3 + 3 * pb].view(3, pb)
    with pytest.raises(
        ValueError, match=r"cache\.data: expected the first page at a multiple of 8 bytes, got storage offset 3"
    ):
        check_page_layout("cache.data", shifted, page_bytes=pb, align=8)
    overlapping = buf.as_strided((3, pb), (pb // 2, 1))
    with pytest.raises(ValueError, match=rf"cache.data: pages overlap: page stride {pb // 2} < page_bytes {pb}"):
        check_page_layout("cache.data", overlapping, page_bytes=pb, align=8)
    strided = torch.zeros(3, 2 * pb, dtype=torch.uint8)[:, ::2]
    with pytest.raises(ValueError, match=r"cache.data: expected unit stride inside a page, got strides \("):
        check_page_layout("cache.data", strided, page_bytes=pb, align=8)
    with pytest.raises(TypeError, match=r"cache\.data: expected a torch\.Tensor, got PagedKVCache"):
        check_page_layout("cache.data", c, page_bytes=pb, align=8)


# ---------------------------------------------------------------------------------------------
# tier 3: lengths within the page table's capacity
# ---------------------------------------------------------------------------------------------


def test_capacity_is_off_by_default_and_reads_nothing():
    assert not _contracts.VALIDATE
    table = torch.zeros(2, 4, dtype=torch.int32)
    validate_capacity("visible", _i32(0, 10_000), table, 64)  # not checked
    validate_capacity("visible", torch.empty(2, dtype=torch.int32, device="meta"), table, 64)  # no data read


def test_capacity_names_the_argument(validate_on):
    table = torch.zeros(2, 4, dtype=torch.int32)
    validate_capacity("visible", _i32(0, 1, 256), table, 64)  # 4 pages of 64: up to 256 entries
    validate_capacity("visible", torch.zeros(0, dtype=torch.int32), table, 64)
    with pytest.raises(
        ValueError, match=r"visible: value 300 at \[1\] exceeds the page table's capacity 256 \(4 pages of 64\)"
    ):
        validate_capacity("visible", _i32(5, 300, 7), table, 64)
    with pytest.raises(ValueError, match=r"context_lens: value -2 at \[0, 1\] outside \[0, 257\)"):
        validate_capacity("context_lens", torch.tensor([[0, -2]], dtype=torch.int32), table, 64)


# ---------------------------------------------------------------------------------------------
# tier 3: positions on a compressor-state slot
# ---------------------------------------------------------------------------------------------


def test_positions_off_by_default_and_read_nothing():
    assert not _contracts.VALIDATE
    state = torch.zeros(2, 8, 8)
    meta = torch.empty(2, dtype=torch.int32, device="meta")
    validate_positions("meta.prefix_lens", state, meta, meta, meta)
    validate_positions("meta.prefix_lens", state, _i32(0, 0), _i32(5, 5), _i32(1, 1))
    validate_positions("meta.prefix_lens", state, _i32(0, 0), _i32(2, 2), _i32(1, 1))  # not checked
    assert id(state) not in _contracts._positions


def test_positions_continue_restart_and_refuse_going_backwards(validate_on):
    state = torch.zeros(3, 8, 8)
    check = validate_positions
    check("meta.prefix_lens", state, _i32(0, 2), _i32(0, 0), _i32(5, 3))  # prefill: slots 0 and 2
    check("meta.prefix_lens", state, _i32(0, 2), _i32(5, 3), _i32(1, 1))  # decode continues
    check("meta.prefix_lens", state, _i32(2, 1), _i32(4, 9), _i32(2, 1))  # slot 1 unseen: its history is unknown
    check("meta.prefix_lens", state, _i32(1), _i32(10), _i32(1))  # slot 1 continues from 9 + 1
    with pytest.raises(
        ValueError,
        match=r"meta.prefix_lens: request 1 \(state slot 0\) starts at position 4 but the slot's last step ended at "
        r"6: the position goes backwards \(prefix_lens 0 starts a new request on the slot\)",
    ):
        check("meta.prefix_lens", state, _i32(2, 0), _i32(6, 4), _i32(1, 1))
    with pytest.raises(
        ValueError, match=r"request 0 \(state slot 2\) starts at position 9 .* ended at 6: .* skips ahead"
    ):
        check("meta.prefix_lens", state, _i32(2), _i32(9), _i32(1))
    check("meta.prefix_lens", state, _i32(0), _i32(0), _i32(7))  # prefix 0: a new request reuses slot 0
    check("meta.prefix_lens", state, _i32(0), _i32(7), _i32(1))
    with pytest.raises(
        ValueError, match=r"meta\.prefix_lens: state slot 2 is used by more than one request of the step"
    ):
        check("meta.prefix_lens", state, _i32(2, 0, 2), _i32(6, 8, 6), _i32(1, 1, 1))


def test_positions_are_tracked_per_state_and_dropped_with_it(validate_on):
    a, b = torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)  # e.g. the indexer's and the attention's compressor state
    validate_positions("meta.prefix_lens", a, _i32(0), _i32(0), _i32(8))
    validate_positions("meta.prefix_lens", b, _i32(0), _i32(0), _i32(4))
    validate_positions("meta.prefix_lens", a, _i32(0), _i32(8), _i32(1))
    validate_positions("meta.prefix_lens", b, _i32(0), _i32(4), _i32(1))
    key = id(a)
    assert key in _contracts._positions
    del a
    gc.collect()
    assert key not in _contracts._positions
