"""Robustness on the GPU: determinism, batch-1024 decode and batch invariance of every registered backend.

For every step of `dsv4fn._backend` — `attend`, `index_logits`, `topk`, `index_topk_fused`, `compress`,
`store_model1`, `store_indexer`, `rms_normalize`, `norm_rope`, `apply_rope` — and each backend registered for
it (`torch`, `triton`, and `tilelang` where it exists), at V4-Flash sizes (64 heads, d 512, a 128-entry window
list + 512 compressed entries, indexer 64 heads x 128 on 64-key pages, top-512, hidden 4096), with a decode
batch of `DSV4FN_TEST_BATCH` rows (default 1024; `scripts/memcheck.sh` shrinks it) and at most
`DSV4FN_TEST_KEYS` indexer keys per token (default 2048):

a. determinism: two identical calls give identical bits on every output (o and lse; logits; slots and
   lengths; entries, has_entry and the carried state; the whole cache bytes);
b. the batch against the torch reference with the tolerances of the per-kernel test files (attention:
   bf16 relative RMS <= 5e-3 per request and LSE within 1e-4; indexer logits: the element-wise fp8-MMA bound
   of test_index_topk_triton for Triton and 1e-3 of the row's largest |logit| for TileLang, as in
   test_tilelang_gpu; top-k: sets per row, a differing member only on a tie; stores: every cache byte;
   compress and norm/RoPE: the checks of their test files). The attention batch holds the edge rows
   (nothing to attend: o = 0, lse = +inf; every index -1; a sequence shorter than the window with no
   compressed entry) and every column past a row's length points at cache slots full of NaN bytes, which
   must not reach any output; the indexer batch has visible lengths 0, 1, a page, top-k +-1 and the full
   width, and page-table entries past a token's visible pages point at a NaN page.
c. batch invariance: a few rows (the edge rows, one in the middle, the last) run alone — and together as a
   small batch — against the same rows inside the big batch.

Which results are bitwise batch-invariant (asserted with torch.equal on the raw bits) and which are not:
* bitwise: Triton `attend` at a pinned split count (each program owns one query row, one head block and a
  fixed range of key tiles; the batch size only changes the grid); TileLang `attend` with the split count
  pinned to 1 (`choose_splits` patched; batch size, index widths and cache sizes are symbolic in one compiled
  kernel); Triton and TileLang `index_logits` (one program per token and key chunk, no reduction across
  tokens; Triton's chunks per program shrink for small batches but each logit's arithmetic is the same);
  Triton `topk` (one program per row, or for rows longer than 16k entries (row, chunk) programs whose
  histograms use integer atomics — they commute — and whose placement is a prefix sum; both paths are
  tested); the Triton `compress_windows` kernel given the projections (one owner program per request;
  1 token per program up to 512 tokens, 4 beyond: the same per-token code);
  Triton stores (one program per row); Triton norm/RoPE (fixed rows per program, row-local reductions);
  the torch references of `attend`, `index_logits` and `topk` (fp64 math rounded once; stable sort) and of
  the stores (elementwise quantization).
* tolerance only (the file's documented exceptions): `attend` through the default split heuristic, Triton
  and TileLang alike — a lone row is split over many programs and merged by the combine kernel while a large
  batch runs single-pass, so the fp32 online-softmax sums run in another order (checked within the
  reference tolerance, against the batch row and against the reference); the `compress` step end to end,
  both backends — its projections are GEMMs (cuBLAS bf16->fp32 for Triton, fp64 then rounded to fp32 for the
  reference) whose kernel choice depends on the row count, so a row's projection may differ in its last
  bits; torch norm/RoPE on CUDA (torch picks its row-reduction strategy from the tensor shape).
* TileLang `index_topk_fused`: the selected SET and the lengths are checked bitwise; the order is deterministic
  by construction since the two-launch rewrite (chunk-local selects merged in chunk order, no atomic slots)
  but only the set is asserted here; rows with visible <= top-k are exact, in order.

Status: passes on an H200 (bench/results/h200/gpu_tests_*.txt); not yet run on an H100. TileLang cases live in
`TestTileLang` (slow first compiles): `-k "not tilelang"` deselects them.
"""

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest
from torch import Tensor

# helpers (and their tolerances) of the per-kernel test files, imported from the sibling modules
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from test_compress_triton import Case, _clone, _meta, _op_args, _params, _random_state, check_entries, check_state
from test_formats_triton import _assert_bytes_equal, _indexer_k, _loc, _model1_x, _random_cache
from test_index_topk_triton import check_logits, check_topk
from test_norm_rope_triton import _compare as _compare_norm_rope
from test_norm_rope_triton import _cos_sin, _rand_x, _rope_env

from dsv4fn import DSV4Config, _backend, attend, store_index_keys, store_kv
from dsv4fn.attend.reference import sparse_attention
from dsv4fn.compress import reference as compress_ref_mod
from dsv4fn.compress.triton import compress_windows, project
from dsv4fn.formats import indexer_fp8, model1
from dsv4fn.index_topk import reference as index_ref
from dsv4fn.norm_rope import reference as nr_ref
from dsv4fn.state import IndexerKeyCache, PagedKVCache

pytestmark = pytest.mark.gpu

BATCH = int(os.environ.get("DSV4FN_TEST_BATCH", "1024"))
KEYS = int(os.environ.get("DSV4FN_TEST_KEYS", "2048"))
H, D, WIN, K2 = 64, 512, 128, 512  # V4-Flash attention: heads, head dim, window list, compressed list
PAGE1, PAGE2 = 64, 64  # window / compressed cache pages (the geometry of test_tilelang_gpu: shared compiles)
HI, DI, PAGE, TOPK = 64, 128, 64, 512  # indexer heads, head dim, key page, top-k
HIDDEN = 4096
DEV = "cuda"
ROWS = sorted({0, 1, 2, 3, BATCH // 2 + 1, BATCH - 1})  # run alone: the edge rows, one mid-batch, the last
TILELANG_FP8_RTOL = 1e-3  # test_tilelang_gpu.FP8_MMA_RTOL: of each row's largest |logit|
FLASH = DSV4Config.flash()

# every (step, backend) this file checks; test_every_registered_backend_is_covered keeps it complete
COVERED: dict[str, set[str]] = {
    "attend": {"torch", "triton", "tilelang"},
    "index_logits": {"torch", "triton", "tilelang"},
    "topk": {"torch", "triton"},
    "index_topk_fused": {"tilelang"},
    "compress": {"torch", "triton"},
    "store_model1": {"torch", "triton"},
    "store_indexer": {"torch", "triton"},
    "rms_normalize": {"torch", "triton"},
    "norm_rope": {"torch", "triton"},
    "apply_rope": {"torch", "triton"},
}

assert BATCH >= 8 and KEYS % PAGE == 0 and KEYS >= TOPK + PAGE, (BATCH, KEYS)


# ---------------------------------------------------------------------------------------------
# generic helpers
# ---------------------------------------------------------------------------------------------

_MEMO: dict[tuple, Any] = {}


def _memo(key: tuple, fn: Callable[[], Any]) -> Any:
    """Results shared by the tests of this module, computed inside the first test that needs them (so
    under conftest's NaN-poisoned allocations)."""
    if key not in _MEMO:
        _MEMO[key] = fn()
    return _MEMO[key]


@pytest.fixture(scope="module", autouse=True)
def _free_module_memory():
    yield
    _MEMO.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: Tensor) -> Tensor:
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point():
        return t.view(_INT_VIEW[t.element_size()])
    return t


def assert_bitwise(name: str, expect: Tensor, got: Tensor) -> None:
    """Identical shape, dtype and bits (NaN payloads and the sign of zero included)."""
    assert got.shape == expect.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    assert got.dtype == expect.dtype, f"{name}: dtype {got.dtype} != {expect.dtype}"
    diff = _raw(expect) != _raw(got)
    if bool(diff.any()):
        n = int(diff.sum())
        first = tuple(diff.nonzero()[0].tolist())
        e, g = expect[first], got[first]
        vals = f"{_raw(g).item()} vs {_raw(e).item()} (raw bits)"
        if expect.is_floating_point() and expect.element_size() > 1:
            vals = f"{g.item()!r} vs {e.item()!r}"
            fin = torch.isfinite(expect) & torch.isfinite(got)
            if bool(fin.any()):
                vals += f"; max |diff| on finite elements {(expect[fin].double() - got[fin].double()).abs().max():.3e}"
        raise AssertionError(f"{name}: {n} of {expect.numel()} elements differ, first at {list(first)}: {vals}")


def _skip_unless(step: str, backend: str) -> None:
    if backend not in _backend.available(step):
        pytest.skip(f"step {step!r} has no {backend!r} backend here (available: {_backend.available(step)})")


def _impl(step: str, backend: str) -> Callable[..., Any]:
    return _backend.resolve(step, backend, torch.device(DEV))[1]


def test_every_registered_backend_is_covered():
    """A backend registered later must get its robustness cases here."""
    for step in sorted(set(_backend._MODULES) | set(_backend._impls)):
        missing = set(_backend.available(step)) - COVERED.get(step, set())
        assert not missing, f"step {step!r}: backends {sorted(missing)} have no case in test_robustness_gpu.py"


# ---------------------------------------------------------------------------------------------
# attend: a V4-Flash decode batch
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttendCase:
    q: Tensor
    cache: PagedKVCache
    idx: Tensor
    lens: Tensor
    extra: PagedKVCache
    eidx: Tensor
    elens: Tensor
    sink: Tensor
    scale: float

    def args(self, sel: Tensor | slice | None = None) -> tuple[Tensor, PagedKVCache, Tensor, Tensor, dict]:
        s = slice(None) if sel is None else sel
        kw = dict(extra_cache=self.extra, extra_indices=self.eidx[s], extra_lens=self.elens[s], sink=self.sink)
        return self.q[s].contiguous(), self.cache, self.idx[s].contiguous(), self.lens[s].contiguous(), kw


def _poisoned_model1(n_slots: int, page: int, gen: torch.Generator) -> tuple[PagedKVCache, int]:
    """Random records in slots 0..n_slots-1 (a quarter with tiny first tiles: other scales, subnormal
    codes), then one page whose every slot decodes to NaN (e4m3 0x7F bytes, NaN rope). Returns the cache and
    the first poisoned slot."""
    assert n_slots % page == 0
    pages = n_slots // page + 1
    cache = PagedKVCache.allocate(pages, page, device=DEV)
    cache.data.fill_(0x7F)
    x = torch.randn(n_slots, D, generator=gen, device=DEV) * 2.0
    x[: n_slots // 4, :64] *= 1e-3
    cache = model1.store(cache, x.to(torch.bfloat16), torch.arange(n_slots, dtype=torch.int32, device=DEV))
    rec, _ = model1._split_page(cache)
    rope = rec[-1, :, cache.nope_dim :]
    rope[:, 0::2] = 0xC0  # bf16 0x7FC0 (little endian): NaN
    rope[:, 1::2] = 0x7F
    return cache, (pages - 1) * page


def _index_lists(k: int, n_valid: int, lens: Tensor, poison0: int, page: int, gen: torch.Generator) -> Tensor:
    """[b, 1, k] slots in [0, n_valid) with 5 % holes (-1); columns past a row's length point at NaN slots."""
    b = lens.shape[0]
    idx = torch.randint(0, n_valid, (b, k), generator=gen, device=DEV, dtype=torch.int32)
    idx = torch.where(torch.rand(b, k, generator=gen, device=DEV) < 0.05, -1, idx)
    col = torch.arange(k, device=DEV)
    idx = torch.where(col.view(1, k) >= lens.view(b, 1), poison0 + col % page, idx)
    return idx.to(torch.int32).view(b, 1, k)


def _attend_case() -> AttendCase:
    gen = torch.Generator(device=DEV).manual_seed(1024)
    b = BATCH
    n1 = max(4096, b * 32) // PAGE1 * PAGE1
    n2 = max(8192, b * 64) // PAGE2 * PAGE2
    cache, p1 = _poisoned_model1(n1, PAGE1, gen)
    extra, p2 = _poisoned_model1(n2, PAGE2, gen)
    lens = torch.randint(1, WIN + 1, (b,), generator=gen, device=DEV, dtype=torch.int32)
    elens = torch.randint(0, K2 + 1, (b,), generator=gen, device=DEV, dtype=torch.int32)
    lens[0], elens[0] = 0, 0  # nothing to attend: o = 0, lse = +inf
    lens[1], elens[1] = WIN, K2  # full lists of -1 only (below): o = 0, lse = +inf
    lens[2], elens[2] = 5, 0  # a sequence shorter than the window, no compressed entry yet
    lens[3], elens[3] = WIN, K2  # full lists without holes (below)
    idx = _index_lists(WIN, n1, lens, p1, PAGE1, gen)
    eidx = _index_lists(K2, n2, elens, p2, PAGE2, gen)
    idx[1], eidx[1] = -1, -1
    idx[3] = torch.randint(0, n1, (1, WIN), generator=gen, device=DEV, dtype=torch.int32)
    eidx[3] = torch.randint(0, n2, (1, K2), generator=gen, device=DEV, dtype=torch.int32)
    q = (torch.randn(b, 1, H, D, generator=gen, device=DEV) * 1.5).to(torch.bfloat16)
    sink = torch.randn(H, generator=gen, device=DEV)
    return AttendCase(q, cache, idx, lens, extra, eidx, elens, sink, D**-0.5)


@pytest.fixture(scope="module")
def attend_case() -> AttendCase:
    return _attend_case()


def _attend_reference_run(c: AttendCase) -> tuple[Tensor, Tensor]:
    """The fp64 reference over the batch in chunks of 256 rows (it is batch-invariant; the chunks bound
    its memory)."""
    os_, ls = [], []
    for r0 in range(0, BATCH, 256):
        q, cache, idx, lens, kw = c.args(slice(r0, r0 + 256))
        o, lse = sparse_attention(q, cache, idx, lens, scale=c.scale, **kw)
        os_.append(o)
        ls.append(lse)
    return torch.cat(os_), torch.cat(ls)


def _attend_reference(c: AttendCase) -> tuple[Tensor, Tensor]:
    return _memo(("attend", "reference"), lambda: _attend_reference_run(c))


def _attend_run(backend: str, c: AttendCase, sel: Tensor | slice | None = None, **extra: Any) -> tuple[Tensor, Tensor]:
    """The public step on rows `sel` (all when None; the torch batch in chunks); `num_splits=` goes to the
    Triton adapter directly."""
    if backend == "torch" and sel is None:
        return _attend_reference_run(c)
    q, cache, idx, lens, kw = c.args(sel)
    if extra:
        return _impl("attend", backend)(q, cache, idx, lens, scale=c.scale, **kw, **extra)
    return attend(q, cache, idx, lens, backend=backend, **kw)


def check_attend(ctx: str, ref: tuple[Tensor, Tensor], got: tuple[Tensor, Tensor]) -> None:
    """No NaN (the NaN slots are never selected), +inf LSE exactly where the reference has it and o == 0
    there, o within bf16 relative RMS 5e-3 of the reference PER REQUEST (so one bad row cannot hide in a
    batch of 1024), LSE within 1e-4."""
    (o_ref, lse_ref), (o, lse) = ref, got
    assert o.shape == o_ref.shape and o.dtype == torch.bfloat16, f"{ctx}: o {o.dtype} {tuple(o.shape)}"
    assert lse.shape == lse_ref.shape and lse.dtype == torch.float32, f"{ctx}: lse {lse.dtype} {tuple(lse.shape)}"
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), f"{ctx}: NaN in the output (leak or unwritten)"
    assert not torch.isneginf(lse).any(), f"{ctx}: -inf LSE"
    assert torch.equal(torch.isposinf(lse), torch.isposinf(lse_ref)), f"{ctx}: +inf LSE positions differ"
    empty = torch.isposinf(lse).permute(0, 2, 1)  # [b, s_q, h]
    assert bool((o[empty] == 0).all()), f"{ctx}: o must be exactly 0 where lse is +inf"
    e, g = o_ref.double().flatten(1), o.double().flatten(1)
    err = (e - g).square().sum(1).sqrt()
    norm = e.square().sum(1).sqrt()
    rows = norm > 0
    rel = torch.where(rows, err / norm.clamp_min(1e-300), err)
    w = int(rel.argmax())
    assert rel[w].item() <= 5e-3, f"{ctx}: request {w}: o relative RMS {rel[w].item():.3e} > 5e-3"
    fin = torch.isfinite(lse_ref)
    if bool(fin.any()):
        d = (lse[fin].double() - lse_ref[fin].double()).abs()
        i = int(d.argmax())
        assert d[i].item() <= 1e-4, f"{ctx}: lse abs error {d[i].item():.3e}: {lse[fin][i]} vs {lse_ref[fin][i]}"


def _rows_tensor() -> Tensor:
    return torch.tensor(ROWS, device=DEV)


def _attend_batch_invariance(backend: str, c: AttendCase, batch: tuple[Tensor, Tensor], bitwise: bool, **kw) -> None:
    """Each of ROWS alone, and ROWS together as a small batch, against the rows of the big batch."""
    o_b, lse_b = batch
    ref_o, ref_lse = _attend_reference(c)
    sel = _rows_tensor()
    together = _attend_run(backend, c, sel, **kw)
    for j, i in enumerate(ROWS):
        alone = _attend_run(backend, c, slice(i, i + 1), **kw)
        got_rows = {"alone": alone, "in the small batch": (together[0][j : j + 1], together[1][j : j + 1])}
        for how, (o, lse) in got_rows.items():
            ctx = f"{backend} {kw or 'default splits'}: row {i} {how}"
            if bitwise:
                assert_bitwise(f"{ctx}: o", o_b[i : i + 1], o)
                assert_bitwise(f"{ctx}: lse", lse_b[i : i + 1], lse)
            else:  # within the reference tolerance of the batch row and of the reference row
                check_attend(f"{ctx} vs the batch row", (o_b[i : i + 1], lse_b[i : i + 1]), (o, lse))
                check_attend(f"{ctx} vs the reference", (ref_o[i : i + 1], ref_lse[i : i + 1]), (o, lse))


@pytest.mark.parametrize("backend", ["triton"])
def test_attend_batch_vs_reference(backend, attend_case):
    _skip_unless("attend", backend)
    got = _memo(("attend", backend), lambda: _attend_run(backend, attend_case))
    check_attend(f"attend[{backend}] batch {BATCH}", _attend_reference(attend_case), got)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attend_deterministic(backend, attend_case):
    _skip_unless("attend", backend)
    c = attend_case
    first = _attend_reference(c) if backend == "torch" else _memo(("attend", backend), lambda: _attend_run(backend, c))
    second = _attend_run(backend, c)
    assert_bitwise(f"attend[{backend}] o", first[0], second[0])
    assert_bitwise(f"attend[{backend}] lse", first[1], second[1])
    # the split path (partials + combine kernel): a lone row under the default heuristic, and the batch at
    # a pinned split count
    a1 = _attend_run(backend, c, slice(2, 3))
    a2 = _attend_run(backend, c, slice(2, 3))
    assert_bitwise(f"attend[{backend}] alone o", a1[0], a2[0])
    assert_bitwise(f"attend[{backend}] alone lse", a1[1], a2[1])
    if backend == "triton":
        s1 = _attend_run(backend, c, num_splits=3)
        s2 = _attend_run(backend, c, num_splits=3)
        assert_bitwise("attend[triton] 3 splits o", s1[0], s2[0])
        assert_bitwise("attend[triton] 3 splits lse", s1[1], s2[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attend_batch_invariant_default_path(backend, attend_case):
    """torch: bitwise (fp64 math rounded once). Triton through the public step: the split count follows the
    batch size, so a lone row runs split + combine where the batch runs single-pass: reference tolerance."""
    _skip_unless("attend", backend)
    c = attend_case
    batch = _attend_reference(c) if backend == "torch" else _memo(("attend", backend), lambda: _attend_run(backend, c))
    _attend_batch_invariance(backend, c, batch, bitwise=backend == "torch")


@pytest.mark.parametrize("splits", [1, 3])
def test_attend_triton_batch_invariant_pinned_splits(splits, attend_case):
    """With the split count pinned the Triton kernel computes each row identically at any batch size."""
    _skip_unless("attend", "triton")
    c = attend_case
    batch = _attend_run("triton", c, num_splits=splits)
    check_attend(f"attend[triton] {splits} splits", _attend_reference(c), batch)
    _attend_batch_invariance("triton", c, batch, bitwise=True, num_splits=splits)


# ---------------------------------------------------------------------------------------------
# indexer: logits, top-k
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IndexCase:
    q8: Tensor
    w: Tensor
    cache: IndexerKeyCache
    pt: Tensor
    req: Tensor
    vis: Tensor
    width: int

    def logit_args(self, sel: slice | None = None) -> tuple:
        s = slice(None) if sel is None else sel
        return (self.q8[s], self.w[s], self.cache, self.pt, self.req[s], self.vis[s], self.width)

    def as_dict(self) -> dict:
        return dict(
            q8=self.q8, weights=self.w, cache=self.cache, page_table=self.pt, token_request=self.req, visible=self.vis
        )


def _index_case() -> IndexCase:
    """BATCH decode tokens, one request each, over a pool of random key pages shared between requests (as
    with prefix caching); the page-table entries past each token's visible pages point at a NaN page."""
    gen = torch.Generator(device=DEV).manual_seed(2048)
    b = BATCH
    blocks = KEYS // PAGE
    pool = max(2 * blocks, min(b * blocks, 4096))
    cache = IndexerKeyCache.allocate(pool + 1, PAGE, dim=DI, device=DEV)
    n = pool * PAGE
    keys = torch.randn(n, DI, generator=gen, device=DEV) * (0.5 + torch.rand(n, 1, generator=gen, device=DEV))
    cache = indexer_fp8.store(cache, keys, torch.arange(n, dtype=torch.int32, device=DEV))
    cache.data[pool].fill_(0x7F)  # e4m3 NaN keys
    cache.data[pool, PAGE * DI :].view(torch.float32).fill_(float("nan"))  # NaN scales
    vis = torch.randint(0, KEYS + 1, (b,), generator=gen, device=DEV, dtype=torch.int32)
    edges = [0, 1, PAGE, KEYS, TOPK - 1, TOPK, TOPK + 1, PAGE + 1]
    vis[: len(edges)] = torch.tensor(edges, dtype=torch.int32, device=DEV)
    # distinct pages within a request (a real page table never maps two blocks to one page)
    pt = torch.rand(b, pool, generator=gen, device=DEV).argsort(dim=1)[:, :blocks].to(torch.int32)
    used = (vis + PAGE - 1) // PAGE
    pt = torch.where(torch.arange(blocks, device=DEV).view(1, -1) >= used.view(-1, 1), pool, pt).to(torch.int32)
    q8, sq = indexer_fp8.quantize_rows(torch.randn(b, HI, DI, generator=gen, device=DEV))
    w = torch.randn(b, HI, generator=gen, device=DEV) * sq * DI**-0.5
    req = torch.arange(b, dtype=torch.int32, device=DEV)
    return IndexCase(q8, w.contiguous(), cache, pt.contiguous(), req, vis, KEYS)


@pytest.fixture(scope="module")
def index_case() -> IndexCase:
    return _index_case()


def _reference_logits(c: IndexCase) -> Tensor:
    def run() -> Tensor:
        return torch.cat([index_ref.paged_logits(*c.logit_args(slice(r, r + 128))) for r in range(0, BATCH, 128)])

    return _memo(("index_logits", "reference"), run)


def _logits(backend: str, c: IndexCase, sel: slice | None = None) -> Tensor:
    if backend == "torch" and sel is None:  # chunked like the reference (bounded fp64 memory)
        return torch.cat([index_ref.paged_logits(*c.logit_args(slice(r, r + 128))) for r in range(0, BATCH, 128)])
    return _impl("index_logits", backend)(*c.logit_args(sel))


def _batch_logits(backend: str, c: IndexCase) -> Tensor:
    """The batch's logits of `backend`, computed once per module."""
    if backend == "torch":
        return _reference_logits(c)
    return _memo(("index_logits", backend), lambda: _logits(backend, c))


def _check_logits_rowmax(ctx: str, ref: Tensor, got: Tensor) -> None:
    """test_tilelang_gpu's bound: -inf at the same places, finite logits within 1e-3 of the row's largest
    |logit| (+1e-6)."""
    assert got.shape == ref.shape and got.dtype == torch.float32, ctx
    assert torch.equal(torch.isneginf(ref), torch.isneginf(got)), f"{ctx}: -inf positions differ"
    fin = torch.isfinite(ref)
    assert bool(torch.isfinite(got[fin]).all()), f"{ctx}: non-finite logits (NaN page read?)"
    scale = ref.masked_fill(~fin, 0).abs().amax(-1, keepdim=True)
    err = (ref.double() - got.double()).masked_fill(~fin, 0).abs()
    bad = err > TILELANG_FP8_RTOL * scale + 1e-6
    if bool(bad.any()):
        r, j = bad.nonzero()[0].tolist()
        raise AssertionError(f"{ctx}: {int(bad.sum())} logits off, first [{r}, {j}]: {got[r, j]} vs {ref[r, j]}")


@pytest.mark.parametrize("backend", ["triton"])
def test_index_logits_batch_vs_reference(backend, index_case):
    _skip_unless("index_logits", backend)
    got = _batch_logits(backend, index_case)
    check_logits(index_case.as_dict(), index_case.width, got, rows=64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_index_logits_deterministic_and_batch_invariant(backend, index_case):
    _logits_deterministic_and_batch_invariant(backend, index_case)


def _logits_deterministic_and_batch_invariant(backend: str, c: IndexCase) -> None:
    _skip_unless("index_logits", backend)
    first = _batch_logits(backend, c)
    assert_bitwise(f"index_logits[{backend}] run to run", first, _logits(backend, c))
    sel = _rows_tensor()
    small = _impl("index_logits", backend)(c.q8[sel], c.w[sel], c.cache, c.pt, c.req[sel], c.vis[sel], c.width)
    for j, i in enumerate(ROWS):
        alone = _logits(backend, c, slice(i, i + 1))
        assert_bitwise(f"index_logits[{backend}] row {i} alone", first[i : i + 1], alone)
        assert_bitwise(f"index_logits[{backend}] row {i} in the small batch", first[i : i + 1], small[j : j + 1])


def _topk(backend: str, logits: Tensor, c: IndexCase, sel: slice | Tensor | None = None) -> tuple[Tensor, Tensor]:
    s = slice(None) if sel is None else sel
    return _impl("topk", backend)(logits[s].contiguous(), c.vis[s], TOPK, TOPK, c.pt, c.req[s], PAGE)


@pytest.mark.parametrize("backend,mode", [("torch", ""), ("triton", ""), ("triton", "split")])
def test_topk_batch_deterministic_and_batch_invariant(backend, mode, index_case, monkeypatch):
    """On the backend's own logits: sets vs the reference selection (a tie may go either way), then bits
    run to run and row by row. `split`: Triton's (row, chunk) path of rows longer than 16k entries (integer
    atomics for the histograms, prefix-sum placement), forced here on 512-entry chunks."""
    _skip_unless("topk", backend)
    _skip_unless("index_logits", backend)
    if mode == "split":
        cfg = sys.modules["dsv4fn.index_topk.triton"].TOPK_CONFIG
        if "split" not in cfg:
            pytest.skip("this Triton top-k has no (row, chunk) path")
        monkeypatch.setitem(cfg, "split", 1)
        monkeypatch.setitem(cfg, "chunk", 512)
    backend_id = f"{backend}{'-' + mode if mode else ''}"
    c = index_case
    logits = _batch_logits(backend, c)
    got = _topk(backend, logits, c)
    check_topk(logits, c.vis, TOPK, TOPK, c.pt, c.req, PAGE, got)
    again = _topk(backend, logits, c)
    assert_bitwise(f"topk[{backend_id}] slots run to run", got[0], again[0])
    assert_bitwise(f"topk[{backend_id}] lengths run to run", got[1], again[1])
    small = _topk(backend, logits, c, _rows_tensor())
    for j, i in enumerate(ROWS):
        in_small = (small[0][j : j + 1], small[1][j : j + 1])
        for name, (idx, lens) in (
            ("alone", _topk(backend, logits, c, slice(i, i + 1))),
            ("in the small batch", in_small),
        ):
            assert_bitwise(f"topk[{backend_id}] row {i} {name}: slots", got[0][i : i + 1], idx)
            assert_bitwise(f"topk[{backend_id}] row {i} {name}: lengths", got[1][i : i + 1], lens)


# ---------------------------------------------------------------------------------------------
# compress: V4 attention (ratio 4, overlap), HCA (ratio 128) and indexer (ratio 4, dc 128) compressors
# ---------------------------------------------------------------------------------------------

CSA_ATTN = Case(4, 512, True, HIDDEN, 32)
HCA = Case(128, 512, False, HIDDEN, 32)
CSA_INDEX = Case(4, 128, True, HIDDEN, 32)


@dataclasses.dataclass
class CompressCase:
    case: Case
    p: dict
    prefix: list[int]
    slots: list[int]
    meta: Any
    state: Any
    x: Tensor

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.p["wkv"], self.p["wgate"], self.p["ape"], self.p["norm_weight"])

    def alone(self, i: int) -> tuple[Any, Tensor]:
        """(metadata of request i alone, its token)."""
        return _meta(FLASH, [self.prefix[i]], [1], [self.slots[i]], DEV), self.x[i : i + 1]


def _compress_case(case: Case) -> CompressCase:
    def build() -> CompressCase:
        seed = case.ratio * 1000 + case.dc
        gen = torch.Generator().manual_seed(seed)
        p = _params(case, gen, DEV)
        prefix = torch.randint(0, 3000, (BATCH,), generator=gen)
        r = case.ratio
        prefix[:8] = torch.tensor([0, 1, r - 1, r, 2 * r - 1, 127, 128, 255])  # fresh, window edges
        slots = torch.randperm(BATCH + 3, generator=gen)[:BATCH].tolist()
        meta = _meta(FLASH, prefix.tolist(), [1] * BATCH, slots, DEV)
        state = _random_state(case, BATCH + 3, prefix.tolist(), slots, gen, DEV)
        x = torch.randn(BATCH, case.hidden, generator=gen).to(torch.bfloat16).to(DEV)
        return CompressCase(case, p, prefix.tolist(), slots, meta, state, x)

    return _memo(("compress", case.id), build)


def _compress(backend: str, c: CompressCase, meta: Any = None, x: Tensor | None = None) -> tuple:
    fn = _impl("compress", backend)
    s, e, h = fn(
        *c.weights(), _clone(c.state), c.x if x is None else x, c.meta if meta is None else meta, c.p["freqs"], 1e-6
    )
    return s, e, h


@pytest.mark.parametrize("case", [CSA_ATTN, HCA, CSA_INDEX], ids=lambda c: c.id)
def test_compress_batch_vs_reference(case, monkeypatch):
    """The Triton step against the reference on the same projections (test_compress_triton's isolation)."""
    _skip_unless("compress", "triton")
    c = _compress_case(case)
    monkeypatch.setattr(compress_ref_mod, "linear", project)
    s_ref, e_ref, h_ref = _compress("torch", c)
    s_tri, e_tri, h_tri = _compress("triton", c)
    assert torch.equal(h_tri, h_ref), "has_entry differs"
    print(check_entries(e_tri, e_ref, h_ref))
    check_state("state.kv", s_tri.kv, s_ref.kv)
    check_state("state.score", s_tri.score, s_ref.score)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [CSA_ATTN, HCA], ids=lambda c: c.id)
def test_compress_deterministic(case, backend):
    _skip_unless("compress", backend)
    c = _compress_case(case)
    (s1, e1, h1), (s2, e2, h2) = _compress(backend, c), _compress(backend, c)
    assert_bitwise(f"compress[{backend}] entries", e1, e2)
    assert_bitwise(f"compress[{backend}] has_entry", h1, h2)
    assert_bitwise(f"compress[{backend}] state.kv", s1.kv, s2.kv)
    assert_bitwise(f"compress[{backend}] state.score", s1.score, s2.score)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [CSA_ATTN, HCA], ids=lambda c: c.id)
def test_compress_step_batch_invariant_within_tolerance(case, backend):
    """The whole step (projection GEMMs included) for a request alone vs inside the batch: within the
    entry / state tolerances of test_compress_triton (GEMM kernels depend on the row count)."""
    _skip_unless("compress", backend)
    c = _compress_case(case)
    s_b, e_b, h_b = _memo(("compress", case.id, backend), lambda: _compress(backend, c))
    for i in ROWS:
        meta_i, x_i = c.alone(i)
        s_i, e_i, h_i = _compress(backend, c, meta_i, x_i)
        assert torch.equal(h_i, h_b[i : i + 1]), f"row {i}: has_entry differs"
        check_entries(e_i, e_b[i : i + 1], h_b[i : i + 1])
        slot = c.slots[i]
        check_state(f"row {i} state.kv", s_i.kv[slot], s_b.kv[slot])
        check_state(f"row {i} state.score", s_i.score[slot], s_b.score[slot])


@pytest.mark.parametrize("case", [CSA_ATTN, HCA], ids=lambda c: c.id)
def test_compress_triton_kernel_batch_invariant_bitwise(case):
    """`dsv4fn::compress_windows` on fixed projections: a request alone == the request inside the batch."""
    _skip_unless("compress", "triton")
    c = _compress_case(case)
    kv, sc = project(c.x, c.p["wkv"]), project(c.x, c.p["wgate"])
    st_b = _clone(c.state)
    e_b, h_b = compress_windows(*_op_args(case, kv, sc, c.p, st_b, c.meta))
    for i in ROWS:
        meta_i, _ = c.alone(i)
        st_i = _clone(c.state)
        e_i, h_i = compress_windows(*_op_args(case, kv[i : i + 1], sc[i : i + 1], c.p, st_i, meta_i))
        assert_bitwise(f"row {i} entries", e_b[i : i + 1], e_i)
        assert_bitwise(f"row {i} has_entry", h_b[i : i + 1], h_i)
        slot = c.slots[i]
        assert_bitwise(f"row {i} state.kv", st_b.kv[slot], st_i.kv[slot])
        assert_bitwise(f"row {i} state.score", st_b.score[slot], st_i.score[slot])


# ---------------------------------------------------------------------------------------------
# cache stores
# ---------------------------------------------------------------------------------------------

V4_GEO = dict(nope_dim=448, rope_dim=64, tile=64)


def _slot_mask(cache: PagedKVCache | IndexerKeyCache, slots: list[int]) -> Tensor:
    """Bool over `cache.data`: the bytes of the given slots (data record and scale record)."""
    m = torch.zeros(cache.data.shape, dtype=torch.bool)
    p = cache.page_size
    for s in slots:
        pg, o = divmod(s, p)
        if isinstance(cache, PagedKVCache):
            rb, sb = cache.record_bytes, cache.scale_bytes
            m[pg, o * rb : (o + 1) * rb] = True
            m[pg, p * rb + o * sb : p * rb + (o + 1) * sb] = True
        else:
            m[pg, o * cache.dim : (o + 1) * cache.dim] = True
            m[pg, p * cache.dim + 4 * o : p * cache.dim + 4 * o + 4] = True
    return m


def _store_inputs(kind: str):
    """A random-byte cache (CPU), BATCH rows with the quantizer's corner cases, distinct slots, ~15 % -1."""

    def build():
        gen = torch.Generator().manual_seed(77 if kind == "model1" else 78)
        pages = max(4, 2 * BATCH // 64)
        if kind == "model1":
            base = _random_cache(PagedKVCache, pages, 64, gen=gen, **V4_GEO)
            x = _model1_x(BATCH, V4_GEO, gen)
        else:
            base = _random_cache(IndexerKeyCache, pages, 64, dim=DI, gen=gen)
            x = _indexer_k(BATCH, DI, torch.float32, gen)
        loc = _loc(BATCH, base.num_slots, gen, p_skip=0.0)
        skip = torch.rand(BATCH, generator=gen) < 0.15
        skip[ROWS] = False
        skip[ROWS[0]] = True  # one of the rows run alone writes nothing
        return base, x, torch.where(skip, -1, loc).to(torch.int32)

    return _memo(("store", kind), build)


def _on(base: Any, device: str) -> Any:
    """A copy of the cache `base` (its bytes cloned) on `device`."""
    return dataclasses.replace(base, data=base.data.clone().to(device))


def _store(kind: str, backend: str, cache: Any, x: Tensor, loc: Tensor) -> Any:
    """The public step (donates `cache`)."""
    step = store_kv if kind == "model1" else store_index_keys
    return step(cache, x.to(DEV), loc.to(DEV), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["model1", "indexer"])
def test_store_batch_deterministic_and_batch_invariant(kind, backend):
    """Kernel bytes == the CPU reference's bytes (CUDA's torch rounds `amax / 448` differently, so the
    reference runs on the CPU, as in test_formats_triton); identical bytes run to run; rows stored alone
    (one after another into a fresh copy) write exactly the bytes they write inside the batch."""
    step = "store_model1" if kind == "model1" else "store_indexer"
    _skip_unless(step, backend)
    base, x, loc = _store_inputs(kind)
    full = _store(kind, backend, _on(base, DEV), x, loc)
    if backend != "torch":
        want = (model1.store if kind == "model1" else indexer_fp8.store)(_on(base, "cpu"), x, loc)
        _assert_bytes_equal(f"{step}[{backend}] batch {BATCH}", want.data, full.data)
    assert_bitwise(f"{step}[{backend}] run to run", full.data, _store(kind, backend, _on(base, DEV), x, loc).data)
    alone = _on(base, DEV)
    for i in ROWS:
        alone = _store(kind, backend, alone, x[i : i + 1], loc[i : i + 1])
    m = _slot_mask(base, [int(loc[i]) for i in ROWS if int(loc[i]) >= 0]).to(DEV)
    assert_bitwise(f"{step}[{backend}] slots of the rows stored alone", full.data[m], alone.data[m])
    assert_bitwise(f"{step}[{backend}] bytes outside those slots", base.data.to(DEV)[~m], alone.data[~m])


# ---------------------------------------------------------------------------------------------
# RMS-normalize, norm + RoPE, RoPE: decode q path (64 heads), kv path, inverse RoPE of the output
# ---------------------------------------------------------------------------------------------


def _nr_inputs() -> dict:
    def build() -> dict:
        gen = torch.Generator().manual_seed(4242)
        cos, sin = _cos_sin(BATCH, 32, gen)
        return dict(
            qr=_rand_x((BATCH, 1024), torch.bfloat16, gen),
            wq=1 + 0.2 * torch.randn(1024, generator=gen),
            q=_rand_x((BATCH, H, D), torch.bfloat16, gen),
            kv=_rand_x((BATCH, D), torch.bfloat16, gen),
            wkv=1 + 0.2 * torch.randn(D, generator=gen),
            o=_rand_x((BATCH, H, D), torch.bfloat16, gen),
            cos=cos,
            sin=sin,
        )

    return _memo(("norm_rope", "inputs"), build)


_NR_STEPS = ("rms_normalize", "norm_rope", "apply_rope")


def _nr_calls(backend: str, sel: slice | Tensor | None, dev: str) -> dict[str, Tensor]:
    """The four decode-path calls on rows `sel` (all when None)."""
    t = _nr_inputs()
    s = slice(None) if sel is None else sel
    if isinstance(s, Tensor):
        s = s.cpu()

    def g(k: str) -> Tensor:
        return t[k][s].contiguous().to(dev)

    rms, nr, ar = (_impl(n, backend) if backend != "torch" else getattr(nr_ref, n) for n in _NR_STEPS)
    wq, wkv = t["wq"].to(dev), t["wkv"].to(dev)
    c, sn = g("cos"), g("sin")
    return {
        "rms q_lora": rms(g("qr"), wq, 1e-6),
        "norm_rope q": nr(g("q"), None, 1e-6, c.unsqueeze(1), sn.unsqueeze(1), out_dtype=torch.bfloat16),
        "norm_rope kv": nr(g("kv"), wkv, 1e-6, c, sn, out_dtype=torch.bfloat16),
        "apply_rope inverse": ar(g("o"), c.unsqueeze(1), sn.unsqueeze(1), inverse=True),
    }


def _nr_envelopes() -> dict[str, Tensor | None]:
    """Magnitude envelopes of the rotated outputs (test_norm_rope_triton's bound for the q path)."""

    def build() -> dict[str, Tensor | None]:
        t = _nr_inputs()
        c1, s1 = t["cos"].unsqueeze(1), t["sin"].unsqueeze(1)
        env = _rope_env(nr_ref.rms_normalize(t["q"].float(), None, 1e-6), c1, s1)
        return {"rms q_lora": None, "norm_rope q": env, "norm_rope kv": None, "apply_rope inverse": None}

    return _memo(("norm_rope", "envelopes"), build)


def _check_nr(ctx: str, want: dict[str, Tensor], got: dict[str, Tensor], rows: slice | Tensor | None = None) -> None:
    """test_norm_rope_triton's comparison (CPU reference; the inverse RoPE exact)."""
    env = _nr_envelopes()
    s = slice(None) if rows is None else rows
    for k in want:
        e = env[k]
        _compare_norm_rope(
            f"{ctx} {k}", want[k].cpu(), got[k].cpu(), None if e is None else e[s], exact=k == "apply_rope inverse"
        )


def _nr_reference() -> dict[str, Tensor]:
    return _memo(("norm_rope", "reference"), lambda: _nr_calls("torch", None, "cpu"))


@pytest.mark.parametrize("backend", ["triton"])
def test_norm_rope_batch_vs_reference(backend):
    for step in _NR_STEPS:
        _skip_unless(step, backend)
    got = _memo(("norm_rope", backend), lambda: _nr_calls(backend, None, DEV))
    _check_nr(f"{backend} batch {BATCH}", _nr_reference(), got)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_rope_deterministic_and_batch_invariant(backend):
    """Triton: bitwise. torch on CUDA: deterministic; alone vs batch within the reference tolerance (its
    row reductions are chosen from the tensor shape)."""
    for step in _NR_STEPS:
        _skip_unless(step, backend)
    first = _memo(("norm_rope", backend), lambda: _nr_calls(backend, None, DEV))
    second = _nr_calls(backend, None, DEV)
    for k in first:
        assert_bitwise(f"{k}[{backend}] run to run", first[k], second[k])
    sel = _rows_tensor()
    small = _nr_calls(backend, sel, DEV)
    for j, i in enumerate(ROWS):
        alone = _nr_calls(backend, slice(i, i + 1), DEV)
        mine = {k: v[j : j + 1] for k, v in small.items()}
        for how, got in {"alone": alone, "in the small batch": mine}.items():
            if backend == "triton":
                for k in got:
                    assert_bitwise(f"{k}[{backend}] row {i} {how}", first[k][i : i + 1], got[k])
            else:
                _check_nr(f"torch row {i} {how}", {k: v[i : i + 1] for k, v in first.items()}, got, slice(i, i + 1))


# ---------------------------------------------------------------------------------------------
# TileLang (slow first compiles): -k "not tilelang" deselects this class
# ---------------------------------------------------------------------------------------------


class TestTileLang:
    """The TileLang backends: `attend`, `index_logits`, `index_topk_fused`."""

    @pytest.fixture(autouse=True)
    def _needs_tilelang(self):
        pytest.importorskip("tilelang")

    def test_tilelang_attend_batch_vs_reference(self, attend_case):
        _skip_unless("attend", "tilelang")
        got = _memo(("attend", "tilelang"), lambda: _attend_run("tilelang", attend_case))
        check_attend(f"attend[tilelang] batch {BATCH}", _attend_reference(attend_case), got)

    def test_tilelang_attend_deterministic(self, attend_case):
        _skip_unless("attend", "tilelang")
        c = attend_case
        first = _memo(("attend", "tilelang"), lambda: _attend_run("tilelang", c))
        second = _attend_run("tilelang", c)
        assert_bitwise("attend[tilelang] o", first[0], second[0])
        assert_bitwise("attend[tilelang] lse", first[1], second[1])
        a1, a2 = _attend_run("tilelang", c, slice(2, 3)), _attend_run("tilelang", c, slice(2, 3))  # split path
        assert_bitwise("attend[tilelang] alone o", a1[0], a2[0])
        assert_bitwise("attend[tilelang] alone lse", a1[1], a2[1])

    def test_tilelang_attend_batch_invariant_default_path(self, attend_case):
        """A lone row runs split + combine, the batch single-pass: reference tolerance."""
        _skip_unless("attend", "tilelang")
        c = attend_case
        batch = _memo(("attend", "tilelang"), lambda: _attend_run("tilelang", c))
        _attend_batch_invariance("tilelang", c, batch, bitwise=False)

    def test_tilelang_attend_batch_invariant_one_split(self, attend_case, monkeypatch):
        """With the split count pinned to 1 (patched `choose_splits`) every row is computed by the same
        compiled kernel the same way at any batch size: bitwise."""
        _skip_unless("attend", "tilelang")
        tl_attn = sys.modules["dsv4fn.attend.tilelang"]
        monkeypatch.setattr(tl_attn, "choose_splits", lambda *a, **k: 1)
        c = attend_case
        batch = _attend_run("tilelang", c)
        check_attend("attend[tilelang] 1 split", _attend_reference(c), batch)
        _attend_batch_invariance("tilelang", c, batch, bitwise=True)

    def test_tilelang_index_logits_batch_vs_reference(self, index_case):
        _skip_unless("index_logits", "tilelang")
        got = _batch_logits("tilelang", index_case)
        _check_logits_rowmax(f"index_logits[tilelang] batch {BATCH}", _reference_logits(index_case), got)

    def test_tilelang_index_logits_deterministic_and_batch_invariant(self, index_case):
        _logits_deterministic_and_batch_invariant("tilelang", index_case)

    def test_tilelang_index_topk_fused(self, index_case):
        """Sets vs the reference selection on the reference logits (a differing member only within the
        logits' precision of the k-th logit), rows with visible <= top-k exact; then the set and the
        lengths are deterministic and batch-invariant (the order above the threshold is not)."""
        _skip_unless("index_topk_fused", "tilelang")
        c = index_case
        fn = _impl("index_topk_fused", "tilelang")

        def run(sel: slice | Tensor | None = None) -> tuple[Tensor, Tensor]:
            s = slice(None) if sel is None else sel
            return fn(c.q8[s], c.w[s], c.cache, c.pt, c.req[s], c.vis[s], TOPK, TOPK, max_visible=KEYS)

        g_idx, g_len = run()
        logits = _reference_logits(c)
        e_idx, e_len = index_ref.select_topk(logits, c.vis, TOPK, TOPK, c.pt, c.req, PAGE)
        assert_bitwise("index_topk_fused lengths", e_len, g_len)
        trivial = c.vis <= TOPK
        assert_bitwise("index_topk_fused rows with visible <= topk", e_idx[trivial], g_idx[trivial])
        pad = torch.arange(TOPK, device=DEV).view(1, -1) >= g_len.view(-1, 1)
        assert bool((g_idx[pad] == -1).all()), "-1 padding"
        es, gs = e_idx.sort(-1).values, g_idx.sort(-1).values
        slots = index_ref.key_slots(c.pt, c.req, c.width, PAGE)
        for r in (es != gs).any(-1).nonzero().flatten().tolist():
            row = logits[r]
            kth = torch.topk(row, TOPK).values[-1].item()
            tol = TILELANG_FP8_RTOL * row[torch.isfinite(row)].abs().max().item() + 1e-6
            slot_logit = dict(zip(slots[r, : int(c.vis[r])].tolist(), row[: int(c.vis[r])].tolist(), strict=True))
            for s in set(es[r].tolist()) ^ set(gs[r].tolist()):
                assert s in slot_logit, f"row {r}: slot {s} is not a visible entry"
                assert abs(slot_logit[s] - kth) <= tol, f"row {r}: slot {s} logit {slot_logit[s]} vs k-th {kth}"
        a_idx, a_len = run()
        assert_bitwise("index_topk_fused lengths run to run", g_len, a_len)
        assert_bitwise("index_topk_fused sets run to run", gs, a_idx.sort(-1).values)
        assert_bitwise("index_topk_fused short rows run to run", g_idx[trivial], a_idx[trivial])
        sm_idx, sm_len = run(_rows_tensor())
        for j, i in enumerate(ROWS):
            for how, (ii, ll) in (
                ("alone", run(slice(i, i + 1))),
                ("small batch", (sm_idx[j : j + 1], sm_len[j : j + 1])),
            ):
                assert_bitwise(f"index_topk_fused row {i} {how}: length", g_len[i : i + 1], ll)
                assert_bitwise(f"index_topk_fused row {i} {how}: set", gs[i : i + 1], ii.sort(-1).values)
