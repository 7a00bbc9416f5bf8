"""`plan`'s checks (issue 8): tier 1 every argument (type, dtype, rank, shape, device, the config's sizes,
lengths within int32, `max_seq_len`), tier 2 the `@contract` (`DSV4FN_DEBUG=1`, in a subprocess: it is read at
import), tier 3 (`DSV4FN_VALIDATE=1`) the page tables' and state slots' values: what a bad value would
otherwise silently produce (a negative or wrapped slot, a skipped store, two tokens writing one slot)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dsv4fn import DSV4Config, _contracts, plan

CFG = DSV4Config.tiny()  # block 32 (ratio-4 pages of 8 entries, ratio-16 pages of 2), window 16, swa pages of 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def validate_on(monkeypatch):
    monkeypatch.setattr(_contracts, "VALIDATE", True)


def _tables(b: int = 2, blocks: int = 2, swa: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.arange(b * blocks, dtype=torch.int32).view(b, blocks),
        torch.arange(b * swa, dtype=torch.int32).view(b, swa),
    )


def _i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# tier 1
# ---------------------------------------------------------------------------------------------


def test_lengths_accept_ints_of_any_container():
    pt, sw = _tables()
    ref = plan(CFG, [3, 0], [1, 5], pt, sw)
    for pre, ext in (
        ((3, 0), range(1, 6, 4)),
        (torch.tensor([3, 0]), torch.tensor([1, 5], dtype=torch.int16)),
        (np.array([3, 0]), np.array([1, 5], dtype=np.uint8)),
        ([np.int64(3), 0], [1, np.int32(5)]),
    ):
        m = plan(CFG, pre, ext, pt, sw, max_seq_len=np.int64(5))
        assert torch.equal(m.positions, ref.positions) and torch.equal(m.window_indices, ref.window_indices)


def test_lengths_errors_name_the_argument():
    pt, sw = _tables()
    with pytest.raises(TypeError, match=r"prefix_lens\[1\]: expected an int, got float 2\.7"):
        plan(CFG, [0, 2.7], [1, 1], pt, sw)  # int(2.7) would silently plan from position 2
    with pytest.raises(TypeError, match=r"extend_lens\[0\]: expected an int, got bool"):
        plan(CFG, [0, 0], [True, 1], pt, sw)
    with pytest.raises(TypeError, match=r"extend_lens: expected an integer tensor, got dtype float32"):
        plan(CFG, [0, 0], torch.tensor([1.0, 1.0]), pt, sw)
    with pytest.raises(TypeError, match=r"prefix_lens: expected an integer tensor, got dtype bool"):
        plan(CFG, torch.tensor([False, False]), [1, 1], pt, sw)
    with pytest.raises(TypeError, match=r"prefix_lens: expected an integer tensor, got dtype float64"):
        plan(CFG, np.array([0.0, 0.0]), [1, 1], pt, sw)
    with pytest.raises(ValueError, match=r"extend_lens: expected rank 1, got rank 2 \(shape \(1, 2\)\)"):
        plan(CFG, [0, 0], torch.ones(1, 2, dtype=torch.int32), pt, sw)
    with pytest.raises(TypeError, match=r"prefix_lens: expected a sequence of ints or a 1-D integer tensor, got int"):
        plan(CFG, 0, [1], pt[:1], sw[:1])
    with pytest.raises(TypeError, match=r"extend_lens: expected a sequence of ints .* got str"):
        plan(CFG, [0], "1", pt[:1], sw[:1])
    with pytest.raises(ValueError, match=r"prefix_lens: expected values >= 0, got \[0, -1\]"):
        plan(CFG, [0, -1], [1, 1], pt, sw)
    with pytest.raises(ValueError, match=r"prefix_lens \+ extend_lens: request 1 ends at 2147483648 tokens, past"):
        plan(CFG, [0, 2**31 - 1], [1, 1], pt, sw)


def test_tables_slots_and_max_seq_len_errors_name_the_argument():
    pt, sw = _tables()
    with pytest.raises(TypeError, match=r"swa_page_table: expected dtype int32, got int64"):
        plan(CFG, [0, 0], [1, 1], pt, sw.long())
    with pytest.raises(ValueError, match=r"page_table: expected rank 2, got rank 1"):
        plan(CFG, [0, 0], [1, 1], pt.view(-1), sw)
    with pytest.raises(TypeError, match=r"page_table: expected a torch\.Tensor, got list"):
        plan(CFG, [0, 0], [1, 1], pt.tolist(), sw)
    with pytest.raises(TypeError, match=r"state_slots: expected a torch\.Tensor, got list"):
        plan(CFG, [0, 0], [1, 1], pt, sw, [0, 1])
    with pytest.raises(TypeError, match=r"state_slots: expected dtype int32, got int64"):
        plan(CFG, [0, 0], [1, 1], pt, sw, torch.arange(2))
    with pytest.raises(ValueError, match=r"state_slots: expected shape \[2\], got \[3\]"):
        plan(CFG, [0, 0], [1, 1], pt, sw, _i32(0, 1, 2))
    with pytest.raises(ValueError, match=r"tensors on different devices: page_table=cpu, swa_page_table=meta"):
        plan(CFG, [0, 0], [1, 1], pt, sw.to("meta"))
    with pytest.raises(ValueError, match=r"tensors on different devices: .*state_slots=meta"):
        plan(CFG, [0, 0], [1, 1], pt, sw, _i32(0, 1).to("meta"))
    with pytest.raises(TypeError, match=r"max_seq_len: expected an int or None, got float 64\.0"):
        plan(CFG, [0, 0], [1, 1], pt, sw, max_seq_len=64.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"max_seq_len: expected an int or None, got bool"):
        plan(CFG, [0, 0], [1, 1], pt, sw, max_seq_len=True)
    with pytest.raises(ValueError, match=r"max_seq_len: 4 is shorter than the longest sequence 6"):
        plan(CFG, [5, 0], [1, 1], pt, sw, max_seq_len=4)


def test_config_errors_name_the_field():
    pt, sw = _tables()
    with pytest.raises(TypeError, match=r"config: expected a DSV4Config, got dict"):
        plan({}, [0, 0], [1, 1], pt, sw)  # type: ignore[arg-type]
    # sizes DSV4Config does not refuse itself (0 % ratio == 0) but plan divides by
    for field in ("block_size", "swa_page_size", "index_pad"):
        with pytest.raises(ValueError, match=rf"config\.{field}: expected a value >= 1, got 0"):
            plan(CFG.with_(**{field: 0}), [0, 0], [1, 1], pt, sw)
    with pytest.raises(TypeError, match=r"config\.swa_page_size: expected an int, got float 16\.0"):
        plan(CFG.with_(swa_page_size=16.0), [0, 0], [1, 1], pt, sw)


def test_empty_batch_plans_no_tokens():
    e = torch.zeros(0, 2, dtype=torch.int32)
    m = plan(CFG, [], [], e, e)
    assert m.num_tokens == 0 and m.batch_size == 0 and m.query_start.tolist() == [0]


# ---------------------------------------------------------------------------------------------
# tier 2: the contract (DSV4FN_DEBUG=1 is read at import: a subprocess)
# ---------------------------------------------------------------------------------------------


def test_debug_contract_names_the_argument_and_checks_the_result():
    code = """
    import numpy as np, torch, dsv4fn as D
    cfg = D.DSV4Config.tiny()
    pt = torch.arange(4, dtype=torch.int32).view(2, 2); sw = torch.arange(8, dtype=torch.int32).view(2, 4)
    print("wrapped", hasattr(D.plan, "__wrapped__"))
    m = D.plan(cfg, [0, 5], [7, 1], pt, sw)
    m = D.plan(cfg, np.array([0, 5]), torch.tensor([7, 1]), pt, sw, torch.tensor([1, 0], dtype=torch.int32))
    print("ok", m.num_tokens)
    for args in ((pt, sw[:1]), (pt[:, :1].contiguous(), sw.view(2, 2, 2)), (pt.float(), sw)):
        try:
            D.plan(cfg, [0, 5], [7, 1], *args)
        except Exception as e:
            print(type(e).__name__, e)
    """
    env = {**os.environ, "PYTHONPATH": ROOT, "DSV4FN_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    out = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrapped True" in out and "ok 8" in out, out
    assert "ContractError plan(swa_page_table): expected Int32[Tensor, 'b max_swa'], got int32[1, 4]" in out, out
    assert "'b': 2" in out, out
    assert "ContractError plan(swa_page_table): expected Int32[Tensor, 'b max_swa'], got int32[2, 2, 2]" in out, out
    assert "ContractError plan(page_table): expected Int32[Tensor, 'b max_blocks'], got float32[2, 2]" in out, out


# ---------------------------------------------------------------------------------------------
# tier 3
# ---------------------------------------------------------------------------------------------


def test_tier3_is_off_by_default():
    """Off, plan reads no table values: the bad tables below plan silently (the tier-3 tests show what to)."""
    assert not _contracts.VALIDATE
    pt, sw = _tables()
    sw[0, 0] = -1
    m = plan(CFG, [0, 0], [1, 1], pt, sw)
    assert m.swa_write_loc[0].item() == -16  # a negative slot no store or attention should ever see


def test_valid_plans_pass_and_equal_the_off_mode(validate_on, monkeypatch):
    g = torch.Generator().manual_seed(0)
    for prefix, extend in (([0, 0], [40, 3]), ([37, 100], [1, 1]), ([5, 0], [60, 64]), ([63, 127], [1, 1])):
        longest = max(p + e for p, e in zip(prefix, extend, strict=True))
        nblk, nswa = -(-longest // CFG.block_size), -(-longest // CFG.swa_page_size)
        pt = torch.randperm(2 * nblk + 3, generator=g)[: 2 * nblk].int().view(2, nblk)
        sw = torch.randperm(2 * nswa + 3, generator=g)[: 2 * nswa].int().view(2, nswa)
        # window pages wholly older than a step's window are never read: the caller may recycle them (-1)
        for b in range(2):
            sw[b, : max(0, prefix[b] - CFG.window + 1) // CFG.swa_page_size] = -1
        on = plan(CFG, prefix, extend, pt, sw, _i32(1, 0), max_seq_len=2 * longest)
        monkeypatch.setattr(_contracts, "VALIDATE", False)
        off = plan(CFG, prefix, extend, pt, sw, _i32(1, 0), max_seq_len=2 * longest)
        monkeypatch.setattr(_contracts, "VALIDATE", True)
        assert on.hca is not None and off.hca is not None and on.hca.indices is not None
        assert torch.equal(on.window_indices, off.window_indices) and torch.equal(on.hca.indices, off.hca.indices)
        assert (on.swa_write_loc >= 0).all() and (on.window_indices[:, 0] >= 0).all()


def test_unmapped_pages_a_step_uses(validate_on):
    pt, sw = _tables(swa=8)
    # decode at position 100 (window 16: positions 85..100 on window pages 5 and 6): page 4 may be -1 ...
    sw[0, :5] = -1
    plan(CFG, [100, 0], [1, 1], pt.repeat(1, 2), sw)
    # ... page 5 may not (it would give negative slots to attention)
    sw[0, 5] = -1
    with pytest.raises(
        ValueError,
        match=r"swa_page_table: entry \[0, 5\] is -1, but request 0's step reads or writes the window on that "
        r"page \(positions 80\.\.95\): map every page a step uses",
    ):
        plan(CFG, [100, 0], [1, 1], pt.repeat(1, 2), sw)
    # the page being written: without the check its last slot becomes -1 and the store is skipped silently
    pt, sw = _tables()
    sw[1, 0] = -1
    with pytest.raises(ValueError, match=r"swa_page_table: entry \[1, 0\] is -1"):
        plan(CFG, [0, 15], [1, 1], pt, sw)
    # compressed pages: every visible entry is read (HCA) or scored (indexer); future blocks may be unmapped
    pt, sw = _tables()
    pt[1, 1] = -1
    plan(CFG, [0, 0], [1, 32], pt, sw)  # request 1 ends at 32 tokens: block 1 is not used yet
    with pytest.raises(
        ValueError,
        match=r"page_table: entry \[1, 1\] is -1, but request 1's step reads or writes compressed entries on that "
        r"page \(positions 32\.\.63\)",
    ):
        plan(CFG, [0, 32], [1, 4], pt, sw)  # 36 tokens: ratio-4 entry 8 completes on block 1


def test_page_ids_whose_slots_overflow_int32(validate_on):
    pt, sw = _tables()
    pt[0, 1] = 2**31 // 8  # ratio-4 pages hold 8 entries: slot 2**31 would wrap to a negative int32
    with pytest.raises(
        ValueError,
        match=r"page_table: value 268435456 at \[0, 1\] outside \[0, 268435456\) \(and not -1\): a slot "
        r"\(page id · 8 \+ offset\) must fit in int32",
    ):
        plan(CFG, [0, 0], [1, 1], pt, sw)
    pt[0, 1] = 2**31 // 8 - 1
    plan(CFG, [0, 0], [1, 1], pt, sw)  # its last slot is 2**31 - 1: fits
    pt, sw = _tables()
    sw[1, 3] = -2
    with pytest.raises(ValueError, match=r"swa_page_table: value -2 at \[1, 3\] outside \[0, 134217728\)"):
        plan(CFG, [0, 0], [1, 1], pt, sw)


def test_state_slots_values(validate_on):
    pt, sw = _tables(b=3)
    with pytest.raises(ValueError, match=r"state_slots: value -1 at \[2\] outside \[0, "):
        plan(CFG, [0, 0, 0], [1, 1, 1], pt, sw, _i32(0, 1, -1))
    with pytest.raises(ValueError, match=r"state_slots: slot 4 is given to more than one request"):
        plan(CFG, [0, 0, 0], [1, 1, 1], pt, sw, _i32(4, 1, 4))


def test_two_tokens_writing_one_slot(validate_on):
    pt, sw = _tables()
    shared = sw.clone()
    shared[1] = shared[0]  # both requests write window page 0
    with pytest.raises(
        ValueError,
        match=r"swa_page_table: tokens 0 and 2 \(request 0 position 0, request 1 position 0\) both store into "
        r"window-cache slot 0: the pages a step writes must be distinct",
    ):
        plan(CFG, [0, 0], [2, 2], pt, shared)
    plan(CFG, [0, 1], [1, 1], pt, shared)  # different slots of one page: fine
    pt2 = pt.clone()
    pt2[1] = pt2[0]  # a shared prefix block is fine to read, not to complete entries into together
    plan(CFG, [40, 40], [1, 1], pt2, sw)  # position 40: no entry completes
    with pytest.raises(
        ValueError,
        match=r"page_table: tokens 0 and 1 \(request 0 position 39, request 1 position 39\) both store "
        r"into ratio-4 cache slot",
    ):
        plan(CFG, [39, 39], [1, 1], pt2, sw)
    # one request whose table maps two window pages it writes to one page (a dummy all-zero table)
    with pytest.raises(
        ValueError, match=r"tokens 0 and 16 \(request 0 position 0, request 0 position 16\) both store into window"
    ):
        plan(CFG, [0], [20], pt[:1], torch.zeros(1, 4, dtype=torch.int32))
