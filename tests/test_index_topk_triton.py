"""Triton lightning indexer (dsv4fn/index_topk/triton.py) against the torch reference.

CPU: the Triton interpreter on small shapes. GPU (`gpu` marker): V4-Flash / V4-Pro sizes.
"""

import os

import torch

# the interpreter on CPU-only machines (set before triton is imported); compiled kernels where CUDA exists
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest

pytest.importorskip("triton")

from dsv4fn import _backend
from dsv4fn.formats import indexer_fp8
from dsv4fn.index_topk import reference as ref
from dsv4fn.index_topk import triton as tri
from dsv4fn.state import IndexerKeyCache

ON_CPU_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _dev(device: str) -> str:
    if device == "cpu" and not ON_CPU_INTERPRETER:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


def make_case(
    visible: list[int], *, hi: int, di: int, page: int, reqs: int, seed: int, device: str, spare_pages: int = 3
) -> dict:
    """Random keys in a paged cache with a permuted page table; token i belongs to request i % reqs and
    sees `visible[i]` entries (its request holds enough pages for the longest of its tokens)."""
    g = torch.Generator().manual_seed(seed)
    t = len(visible)
    token_request = torch.arange(t, dtype=torch.int32) % reqs
    max_blocks = max(1, -(-max(visible) // page))
    num_pages = reqs * max_blocks + spare_pages
    perm = torch.randperm(num_pages, generator=g)[: reqs * max_blocks]
    page_table = perm.view(reqs, max_blocks).to(torch.int32)
    keys = torch.randn(num_pages * page, di, generator=g) * (0.5 + torch.rand(num_pages * page, 1, generator=g))
    cache = IndexerKeyCache.allocate(num_pages, page, dim=di, device=device)
    cache = indexer_fp8.store(cache, keys.to(device), torch.arange(num_pages * page, device=device))
    q8, sq = indexer_fp8.quantize_rows(torch.randn(t, hi, di, generator=g))
    weights = torch.randn(t, hi, generator=g) * sq * di**-0.5
    return {
        "q8": q8.to(device),
        "weights": weights.to(device).contiguous(),
        "cache": cache,
        "page_table": page_table.to(device).contiguous(),
        "token_request": token_request.to(device),
        "visible": torch.tensor(visible, dtype=torch.int32, device=device),
    }


def _logits_args(c: dict, width: int) -> tuple:
    return (c["q8"], c["weights"], c["cache"], c["page_table"], c["token_request"], c["visible"], width)


def _abs_cache(cache: IndexerKeyCache) -> IndexerKeyCache:
    """The same cache with every e4m3 key value made non-negative (sign bit cleared)."""
    data = cache.data.clone()
    n = cache.page_size * cache.dim
    data[:, :n] &= 0x7F
    return IndexerKeyCache(data=data, page_size=cache.page_size, dim=cache.dim)


def check_logits(c: dict, width: int, got: torch.Tensor, rows: int = 8) -> None:
    """Element-wise vs the fp64 reference. Tolerance 1e-5·|ref| + 2e-6·Σ_h|w_h|·relu(q_h·k)·s_k: the kernel
    sums products and heads in fp32 (weights have mixed signs, so the head sum can cancel). Compiled fp8
    MMAs on Hopper (`mma_fp16=0` on a GPU) accumulate each dot product with ~14 mantissa bits (DeepSeek-V3
    report §3.3.2; DeepGEMM has the same), so that path adds 2^-12·s_k·Σ_h|w_h|·Σ_d|q_hd·k_d| (4 MMAs of
    K=32 for di=128; measured on the H100: at most 2e-5 of that magnitude)."""
    assert got.shape == (c["q8"].shape[0], width) and got.dtype == torch.float32
    hw_fp8 = got.is_cuda and not tri.LOGITS_CONFIG["mma_fp16"]
    abs_cache = _abs_cache(c["cache"]) if hw_fp8 else None
    t = c["q8"].shape[0]
    for r0 in range(0, t, rows):
        sl = slice(r0, r0 + rows)
        q8, w = c["q8"][sl], c["weights"][sl]
        rest = (c["page_table"], c["token_request"][sl], c["visible"][sl], width)
        exp = ref.paged_logits(q8, w, c["cache"], *rest)
        mag = ref.paged_logits(q8, w.abs(), c["cache"], *rest)
        g = got[sl]
        fin = torch.isfinite(exp)
        assert torch.equal(fin, torch.isfinite(g)), "finite positions differ"
        assert bool((g[~fin] == float("-inf")).all()), "masked columns must be -inf"
        err = (g[fin].double() - exp[fin].double()).abs()
        tol = 1e-5 * exp[fin].double().abs() + 2e-6 * mag[fin].double()
        if abs_cache is not None:
            q_abs = q8.float().abs().to(torch.float8_e4m3fn)
            tol = tol + 2.0**-12 * ref.paged_logits(q_abs, w.abs(), abs_cache, *rest)[fin].double()
        if bool((err > tol).any()):
            i = int((err - tol).argmax())
            raise AssertionError(
                f"rows {r0}+: {(err > tol).sum().item()} logits off; worst {g[fin][i].item()} vs {exp[fin][i].item()}"
            )


def check_topk(
    logits: torch.Tensor,
    visible: torch.Tensor,
    topk: int,
    width: int,
    page_table: torch.Tensor,
    token_request: torch.Tensor,
    page: int,
    got: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Lengths and −1 padding exact; rows with visible <= topk exact (in order); longer rows equal as sets,
    where a slot may differ only if its logit ties the k-th largest logit of the row."""
    gi, gl = got
    ei, el = ref.select_topk(logits, visible, topk, width, page_table, token_request, page)
    assert gi.shape == ei.shape and gi.dtype == torch.int32
    assert gl.dtype == torch.int32 and torch.equal(gl, el), "lengths differ"
    col = torch.arange(width, device=gi.device)
    pad = col.view(1, -1) >= el.view(-1, 1).long()
    assert bool((gi[pad] == -1).all()), "padding must be -1"
    assert bool((gi[~pad] >= 0).all()), "selected slots must be >= 0"
    trivial = visible <= topk
    assert torch.equal(gi[trivial], ei[trivial]), "short rows must list every entry in order"
    # slot -> logical entry of each row, to read logits of the chosen entries
    slots = ref.key_slots(page_table, token_request, logits.shape[1], page)
    for r in torch.nonzero(~trivial).flatten().tolist():
        k = int(el[r])
        gs, es = gi[r, :k], ei[r, :k]
        assert gs.unique().numel() == k, f"row {r}: duplicate slots"
        if torch.equal(gs.sort().values, es.sort().values):
            continue
        v = int(visible[r])
        slot_to_j = {int(s): j for j, s in enumerate(slots[r, :v].tolist())}
        kth = logits[r, :v].double().topk(k).values[-1].item()
        extra = set(gs.tolist()) - set(es.tolist())
        missing = set(es.tolist()) - set(gs.tolist())
        for s in extra | missing:
            assert s in slot_to_j, f"row {r}: slot {s} is not a visible entry"
            x = logits[r, slot_to_j[s]].item()
            assert abs(x - kth) <= 1e-6 * abs(kth), f"row {r}: slot {s} (logit {x}) vs k-th {kth}: not a tie"


# ---------------------------------------------------------------------------------------------
# CPU (interpreter)
# ---------------------------------------------------------------------------------------------

LOGIT_CASES = [
    # id, visible per token, hi, di, page, reqs, width
    ("tiny-h4-d64-p16", [0, 1, 15, 16, 17, 100, 333, 336], 4, 64, 16, 3, 352),
    ("v4-h64-d128-p64", [0, 63, 64, 65, 300, 1000, 1500], 64, 128, 64, 4, 1536),
    ("h8-d128-p32-narrow", [5, 70, 200], 8, 128, 32, 2, 130),  # width not a page multiple
]


@pytest.mark.parametrize("visible,hi,di,page,reqs,width", [c[1:] for c in LOGIT_CASES], ids=[c[0] for c in LOGIT_CASES])
def test_paged_logits(visible, hi, di, page, reqs, width, device):
    dev = _dev(device)
    c = make_case(visible, hi=hi, di=di, page=page, reqs=reqs, seed=len(visible) * 7 + hi, device=dev)
    got = tri.paged_logits(*_logits_args(c, width))
    check_logits(c, width, got)


@pytest.mark.parametrize("rows,iters,fp16,imprecise", [(16, 1, 0, 0), (128, 2, 1, 0), (64, 8, 0, 32)])
def test_paged_logits_configs(rows, iters, fp16, imprecise, device, monkeypatch):
    dev = _dev(device)
    monkeypatch.setitem(tri.LOGITS_CONFIG, "iters", iters)
    monkeypatch.setitem(tri.LOGITS_CONFIG, "rows", rows)
    monkeypatch.setitem(tri.LOGITS_CONFIG, "mma_fp16", fp16)
    monkeypatch.setitem(tri.LOGITS_CONFIG, "imprecise_acc", imprecise)
    c = make_case([0, 40, 129, 600], hi=4, di=64, page=16, reqs=2, seed=5, device=dev)
    check_logits(c, 640, tri.paged_logits(*_logits_args(c, 640)))


def _topk_case(visible: list[int], topk: int, page: int, seed: int, device: str, n: int, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    t = len(visible)
    reqs = max(1, t // 2)
    max_blocks = -(-n // page)
    pt = torch.randperm(reqs * max_blocks + 5, generator=g)[: reqs * max_blocks].view(reqs, max_blocks)
    x = torch.randn(t, n, generator=g) * 30
    if ties:
        x = x.round()  # many exact ties, also at the threshold
    vis = torch.tensor(visible, dtype=torch.int32)
    x = x.masked_fill(torch.arange(n).view(1, -1) >= vis.view(-1, 1), float("-inf"))
    treq = torch.arange(t, dtype=torch.int32) % reqs
    return x.to(device), vis.to(device), pt.to(torch.int32).to(device), treq.to(device)


TOPK_CASES = [
    # id, visible, topk, page, n (logit columns), width
    ("tiny-k16", [0, 1, 15, 16, 17, 64, 200, 250], 16, 16, 256, 16),
    ("k64-chunks", [0, 63, 64, 65, 129, 4097, 5000, 9000], 64, 64, 9024, 128),
    ("k512", [511, 512, 513, 2000, 3001, 6000], 512, 64, 6016, 512),
]


@pytest.mark.parametrize("visible,topk,page,n,width", [c[1:] for c in TOPK_CASES], ids=[c[0] for c in TOPK_CASES])
def test_select_topk(visible, topk, page, n, width, device):
    dev = _dev(device)
    logits, vis, pt, treq = _topk_case(visible, topk, page, seed=topk + n, device=dev, n=n)
    got = tri.select_topk(logits, vis, topk, width, pt, treq, page)
    check_topk(logits, vis, topk, width, pt, treq, page, got)


@pytest.mark.parametrize("block,radix_bits", [(1024, 8), (2048, 11), (512, 12)])
def test_select_topk_ties_and_configs(block, radix_bits, device, monkeypatch):
    """Rounded logits: many exact ties, including at the threshold; other radix widths and chunkings."""
    dev = _dev(device)
    monkeypatch.setitem(tri.TOPK_CONFIG, "block", block)
    monkeypatch.setitem(tri.TOPK_CONFIG, "radix_bits", radix_bits)
    logits, vis, pt, treq = _topk_case([3, 40, 41, 1000, 2500, 3000], 40, 32, seed=block, device=dev, n=3008, ties=True)
    got = tri.select_topk(logits, vis, 40, 64, pt, treq, 32)
    check_topk(logits, vis, 40, 64, pt, treq, 32, got)
    # with ties the kernel takes the lowest indices first, like the stable reference: exact sets
    ei = ref.select_topk(logits, vis, 40, 64, pt, treq, 32)[0]
    assert torch.equal(got[0].sort(-1).values, ei.sort(-1).values)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("chunk,radix_bits", [(256, 8), (512, 11)])
def test_select_topk_split_rows(chunk, radix_bits, ties, device, monkeypatch):
    """Rows cut into (row, chunk) programs: the same slots in the same order as one program per row
    (deterministic prefix-sum placement), trivial rows and -1 padding included, width > n as well."""
    dev = _dev(device)
    monkeypatch.setitem(tri.TOPK_CONFIG, "radix_bits", radix_bits)
    visible = [0, 5, 64, 65, 700, 1500, 3000, 2999]
    logits, vis, pt, treq = _topk_case(visible, 64, 32, seed=chunk + ties, device=dev, n=3008, ties=ties)
    monkeypatch.setitem(tri.TOPK_CONFIG, "split", 0)
    one = tri.select_topk(logits, vis, 64, 96, pt, treq, 32)
    monkeypatch.setitem(tri.TOPK_CONFIG, "split", 1)
    monkeypatch.setitem(tri.TOPK_CONFIG, "chunk", chunk)
    got = tri.select_topk(logits, vis, 64, 96, pt, treq, 32)
    check_topk(logits, vis, 64, 96, pt, treq, 32, got)
    assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


def test_select_topk_negative_and_equal_rows(device):
    """Negative logits, zeros and a row of identical values (radix select on sign bits and full ties)."""
    dev = _dev(device)
    logits, vis, pt, treq = _topk_case([300, 300, 300], 32, 16, seed=3, device=dev, n=304)
    logits[0] = -logits[0].abs() - 1.0
    logits[1, :300] = 2.5
    logits[2, :300] = torch.where(logits[2, :300] > 0, 0.0, -0.0)
    got = tri.select_topk(logits, vis, 32, 48, pt, treq, 16)
    check_topk(logits, vis, 32, 48, pt, treq, 16, got)


def test_indexer_pipeline_logits_then_topk(device):
    """Kernel logits feed the kernel top-k; selection equals the reference on the reference logits."""
    dev = _dev(device)
    visible = [0, 10, 64, 65, 500, 777]
    c = make_case(visible, hi=4, di=64, page=16, reqs=3, seed=11, device=dev)
    width = 784
    got_logits = tri.paged_logits(*_logits_args(c, width))
    check_logits(c, width, got_logits)
    sel = tri.select_topk(got_logits, c["visible"], 64, 64, c["page_table"], c["token_request"], 16)
    check_topk(got_logits, c["visible"], 64, 64, c["page_table"], c["token_request"], 16, sel)


def test_backend_registered():
    assert "triton" in _backend.available("index_logits")
    assert "triton" in _backend.available("topk")
    assert _backend._impls["index_logits"]["triton"] is tri.paged_logits
    assert _backend._impls["topk"]["triton"] is tri.select_topk


def test_bad_arguments(device):
    dev = _dev(device)
    c = make_case([10, 20], hi=4, di=64, page=16, reqs=1, seed=1, device=dev)
    with pytest.raises(TypeError, match="q8"):
        tri.paged_logits(c["q8"].float(), *_logits_args(c, 32)[1:])
    with pytest.raises(TypeError, match="weights"):
        tri.paged_logits(c["q8"], c["weights"].double(), *_logits_args(c, 32)[2:])
    with pytest.raises(TypeError, match="cache"):
        tri.paged_logits(c["q8"], c["weights"], c["cache"].data, *_logits_args(c, 32)[3:])
    with pytest.raises(TypeError, match="page_table"):
        args = list(_logits_args(c, 32))
        args[3] = args[3].long()
        tri.paged_logits(*args)
    logits = torch.randn(2, 32, device=dev)
    with pytest.raises(TypeError, match="logits"):
        tri.select_topk(logits.double(), c["visible"], 8, 16, c["page_table"], c["token_request"], 16)
    with pytest.raises(ValueError, match="topk"):
        tri.select_topk(logits, c["visible"], 0, 16, c["page_table"], c["token_request"], 16)
    with pytest.raises(ValueError, match="width"):
        tri.select_topk(logits, c["visible"], 8, 4, c["page_table"], c["token_request"], 16)


# test_schema perturbs the inputs arithmetically, which float8 tensors may not support
_GPU_LOGITS_OPCHECK = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck(device):
    dev = _dev(device)
    c = make_case([0, 20, 70], hi=4, di=64, page=16, reqs=2, seed=2, device=dev)
    # On CPU the interpreter cannot launch on fake tensors (faketensor / aot tests need the GPU), and
    # test_schema perturbs inputs with arithmetic that CPU float8 tensors lack; the GPU runs them all.
    cpu = dev == "cpu"
    torch.library.opcheck(
        tri.indexer_paged_logits,
        (c["q8"], c["weights"], c["cache"].data, c["page_table"], c["token_request"], c["visible"], 16, 80),
        test_utils=("test_autograd_registration",) if cpu else _GPU_LOGITS_OPCHECK,
    )
    logits, vis, pt, treq = _topk_case([0, 7, 8, 60], 8, 16, seed=4, device=dev, n=64)
    torch.library.opcheck(
        tri.indexer_topk,
        (logits, vis, pt, treq, 8, 16, 16),
        **({"test_utils": ("test_schema", "test_autograd_registration")} if cpu else {}),
    )


# ---------------------------------------------------------------------------------------------
# GPU: V4-Flash (hi 64, di 128, page 64, topk 512) and V4-Pro (topk 1024)
# ---------------------------------------------------------------------------------------------


def _gpu_case(t: int, keys: int, seed: int) -> dict:
    """t tokens over t // 4 requests (4 tokens each, MTP-like), visible lengths near `keys`."""
    g = torch.Generator().manual_seed(seed)
    vis = (keys - torch.randint(0, 200, (t,), generator=g)).tolist()
    vis[0] = keys
    return make_case(vis, hi=64, di=128, page=64, reqs=max(1, t // 4), seed=seed, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [32, 128])
@pytest.mark.parametrize("keys", [16384, 65536])
@pytest.mark.parametrize("topk", [512, 1024], ids=["flash-k512", "pro-k1024"])
def test_gpu_v4_sizes(t, keys, topk):
    c = _gpu_case(t, keys, seed=t + keys + topk)
    width = keys
    logits = tri.paged_logits(*_logits_args(c, width))
    check_logits(c, width, logits, rows=4)
    got = tri.select_topk(logits, c["visible"], topk, topk, c["page_table"], c["token_request"], 64)
    check_topk(logits, c["visible"], topk, topk, c["page_table"], c["token_request"], 64, got)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8, 128])
def test_gpu_topk_long_rows(t, monkeypatch):
    """256k-entry rows (a 1M-token context): the split path against the reference and, bit for bit, against
    the one-program path."""
    g = torch.Generator().manual_seed(t)
    n = 262144
    vis = (n - torch.randint(0, 3000, (t,), generator=g)).to(torch.int32)
    vis[0] = n
    logits = (torch.randn(t, n, generator=g) * 4).masked_fill(torch.arange(n) >= vis.view(-1, 1), float("-inf"))
    logits, vis = logits.cuda(), vis.cuda()
    pt = torch.randperm(t * n // 64, generator=g).to(torch.int32).view(t, n // 64).cuda()
    treq = torch.arange(t, dtype=torch.int32, device="cuda")
    monkeypatch.setitem(tri.TOPK_CONFIG, "split", 1)
    got = tri.select_topk(logits, vis, 512, 512, pt, treq, 64)
    check_topk(logits, vis, 512, 512, pt, treq, 64, got)
    monkeypatch.setitem(tri.TOPK_CONFIG, "split", 0)
    one = tri.select_topk(logits, vis, 512, 512, pt, treq, 64)
    assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [0, 1], ids=["fp8-mma", "fp16-mma"])
def test_gpu_logits_mma_modes(fp16, monkeypatch):
    monkeypatch.setitem(tri.LOGITS_CONFIG, "mma_fp16", fp16)
    c = _gpu_case(32, 16384, seed=fp16)
    check_logits(c, 16384, tri.paged_logits(*_logits_args(c, 16384)), rows=4)


@pytest.mark.gpu
def test_gpu_short_rows_and_opcheck():
    c = make_case([0, 1, 63, 64, 65, 511, 512, 513, 3000], hi=64, di=128, page=64, reqs=3, seed=9, device="cuda")
    width = 3008
    logits = tri.paged_logits(*_logits_args(c, width))
    check_logits(c, width, logits)
    got = tri.select_topk(logits, c["visible"], 512, 512, c["page_table"], c["token_request"], 64)
    check_topk(logits, c["visible"], 512, 512, c["page_table"], c["token_request"], 64, got)
    torch.library.opcheck(
        tri.indexer_paged_logits,
        (c["q8"], c["weights"], c["cache"].data, c["page_table"], c["token_request"], c["visible"], 64, width),
        test_utils=_GPU_LOGITS_OPCHECK,
    )
    torch.library.opcheck(tri.indexer_topk, (logits, c["visible"], c["page_table"], c["token_request"], 512, 512, 64))
