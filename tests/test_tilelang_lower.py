"""CPU checks of the TileLang kernels: every kernel variant lowers to CUDA for sm_90a (no GPU needed) at
V4-Flash and V4-Pro sizes, the generated source keeps the structure the speed depends on, the exact
dequantization trick of the warp-specialised attention kernel is checked bit for bit, and the
`_tilelang_compat` workarounds behave. A kernel that stops compiling fails here."""

import functools
import importlib
import re

import pytest
import torch

pytest.importorskip("tilelang")

compat = importlib.import_module("dsv4fn._tilelang_compat")
attn = importlib.import_module("dsv4fn.attend.tilelang")
idx = importlib.import_module("dsv4fn.index_topk.tilelang")

SCALE = 512**-0.5


def _lower(prim_func, pass_configs=None) -> str:
    src = compat.lower_source(prim_func, pass_configs=pass_configs)
    assert "__global__" in src, "no CUDA kernel was generated"
    return src


@functools.cache
def _ws_unpaired_src(h: int, split: bool) -> str:
    """The lowered unpaired ws kernel (shared by the tests that need it: each lowering takes ~8 s on CPU)."""
    return _lower(attn.build_attend_ws(h, 64, 64, SCALE, split, pair=False), attn.WS_PASS_CONFIGS)


def _body(src: str) -> str:
    """The kernel body (after the `__launch_bounds__` definition)."""
    return src[src.index("__launch_bounds__") :]


def _index_fetch_after_k_ready(body: str) -> list[bool]:
    """For each producer `k_ready[..].arrive()` of the main loop: whether the next block's index fetch follows it
    (pair mode) rather than precedes it (unpaired)."""
    arrives = [m.end() for m in re.finditer(r"k_ready\[[^\]]*\]\.arrive\(\);", body)]
    return [re.match(r"\s*if \([^\n]*\n\s*if \([^\n]*\n\s*ixn\[\w+\] = Idx1\[", body[a:]) is not None for a in arrives]


# ---- attention: warp-specialised kernel ----------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "split"),
    [(64, False), (64, True), (128, False), (96, True), (8, False)],
    ids=["flash", "flash-split", "pro", "96heads-split", "8heads"],
)
def test_attention_ws_lowers(h, split):
    """The unpaired kernel (V4-Pro's direct path runs paired by default: test_attention_ws_pair_mode_lowers)."""
    src = _ws_unpaired_src(h, split)
    body = _body(src)
    assert ("attend_ws_partial_kernel" if split else "attend_ws_direct_kernel") in src
    assert "__launch_bounds__(384, 1)" in src
    # QK^T (m64n64k16) and P V (two warpgroups x m64n256k16) on wgmma
    assert "wgmma_ss<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32, 64, 64, 16" in body
    assert body.count("64, 256, 16, false, true") == 2
    # register split between the warpgroups, mbarrier pipeline, exact register dequantization
    assert f"warpgroup_reg_alloc<{attn.REG_WG0}>" in body and f"warpgroup_reg_dealloc<{attn.REG_PRODUCER}>" in body
    assert "k_ready[" in body and "k_free[" in body and "dsv4fn_dq16(" in body and "dsv4fn_dq16_big(" in body
    # the softmax's 2^x as one MUFU.EX2 each (ex2.approx.ftz), not exp2f
    assert body.count("dsv4fn_ex2(") == 2 and "exp2f(" not in body
    # lazy rescale: the running max moves past 2^8 only, each consumer warp votes before rescaling its rows
    assert "(0x1p+3f/*8.000000e+00*/ < " in body and body.count("dsv4fn_warp_any(") == 2
    # (7 nope + 2 rope) 16-byte loads per key, main / extra list, prologue / one block ahead in the loop; a masked
    # key's loads zero its registers here (keeping them is slower unpaired)
    assert body.count("dsv4fn_ld128z(") == 8 and body.count("dsv4fn_ld64z(") == 4 and "dsv4fn_ld128(" not in body
    # the producer fetches the indices of its block after next before signalling a K tile (after: 4% slower here)
    assert _index_fetch_after_k_ready(body) == [False]
    # the only block-wide barrier is the one after the mbarrier init (TileLang's automatic syncs are off;
    # a __syncthreads inside one warpgroup's branch would deadlock)
    assert body.count("__syncthreads()") == 1
    assert "__sync_thread_partial" not in body


def test_attention_ws_pair_mode_lowers():
    """V4-Pro's direct path (two head blocks, one split) runs as a 2-CTA cluster: each producer dequantizes its 32
    keys a block and one thread bulk-copies them (8 x 4 KB of the 128B-swizzled tile + 128 bytes of flags) into the
    peer's tile, the bytes counted on the peer's k_remote; the split paths stay unpaired."""
    assert attn._pair_mode(False) and not attn._pair_mode(True)  # WS_PAIR = "direct"
    old = attn.WS_PAIR
    try:
        attn.WS_PAIR = True  # the knob's values are names
        with pytest.raises(ValueError, match="WS_PAIR"):
            attn._pair_mode(False)
    finally:
        attn.WS_PAIR = old
    src = _lower(attn.build_attend_ws(128, 64, 64, SCALE, False), attn.WS_PASS_CONFIGS)
    body = _body(src)
    assert "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes" in src
    # the K tile layout the half copies rely on: 64-column chunks of 64 rows x 128 bytes, 128B swizzle
    assert "initialize_wgmma_descriptor<1, 1, 64>(desc_b, (&(((bfloat16_t*)K_s)[0])))" in body
    # a copy of each chunk's half, stage 0 and (+32768 halves) stage 1 of the unrolled two-block ring: rows 32 rank ..
    # 32 rank + 31 of chunk t start at t * 4096 + rank * 2048 halves and span 4096 bytes; then the 32 flags
    kv = r"K_s\)\[\(+t_\d+ \* 4096\) \+ \(\(\(int\)blockIdx\.x\) \* 2048\)\)( \+ 32768\))?\]\)\), 4096,"
    flags = r"valid_s\)\[\(+\(int\)blockIdx\.x\) \* 32\)( \+ 64\))?\]\)\), 128,"
    assert re.findall(kv, body) == ["", " + 32768)"] and re.findall(flags, body) == ["", " + 64)"]
    assert body.count("dsv4fn_bulk_to_peer(") == 4
    assert "k_remote[" in body and "dsv4fn_arrive_expect_tx(" in body and "dsv4fn_arrive_rank(" in body
    assert "tl::cluster_sync()" in body and "dsv4fn_dq16(" in body
    # a masked key's loads leave its registers as they were (zeroed once, before the first load)
    assert body.count("dsv4fn_ld128(") == 2 * body.count("dsv4fn_ld64(") == 16 and "z(" not in body
    keep = attn.build_attend_ws(64, 64, 64, SCALE, False, "ld_keep")
    zero = attn.build_attend_ws(128, 64, 64, SCALE, False, "ld_zero")
    assert "dsv4fn_ld128z(" not in _body(_lower(keep, attn.WS_PASS_CONFIGS))
    assert "dsv4fn_ld128(" not in _body(_lower(zero, attn.WS_PASS_CONFIGS))
    # warpgroup 0's P V takes P from its registers (RS wgmma), warpgroup 1's and Q K^T read shared memory; the
    # lazy rescale's votes; pair mode's register budgets
    assert body.count("tl::wgmma_rs<") == 1 and body.count("tl::wgmma_ss<") == 2
    assert body.count("dsv4fn_warp_any(") == 2
    # its producer fetches the indices of its block after next only after signalling k_ready (both unrolled blocks)
    assert _index_fetch_after_k_ready(body) == [True, True]
    # warpgroup 0 issues its P V, hands S to warpgroup 1 (fence, s_ready), then waits for the P V
    pv0 = body.index("tl::wgmma_rs<")
    assert pv0 < body.index("s_ready[0].arrive();", pv0) < body.index("tl::wait_wgmma<0>();", pv0)
    assert f"warpgroup_reg_alloc<{attn.REG_PAIR[0]}>" in body and f"warpgroup_reg_dealloc<{attn.REG_PAIR[2]}>" in body
    for h, split in ((128, True), (64, False)):  # split paths unpaired; one head block: nothing to pair
        other = _body(_lower(attn.build_attend_ws(h, 64, 64, SCALE, split), attn.WS_PASS_CONFIGS))
        assert "dsv4fn_bulk_to_peer(" not in other and "cluster_sync" not in other and "wgmma_rs" not in other
        assert f"warpgroup_reg_alloc<{attn.REG_WG0}>" in other


@pytest.mark.parametrize(("h", "ns"), [(128, 2), (64, 3), (96, 8)], ids=["pro-2", "flash-3", "96heads-8"])
def test_attention_ws_cluster_merge_lowers(h, ns):
    """The split path as one cluster of `ns` CTAs a row: each CTA's LSEs read by the cluster, its scaled partial
    staged as fp32 (swizzled) in its K tiles' memory, its 1 / ns of the output summed over the cluster's partials
    in distributed shared memory and written as bf16 - three cluster barriers, no partials in global memory."""
    func = attn.build_attend_ws(h, 64, 64, SCALE, True, merge=ns)
    assert f'"cluster_dims": [{ns}, 1, 1]' in func.script()
    assert [p.name for p in func.params][9:12] == ["Sink_handle", "O_handle", "Lse_handle"]  # as the direct path
    body = _body(_lower(func, attn.WS_PASS_CONFIGS))
    assert body.count("dsv4fn_cluster_sync_all();") == 5  # once in each role's branch, then twice for all
    assert body.count(f"dsv4fn_merge4<{ns}>(") == 1 and body.count("dsv4fn_stage_f32(") == 2
    assert body.count("dsv4fn_ld_rank_f32(") == 2 and "Opart" not in body and "tl::cluster_sync" not in body
    # the staging area is the K tiles (2 x 64 x 512 bf16 = 64 x 512 fp32): it must stay that size
    assert "initialize_wgmma_descriptor<1, 1, 64>(desc_b, (&(((bfloat16_t*)K_s)[0])))" in body


def test_attention_cluster_merge_plan():
    """Where a split row merges in a cluster instead of partials + combine (2 or 3 CTAs, one wave of clusters, at
    most one more block a split than the heuristic's splits), and bad sizes."""
    assert attn.CLUSTER_MERGE and attn.MERGE_SIZES == (2, 3)
    flash, pro = (128, 512), (128, 1024)  # 10 and 18 blocks a row

    def plan(b, h, k1, k2):
        return attn.cluster_merge(attn.choose_splits(b, 1, h, k1, k2, "ws"), k1, k2, b * -(-h // 64))

    # V4-Flash: 5 splits of 2 blocks (b=14..26) keep the combine (3 blocks a split in 3s is 2 more); 4 splits of 3
    # merge in 3s (4 blocks) while 3 x b CTAs fit (b <= 32); 3 splits of 4 in 2s (5 blocks); 2 in 2s
    for b, want in ((1, 0), (13, 0), (26, 0), (27, 3), (32, 3), (33, 0), (34, 2), (44, 2), (66, 2), (67, 0)):
        assert plan(b, 64, *flash) == want, b
    # V4-Pro (two head blocks a row): 4 splits of 5 blocks merge in 3s (6) for b=14..16; 3 splits of 6 would fit
    # 3s only to b=16 and take 9 blocks in 2s: combine; 2 splits in 2s
    for b, want in ((1, 0), (8, 0), (13, 0), (14, 3), (16, 3), (17, 0), (22, 0), (23, 2), (33, 2), (34, 0)):
        assert plan(b, 128, *pro) == want, b
    assert attn.cluster_merge(3, 128, 64, 8) == 3 and attn.cluster_merge(3, 128, 64, 40) == 2  # 3 blocks a row
    # another SM count (78, an H20): the splits follow it; clusters of 2 up to one CTA an SM, none of 3 (unmeasured)
    assert (
        attn.choose_splits(32, 1, 64, *flash, "ws", sms=78) == 2
        and attn.choose_splits(59, 1, 64, *flash, "ws", 78) == 1
    )
    assert attn.cluster_merge(2, *flash, 39, sms=78) == 2 and attn.cluster_merge(2, *flash, 40, sms=78) == 0
    assert attn.cluster_merge(4, *flash, 8, sms=78) == 0 and attn.cluster_merge(4, *flash, 8) == 3
    old = attn.CLUSTER_MERGE, attn.MERGE_SIZES
    try:
        attn.MERGE_SIZES = (2, 3, 4, 8)  # 4 and 8 have no wave size: never picked
        assert attn.cluster_merge(4, *flash, 8) == 3 and attn.cluster_merge(8, *flash, 4) == 0
        attn.CLUSTER_MERGE = False
        assert attn.cluster_merge(2, *flash, 8) == 0
    finally:
        attn.CLUSTER_MERGE, attn.MERGE_SIZES = old
    for bad in (dict(merge=1), dict(merge=9), dict(merge=4, stages=3), dict(merge=4, bi=32)):
        with pytest.raises(ValueError, match="cluster merge"):
            attn.build_attend_ws(64, 64, 64, SCALE, True, **bad)
    with pytest.raises(ValueError, match="cluster merge"):
        attn.build_attend_ws(64, 64, 64, SCALE, False, merge=4)


def test_attention_ws_block_variants_lower_and_bounds():
    """The builder's development knobs (bench/tilelang_profile_dev.py attn-tiles): 32-key blocks on a 3-deep K
    ring lower (QK^T at n=32, three ring barriers); other block sizes and depths are refused."""
    body = _body(_lower(attn.build_attend_ws(64, 64, 64, SCALE, False, "", 32, 3), attn.WS_PASS_CONFIGS))
    assert "wgmma_ss<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32, 64, 32, 16" in body
    assert "k_ready[2]" in body
    for bi, stages in ((16, 2), (64, 5)):
        with pytest.raises(ValueError, match="blocks of 32 or 64 keys"):
            attn.build_attend_ws(64, 64, 64, SCALE, False, "", bi, stages)


def test_attention_ws_trace_probe_lowers():
    """The development timeline probe (bench/tilelang_profile_dev.py attn-trace) lowers: SM clock stamps of every
    warpgroup and block, written over the output after two CTA-wide syncs."""
    body = _body(_lower(attn.build_attend_ws(64, 64, 64, SCALE, False, "trace"), attn.WS_PASS_CONFIGS))
    assert body.count("dsv4fn_clock()") >= 9 and body.count("dsv4fn_gtimer()") == 2
    assert "dsv4fn_half_word(" in body and body.count("__syncthreads()") == 3


def test_attention_ws_exact_probes_lower():
    """The two exact development variants (bench/tilelang_profile_dev.py attn-probe pv_rs,l2_256: what FlashMLA does
    differently) lower: warpgroup 0's P V as an RS wgmma from its bf16 P fragment (warpgroup 1's still reads S_s),
    the record loads with the L2::256B hint; the default (unpaired) kernel has neither."""
    body = _body(_lower(attn.build_attend_ws(64, 64, 64, SCALE, False, "pv_rs,l2_256"), attn.WS_PASS_CONFIGS))
    assert body.count("tl::wgmma_rs<") == 1 and body.count("tl::wgmma_ss<") == 2 and "(acc_p + (ki_1 * 8))" in body
    default = _body(_ws_unpaired_src(64, False))
    assert "wgmma_rs" not in default and "dsv4fn_ld128_l2z(" not in default
    assert body.count("dsv4fn_ld128_l2z(") == default.count("dsv4fn_ld128z(") > 0 and "dsv4fn_ld128z(" not in body


def test_attention_ws_lazy_rescale_knob(monkeypatch):
    """WS_LAZY picks the kernels' lazy rescale per call (True) or the eager one (every block's 2 x 128 multiplies a
    thread, no vote); a value that is not a bool is a clear error."""
    assert attn._lazy_mode() is True
    monkeypatch.setattr(attn, "WS_LAZY", False)
    assert attn._lazy_mode() is False
    eager = _body(_lower(attn.build_attend_ws(64, 64, 64, SCALE, False, lazy=False), attn.WS_PASS_CONFIGS))
    assert "dsv4fn_warp_any(" not in eager and "0x1p+3f" not in eager
    monkeypatch.setattr(attn, "WS_LAZY", "off")
    with pytest.raises(ValueError, match="WS_LAZY"):
        attn._lazy_mode()


def test_attention_ws_next_wave_prefetch(monkeypatch):
    """The direct kernel takes the prefetch distance `ahead` (rows a wave holds: 132 V4-Flash CTAs, 66 V4-Pro pairs;
    0 when WS_PREFETCH is off) and its producer, after its last block, prefetches the next wave's Q rows (1 KB bulk
    prefetches), index rows (L2 lines) and first keys' records (576-byte bulk prefetches) and scales; the split
    kernel (one wave by construction) has none of it."""
    assert attn._prefetch_rows(64, 132) == 132 and attn._prefetch_rows(128, 132) == 66
    body = _body(_ws_unpaired_src(64, False))
    assert "int ahead" in _ws_unpaired_src(64, False) and "if ((0 < ahead) && " in body
    assert body.count("dsv4fn_prefetch_bulk(") == 3 and body.count("dsv4fn_prefetch_line(") == 4
    assert body.count(", 1024);") == 1 and body.count(", 576);") == 2
    split = _ws_unpaired_src(64, True)
    assert "ahead" not in split and "dsv4fn_prefetch_bulk(" not in _body(split)
    monkeypatch.setattr(attn, "WS_PREFETCH", False)
    assert attn._prefetch_rows(64, 132) == 0
    monkeypatch.setattr(attn, "WS_PREFETCH", 1)
    with pytest.raises(ValueError, match="WS_PREFETCH"):
        attn._prefetch_rows(64, 132)


def test_attention_ws_register_budget():
    """setmaxnreg.inc waits for registers released by the other warpgroups: the three budgets must fit in
    what the CTA was launched with (168 per thread at 384 threads), or warpgroup 0 hangs."""
    per_thread = (65536 // attn.WS_THREADS) // 8 * 8
    for regs in ((attn.REG_WG0, attn.REG_WG1, attn.REG_PRODUCER), attn.REG_PAIR):  # unpaired, pair mode
        assert all(r % 8 == 0 and 24 <= r <= 256 for r in regs)
        assert sum(regs) <= 3 * per_thread, regs
        assert regs[1] <= per_thread and regs[2] <= per_thread  # these two only release


def test_attention_legacy_and_combine_lower():
    # (the legacy kernel runs only under ATTN_IMPL="legacy"; its split variant shares this code)
    src = _lower(attn.build_attend_legacy(64, 448, 64, 64, 64, 64, SCALE, False), attn.PASS_CONFIGS)
    assert "attend_direct_kernel" in src and "wgmma" in src
    assert "attend_combine_kernel" in _lower(attn.build_combine(128, 512))


def test_attention_impl_selection():
    cache = torch.zeros(3, 37440, dtype=torch.uint8)  # MODEL1 pages of 64 tokens, stride = 65 records
    assert attn._ws_usable(cache, 448, 64, 64)
    assert not attn._ws_usable(cache, 448, 64, 32)
    assert not attn._ws_usable(cache[:, 1:], 448, 64, 64)  # misaligned view
    old = attn.ATTN_IMPL
    try:
        attn.ATTN_IMPL = "legacy"
        assert attn._impl_for(cache, cache, 448, 64, 64) == "legacy"
        attn.ATTN_IMPL = "ws"
        assert attn._impl_for(cache, cache, 448, 64, 64) == "ws"
    finally:
        attn.ATTN_IMPL = old
    # ws splits: fill the SMs only while the rows alone cannot (shapes only, no host sync)
    assert [attn.choose_splits(b, 1, 64, 128, 512, "ws") for b in (1, 32, 64, 128, 256)] == [10, 4, 2, 1, 1]
    # V4-Pro (two head blocks, 18 blocks): one block a CTA at b=1; no empty parts (16 parts of 18 blocks would
    # leave 7 of them empty); one wave
    assert [attn.choose_splits(b, 1, 128, 128, 1024, "ws") for b in (1, 4, 8, 32, 64)] == [18, 9, 6, 2, 1]
    assert attn.choose_splits(1, 1, 64, 128, 4096, "ws") == 22  # 66 blocks: at most 32 parts -> 22 of 3 blocks
    assert attn.choose_splits(1, 1, 64, 1, 0, "ws") == 1


def test_attention_rejects_tiny_geometry():
    from dsv4fn.state import PagedKVCache

    cache = PagedKVCache.allocate(2, 16, nope_dim=32, rope_dim=32, tile=32)
    q = torch.randn(1, 1, 8, 64).to(torch.bfloat16)
    idx_ = torch.zeros(1, 1, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache"):
        attn.sparse_attention(q, cache, idx_, scale=0.125)


def test_dequant_trick_is_exact():
    """`dsv4fn_dq16`: bf16 bits ((f16(e4m3) & 0x7fff) >> 3) | sign, times 2^(min(s,142)-15) and, when s > 142,
    2^(s-142) (bf16 multiplies) equal e4m3 * 2^(s-127) rounded to bf16 for every e4m3 code and every UE8M0
    byte (the reference dequantization, model1.dequantize_tokens)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    e4 = codes.view(torch.float8_e4m3fn)
    finite = torch.isfinite(e4.float())  # 0x7f / 0xff are NaN (never written by the quantizer)
    h = e4.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = ((h & 0x7FFF) >> 3) | (h & 0x8000)
    x = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(x.float()[finite], e4.float()[finite] * 2.0**-112)  # no bit lost, no subnormal
    for s in range(255):
        fa = torch.tensor(2.0 ** (min(s, 142) - 15), dtype=torch.bfloat16)
        fb = torch.tensor(2.0 ** (max(s, 142) - 142), dtype=torch.bfloat16)
        got = (x * fa) * fb
        ref = (e4.float() * 2.0 ** (s - 127)).to(torch.bfloat16)
        assert torch.equal(got[finite].view(torch.int16), ref[finite].view(torch.int16)), s


# ---- indexer ---------------------------------------------------------------------------------------


def test_indexer_logits_lowers():
    src = _lower(idx.build_logits(64, 128, 64), idx.PASS_CONFIGS)
    body = _body(src)
    assert "index_logits_kernel" in src
    assert f"__launch_bounds__({idx.THREADS}, {idx.MIN_CTAS_PER_SM})" in src
    assert "tma_load(Kv_desc" in body and "tma_load(Ks_desc" in body  # page values and scales by TMA
    assert "kFloat8_e4m3, tl::DataType::kFloat8_e4m3, tl::DataType::kFloat32, 64, 64, 32" in body


@pytest.mark.parametrize("tiling", ["small", "large", "deep"])
@pytest.mark.parametrize("topk", [512, 1024], ids=["flash", "pro"])
def test_indexer_fused_topk_lowers(topk, tiling):
    cpg, stages, ctas, g = {"small": idx.CHUNK_SMALL, "large": idx.CHUNK_LARGE, "deep": idx.CHUNK_DEEP}[tiling]
    src = _lower(idx.build_chunk_topk(64, 128, 64, topk, cpg, stages, ctas, g), idx.PASS_CONFIGS)
    assert "index_chunk_topk_kernel" in src and f"dsv4fn_chunk_topk<{cpg * 64}>(" in _body(src)
    assert "dsv4fn_hist_page(" in _body(src)  # the first radix digit, counted in the page loop
    assert "tma_load(Kv_desc" in src and f"__launch_bounds__(128, {ctas})" in src
    src = _lower(idx.build_topk_merge(topk, 64, cpg), idx.MERGE_PASS_CONFIGS)
    nt = idx.MERGE_THREADS
    assert "index_topk_merge_kernel" in src and f"dsv4fn_topk_merge<{nt}>(" in _body(src)
    assert f"__launch_bounds__({nt}, 1)" in src


def test_indexer_fused_tiling_and_auto_rule():
    """2048-key chunks while the merge stages all candidates in shared memory; "auto" fuses from one token, but
    not over a deep-chunk grid of fewer than 32 CTAs."""
    assert idx.chunk_tiling(512, 16384, 64, 32) == idx.CHUNK_SMALL  # 8 chunks x 512 = 4096 candidates
    assert idx.chunk_tiling(1024, 16384, 64, 32) == idx.CHUNK_SMALL  # 8192: still staged
    assert idx.chunk_tiling(512, 65536, 64, 32) == idx.CHUNK_LARGE  # 512 large chunks fill 4 CTAs an SM
    assert idx.chunk_tiling(512, 65536, 64, 1) == idx.CHUNK_DEEP  # 16 CTAs; small chunks: 16384 candidates
    assert idx.chunk_tiling(4096, 8192, 64, 32) == idx.CHUNK_DEEP  # top-k above a small chunk, 64 CTAs
    assert idx.chunk_tiling(512, 16384, 64, 96) == idx.CHUNK_SMALL  # 384 large chunks: under 3 x 132
    assert idx.chunk_tiling(512, 16384, 64, 128) == idx.CHUNK_LARGE  # 512 large chunks fill 4 CTAs an SM
    # the GPU's SM count (78, an H20): 3 x 78 = 234 large chunks are enough; 0 (no GPU) is the H100's 132
    assert idx.chunk_tiling(512, 16384, 64, 64, sms=78) == idx.CHUNK_LARGE
    assert idx.chunk_tiling(512, 16384, 64, 64, sms=0) == idx.chunk_tiling(512, 16384, 64, 64) == idx.CHUNK_SMALL
    assert idx.fused_is_fast(32, 64, 16384, 512, 64, 128) and idx.fused_is_fast(256, 64, 2048, 512, 64, 128)
    assert idx.fused_is_fast(32, 64, 65536, 512, 64, 128)  # 16 large chunks: 8192 candidates, staged
    assert idx.fused_is_fast(1, 64, 16384, 512, 64, 128) and idx.fused_is_fast(16, 64, 16384, 512, 64, 128)
    assert not idx.fused_is_fast(1, 64, 65536, 512, 64, 128)  # 16 deep-chunk CTAs
    assert idx.fused_is_fast(4, 64, 65536, 512, 64, 128)  # 64 deep-chunk CTAs
    assert not idx.fused_is_fast(64, 64, 262144, 512, 64, 128)  # 64 chunks: the merge reads global memory
    assert not idx.fused_is_fast(64, 64, 16384, 512, 32, 128)  # not TileLang's geometry


def test_indexer_rejects_unsupported():
    from dsv4fn.state import IndexerKeyCache

    cache = IndexerKeyCache.allocate(2, 32, dim=128)
    q8 = torch.zeros(1, 64, 128).to(torch.float8_e4m3fn)
    w = torch.zeros(1, 64)
    pt = torch.zeros(1, 2, dtype=torch.int32)
    req = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache"):
        idx.paged_logits(q8, w, cache, pt, req, req, 64)
    cache = IndexerKeyCache.allocate(2, 64, dim=128)
    with pytest.raises(ValueError, match="topk"):
        idx.index_topk_fused(q8, w, cache, pt, req, req, 8192, 8192)


# ---- workarounds -------------------------------------------------------------------------------


def _two_param_counts(jit_factory, monkeypatch):
    """Compile two functions from one factory with a stubbed backend that, like TileLang's adapters,
    normalises `out_idx` in place; return the out_idx each compile resolved to."""
    import sys

    import tilelang.language as T
    from tilelang.jit.adapter.base import BaseKernelAdapter

    tj = sys.modules["tilelang.jit"]  # the module (the package attribute `tilelang.jit` is the decorator)

    seen = []

    def fake_compile(prim_func, out_idx=None, **_):
        adapter = type("_A", (), {})()
        adapter.params = list(prim_func.params)
        resolved = BaseKernelAdapter._legalize_result_idx(adapter, out_idx)  # mutates `out_idx` in place
        seen.append(list(resolved))
        return object()

    monkeypatch.setattr(tj, "compile", fake_compile)

    @jit_factory(out_idx=[-1])
    def factory(n: int, three: bool):
        if three:

            @T.prim_func
            def f3(A: T.Tensor[(n,), T.float32], B: T.Tensor[(n,), T.float32], C: T.Tensor[(n,), T.float32]):
                with T.Kernel(1, threads=32):
                    for i in T.Parallel(n):
                        C[i] = A[i] + B[i]

            return f3

        @T.prim_func
        def f2(A: T.Tensor[(n,), T.float32], C: T.Tensor[(n,), T.float32]):
            with T.Kernel(1, threads=32):
                for i in T.Parallel(n):
                    C[i] = A[i]

        return f2

    factory(32, True)
    factory(32, False)
    return seen


def test_out_idx_not_shared_between_compiles(monkeypatch):
    seen = _two_param_counts(compat.jit, monkeypatch)
    assert seen == [[2], [1]], seen  # each compile resolves -1 against its own parameter list


def test_out_idx_upstream_bug_still_present(monkeypatch):
    """Documents why `compat.jit` exists: plain `tilelang.jit` leaks the first compile's indices into
    the second. If this starts failing, upstream fixed the adapter and the workaround can go."""
    import tilelang

    with pytest.raises(ValueError, match="result_idx"):  # the second compile sees the first one's [2]
        _two_param_counts(tilelang.jit, monkeypatch)


def test_auto_sync_workaround_still_needed():
    """Documents why the ws kernel turns TileLang's automatic syncs off: with them on, TileLang treats the
    extern dequant call as a shared-memory access and either puts named barriers inside the producer's
    unrolled loops or refuses to lower ("Cannot lower a required shared-memory sync inside a divergent
    region"). If this starts failing, upstream's sync planner got smarter and the workaround can go."""
    cfg = {k: v for k, v in attn.WS_PASS_CONFIGS.items() if k != "tl.disable_thread_storage_sync"}
    try:
        src = compat.lower_source(attn.build_attend_ws(8, 64, 64, SCALE, True), pass_configs=cfg)
    except Exception as exc:  # tvm.error.InternalError
        assert "ThreadSync" in str(exc)
    else:
        assert "__sync_thread_partial" in _body(src)


def test_parallel_precompile_runs_every_thunk():
    assert compat.precompile([lambda i=i: i * i for i in range(5)], workers=3) == [0, 1, 4, 9, 16]


def test_backend_registration():
    from dsv4fn import _backend

    assert "tilelang" in _backend.available("attend")
    assert "tilelang" in _backend.available("index_logits")
    assert "tilelang" in _backend.available("index_topk_fused")
