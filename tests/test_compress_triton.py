"""Triton compressor (`dsv4fn::compress_windows` + the "triton" backend of `compress`) against the
torch reference: entries, has_entry and the carried state, for prefill from 0, chunked prefill from
mid-window, decode steps across window boundaries, mixed batches and chained steps, with overlap
(ratio 4) and without (ratio 16, tiny HCA, and a non-DSV4 ratio 2); dc 32/64 and dc 512/128.

CPU runs use the Triton interpreter on small shapes; GPU tests (V4 sizes, CUDA-graph capture,
opcheck) run when CUDA is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from dsv4fn import DSV4Config, KVAndScore, _backend, plan  # noqa: E402
from dsv4fn.compress import reference as ref_mod  # noqa: E402
from dsv4fn.compress.reference import compress_reference  # noqa: E402
from dsv4fn.compress.triton import compress_triton, compress_windows, project  # noqa: E402

CFG = DSV4Config.tiny()


@dataclasses.dataclass(frozen=True)
class Case:
    ratio: int
    dc: int
    overlap: bool
    hidden: int
    n_freq: int  # rope dims = 2 * n_freq

    @property
    def coff(self) -> int:
        return 2 if self.overlap else 1

    @property
    def id(self) -> str:
        return f"r{self.ratio}{'-overlap' if self.overlap else ''}-dc{self.dc}-H{self.hidden}"


TINY_CSA = Case(4, 64, True, 64, 16)
TINY_HCA = Case(16, 64, False, 64, 16)
RATIO2 = Case(2, 32, False, 64, 8)
RATIO2_OVERLAP = Case(2, 32, True, 64, 8)


def _freqs(n: int, device: str) -> torch.Tensor:
    return (1.0 / (160000.0 ** (torch.arange(0, 2 * n, 2, dtype=torch.float32) / (2 * n)))).to(device)


def _params(case: Case, gen: torch.Generator, device: str) -> dict:
    w = case.coff * case.dc
    hs = case.hidden**-0.5
    p = dict(
        wkv=(torch.randn(w, case.hidden, generator=gen) * hs).to(torch.bfloat16),
        wgate=(torch.randn(w, case.hidden, generator=gen) * hs).to(torch.bfloat16),
        ape=torch.randn(case.ratio, w, generator=gen) * 0.5,
        norm_weight=1 + 0.1 * torch.randn(case.dc, generator=gen),
    )
    p = {k: v.to(device) for k, v in p.items()}
    p["freqs"] = _freqs(case.n_freq, device)
    return p


def _meta(cfg: DSV4Config, prefix: list[int], extend: list[int], slots: list[int], device: str):
    b = len(prefix)
    longest = max(p + e for p, e in zip(prefix, extend, strict=True))
    nblk = -(-longest // cfg.block_size) + 1
    nswa = -(-longest // cfg.swa_page_size) + 1
    pt = torch.arange(b * nblk, dtype=torch.int32, device=device).view(b, nblk)
    swa = torch.arange(b * nswa, dtype=torch.int32, device=device).view(b, nswa)
    return plan(cfg, prefix, extend, pt, swa, torch.tensor(slots, dtype=torch.int32, device=device))


def _random_state(case: Case, n_slots: int, prefix: list[int], slots: list[int], gen, device: str) -> KVAndScore:
    """Garbage everywhere (a request with prefix 0 must ignore it, slots outside the batch must keep
    it), then the canonical state of a random history for every request with prefix > 0: rows of
    positions already seen hold random (kv, score), the others (0, -inf)."""
    r, dc, coff = case.ratio, case.dc, case.coff
    shape = (n_slots, coff * r, coff * dc)
    kv = torch.randn(shape, generator=gen)
    sc = torch.randn(shape, generator=gen)
    lead = r if case.overlap else 0
    for s, p0 in zip(slots, prefix, strict=True):
        if p0 == 0:
            continue
        kv[s].zero_()
        sc[s].fill_(float("-inf"))
        part = p0 % r
        seen = list(range(lead, lead + part))
        if case.overlap and p0 >= r:
            seen += list(range(r))
        for row in seen:
            kv[s, row] = torch.randn(coff * dc, generator=gen)
            sc[s, row] = torch.randn(coff * dc, generator=gen) + 0.5
    return KVAndScore(kv=kv.to(device), score=sc.to(device), ratio=r, dim=dc, overlap=case.overlap)


def _clone(s: KVAndScore) -> KVAndScore:
    return KVAndScore(kv=s.kv.clone(), score=s.score.clone(), ratio=s.ratio, dim=s.dim, overlap=s.overlap)


def check_entries(got: torch.Tensor, exp: torch.Tensor, has: torch.Tensor) -> str:
    """bf16 entries: relative RMS <= 5e-3, every element within 2 bf16 ulps (+1e-6), rows of tokens
    completing no window exactly zero. Returns a report of the worst element."""
    assert got.dtype == torch.bfloat16 and got.shape == exp.shape
    assert not got.isnan().any(), "NaN in entries (an unwritten row?)"
    assert torch.equal(got[~has], torch.zeros_like(got[~has])), "rows without an entry must be zero"
    e, g = exp.double(), got.double()
    err = (g - e).abs()
    if e.numel() == 0:
        return "empty"
    rel_rms = (err.square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-30)).item()
    excess = err - (2.0**-7 * e.abs() + 1e-6)
    w = int(excess.argmax())
    i, c = divmod(w, e.shape[1])
    report = f"rel RMS {rel_rms:.2e}; worst [{i}, {c}]: {g[i, c].item()} vs {e[i, c].item()} (|err| {err[i, c]:.2e})"
    assert rel_rms <= 5e-3, report
    assert excess.max() <= 0, report
    return report


def check_state(name: str, got: torch.Tensor, exp: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """fp32 state: -inf/inf at identical places, finite values allclose(rtol, atol)."""
    assert got.shape == exp.shape and got.dtype == exp.dtype == torch.float32
    assert not got.isnan().any(), f"{name}: NaN"
    inf_e, inf_g = ~torch.isfinite(exp), ~torch.isfinite(got)
    assert torch.equal(inf_e, inf_g), f"{name}: {int((inf_e != inf_g).sum())} non-finite positions differ"
    assert torch.equal(exp[inf_e], got[inf_g]), f"{name}: signs of infinities differ"
    e, g = exp[~inf_e].double(), got[~inf_g].double()
    if e.numel():
        err = (g - e).abs() - (atol + rtol * e.abs())
        w = int(err.argmax())
        assert err.max() <= 0, f"{name}: worst {g[w].item()} vs {e[w].item()}"


def run_both(case: Case, prefix, extend, slots, n_slots, seed, device="cpu", cfg=CFG):
    gen = torch.Generator().manual_seed(seed)
    p = _params(case, gen, device)
    meta = _meta(cfg, prefix, extend, slots, device)
    state = _random_state(case, n_slots, prefix, slots, gen, device)
    x = torch.randn(meta.num_tokens, case.hidden, generator=gen).to(torch.bfloat16).to(device)
    args = (p["wkv"], p["wgate"], p["ape"], p["norm_weight"])
    s_ref, e_ref, h_ref = compress_reference(*args, _clone(state), x, meta, p["freqs"], 1e-6)
    s_tri, e_tri, h_tri = compress_triton(*args, _clone(state), x, meta, p["freqs"], 1e-6)
    assert h_tri.dtype == torch.bool and torch.equal(h_tri, h_ref)
    report = check_entries(e_tri, e_ref, h_ref)
    check_state("state.kv", s_tri.kv, s_ref.kv)
    check_state("state.score", s_tri.score, s_ref.score)
    assert (s_tri.ratio, s_tri.dim, s_tri.overlap) == (case.ratio, case.dc, case.overlap)
    return report


def _scenarios(r: int) -> dict[str, tuple[list[int], list[int]]]:
    return {
        # prefill from 0: a multiple of r, a remainder, shorter than one window
        "prefill0": ([0, 0, 0], [2 * r, r + r // 2 + 1, max(1, r - 1)]),
        # chunked prefill: starting mid-window, in window 0, at a window boundary
        "chunk": ([r + 1, max(1, r // 2), 2 * r], [r + 2, r + 1, max(1, r - 1)]),
        # decode: completes window 0, completes window 1, opens a window, a fresh request, mid-window
        "decode": ([r - 1, 2 * r - 1, r, 0, 3 * r - 2], [1, 1, 1, 1, 1]),
        # prefill chunks and decode steps in one batch
        "mixed": ([r + 1, 2 * r - 1, 0, r // 2 + 1], [r + 3, 1, r + 2, 1]),
    }


_SCEN = ["prefill0", "chunk", "decode", "mixed"]


@pytest.mark.parametrize("scenario", _SCEN)
@pytest.mark.parametrize("case", [TINY_CSA, TINY_HCA, RATIO2], ids=lambda c: c.id)
def test_matches_reference(case: Case, scenario: str):
    prefix, extend = _scenarios(case.ratio)[scenario]
    b = len(prefix)
    slots = [(3 * i + 2) % (b + 2) for i in range(b)]  # scattered slots; two slots stay outside the batch
    run_both(case, prefix, extend, slots, b + 2, seed=zlib.crc32(f"{case.id}/{scenario}".encode()))


@pytest.mark.parametrize(
    ("case", "prefix", "extend"),
    [
        pytest.param(RATIO2_OVERLAP, [0, 3, 2, 5], [5, 1, 4, 1], id=RATIO2_OVERLAP.id),
        # V4 attention compressor width
        pytest.param(Case(4, 512, True, 64, 32), [3, 6, 0], [1, 3, 2], id="r4-overlap-dc512"),
        # V4 indexer compressor width
        pytest.param(Case(4, 128, True, 64, 32), [7, 4], [1, 5], id="r4-overlap-dc128"),
        # several candidate chunks (online softmax across chunks)
        pytest.param(Case(128, 128, False, 64, 32), [127, 200, 0], [1, 2, 3], id="r128-dc128"),
    ],
)
def test_matches_reference_wide(case: Case, prefix: list[int], extend: list[int]):
    slots = list(range(len(prefix)))[::-1]
    print(run_both(case, prefix, extend, slots, len(prefix) + 1, seed=7))


@pytest.mark.parametrize(
    ("case", "steps"),
    [
        # (prefix chunk lengths per step for two requests; 0 = request idle in that step)
        (TINY_CSA, [(6, 3), (1, 1), (1, 2), (1, 1), (3, 1), (1, 1), (1, 1)]),
        (TINY_HCA, [(13, 2), (1, 9), (1, 1), (5, 1), (1, 4), (1, 1)]),
    ],
    ids=lambda v: v.id if isinstance(v, Case) else "steps",
)
def test_chained_steps_match_reference(case: Case, steps):
    """Prefill, then decode steps and chunks crossing window boundaries: every step's entries and
    the carried state match the reference running the same chain."""
    gen = torch.Generator().manual_seed(11)
    p = _params(case, gen, "cpu")
    args = (p["wkv"], p["wgate"], p["ape"], p["norm_weight"])
    slots = [2, 0]
    s_ref = _random_state(case, 3, [0, 0], slots, gen, "cpu")
    s_tri = _clone(s_ref)
    done = [0, 0]
    for ext in steps:
        meta = _meta(CFG, done, list(ext), slots, "cpu")
        x = torch.randn(meta.num_tokens, case.hidden, generator=gen).to(torch.bfloat16)
        s_ref, e_ref, h_ref = compress_reference(*args, s_ref, x, meta, p["freqs"], 1e-6)
        s_tri, e_tri, h_tri = compress_triton(*args, s_tri, x, meta, p["freqs"], 1e-6)
        assert torch.equal(h_tri, h_ref)
        check_entries(e_tri, e_ref, h_ref)
        check_state("state.kv", s_tri.kv, s_ref.kv)
        check_state("state.score", s_tri.score, s_ref.score)
        done = [d + e for d, e in zip(done, ext, strict=True)]
    assert sum(done) > 0


def _op_args(case: Case, kv, sc, p, state, meta, tokens_per_program: int = 0):
    return (
        kv,
        sc,
        p["ape"],
        p["norm_weight"],
        p["freqs"],
        state.kv,
        state.score,
        meta.prefix_lens,
        meta.extend_lens,
        meta.query_start,
        meta.state_slots,
        meta.token_request,
        1e-6,
        case.ratio,
        case.overlap,
        tokens_per_program,
    )


@pytest.mark.parametrize("case", [TINY_CSA, RATIO2], ids=lambda c: c.id)
def test_chunking_invariant_bit_exact(case: Case):
    """Given the same projections, any split of a sequence into steps yields bit-identical entries
    and state to one prefill (one pooling routine for every path of the kernel)."""
    gen = torch.Generator().manual_seed(5)
    p = _params(case, gen, "cpu")
    n = 4 * case.ratio + 3
    kv = torch.randn(n, case.coff * case.dc, generator=gen)
    sc = torch.randn(n, case.coff * case.dc, generator=gen)
    one = KVAndScore.empty(2, ratio=case.ratio, dim=case.dc, overlap=case.overlap)
    meta = _meta(CFG, [0], [n], [1], "cpu")
    e_one, h_one = compress_windows(*_op_args(case, kv, sc, p, one, meta))
    # several tokens per program (the long-prefill launch shape), with a ragged tail
    blk = KVAndScore.empty(2, ratio=case.ratio, dim=case.dc, overlap=case.overlap)
    e_blk, h_blk = compress_windows(*_op_args(case, kv, sc, p, blk, meta, tokens_per_program=3))
    assert torch.equal(h_blk, h_one) and torch.equal(e_blk.view(torch.int16), e_one.view(torch.int16))
    assert torch.equal(blk.kv, one.kv) and torch.equal(blk.score, one.score)
    split = _random_state(case, 2, [0], [1], gen, "cpu")  # garbage: ignored by the first step
    bounds = [0, case.ratio + 1, case.ratio + 2, case.ratio + 3, 3 * case.ratio, n]
    rows_e, rows_h = [], []
    for a, b in itertools.pairwise(bounds):
        meta = _meta(CFG, [a], [b - a], [1], "cpu")
        e, h = compress_windows(*_op_args(case, kv[a:b], sc[a:b], p, split, meta))
        rows_e.append(e)
        rows_h.append(h)
    assert torch.equal(torch.cat(rows_h), h_one)
    assert torch.equal(torch.cat(rows_e).view(torch.int16), e_one.view(torch.int16))
    assert torch.equal(split.kv[1], one.kv[1]) and torch.equal(split.score[1], one.score[1])


def test_compare_backend_and_registration():
    """The registry finds the triton backend on CPU under the interpreter; `compare:triton` runs it
    beside the reference with the library's own comparator."""
    assert "triton" in _backend.available("compress")
    name, fn = _backend.resolve("compress", "compare:triton", torch.device("cpu"))
    assert name == "compare:triton"
    case = TINY_CSA
    gen = torch.Generator().manual_seed(3)
    p = _params(case, gen, "cpu")
    prefix, extend = [5, 0], [4, 4]
    meta = _meta(CFG, prefix, extend, [0, 1], "cpu")
    state = _random_state(case, 2, prefix, [0, 1], gen, "cpu")
    x = torch.randn(meta.num_tokens, case.hidden, generator=gen).to(torch.bfloat16)
    new_state, entries, has = fn(p["wkv"], p["wgate"], p["ape"], p["norm_weight"], state, x, meta, p["freqs"], 1e-6)
    assert new_state.kv.data_ptr() == state.kv.data_ptr()  # donated, updated in place
    assert has.sum().item() == 2 and entries.shape == (8, case.dc)


def test_opcheck_cpu():
    case = RATIO2_OVERLAP
    gen = torch.Generator().manual_seed(9)
    p = _params(case, gen, "cpu")
    prefix, extend = [3, 0], [1, 2]
    meta = _meta(CFG, prefix, extend, [1, 0], "cpu")
    state = _random_state(case, 2, prefix, [1, 0], gen, "cpu")
    kv = torch.randn(3, case.coff * case.dc, generator=gen)
    sc = torch.randn(3, case.coff * case.dc, generator=gen)
    torch.library.opcheck(
        torch.ops.dsv4fn.compress_windows.default,
        _op_args(case, kv, sc, p, state, meta),
        # FakeTensor runs would hand fake tensors to the interpreter: checked in the GPU test instead
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_bad_inputs_raise_clear_errors():
    case = TINY_CSA
    gen = torch.Generator().manual_seed(1)
    p = _params(case, gen, "cpu")
    meta = _meta(CFG, [0], [2], [0], "cpu")
    state = KVAndScore.empty(1, ratio=4, dim=64, overlap=True)
    x = torch.randn(2, case.hidden, generator=gen).to(torch.bfloat16)
    a = (p["wkv"], p["wgate"], p["ape"], p["norm_weight"])
    with pytest.raises(TypeError, match="x:"):
        compress_triton(*a, state, x.float(), meta, p["freqs"], 1e-6)
    with pytest.raises(ValueError, match="wgate"):
        compress_triton(p["wkv"], p["wgate"][:, :-1], *a[2:], state, x, meta, p["freqs"], 1e-6)
    with pytest.raises(TypeError, match="ape"):
        compress_triton(*a[:2], p["ape"].double(), a[3], state, x, meta, p["freqs"], 1e-6)
    with pytest.raises(ValueError, match="freqs"):
        compress_triton(*a, state, x, meta, _freqs(40, "cpu"), 1e-6)
    bad = KVAndScore(
        kv=state.kv.transpose(1, 2).contiguous().transpose(1, 2), score=state.score, ratio=4, dim=64, overlap=True
    )
    with pytest.raises(ValueError, match=r"state\.kv"):
        compress_triton(*a, bad, x, meta, p["freqs"], 1e-6)


# ---------------------------------------------------------------------------------------------
# GPU: V4 sizes
# ---------------------------------------------------------------------------------------------

V4_CASES = [Case(4, 512, True, 4096, 32), Case(128, 512, False, 4096, 32), Case(4, 128, True, 4096, 32)]


def _gpu_run(case: Case, prefix, extend, seed: int, monkeypatch) -> str:
    # isolate the kernel: the reference uses the same projections (bf16 GEMM, fp32 output)
    monkeypatch.setattr(ref_mod, "linear", project)
    b = len(prefix)
    slots = torch.randperm(b + 3, generator=torch.Generator().manual_seed(seed))[:b].tolist()
    return run_both(case, prefix, extend, slots, b + 3, seed, device="cuda", cfg=DSV4Config.flash())


@pytest.mark.gpu
@pytest.mark.parametrize("case", V4_CASES, ids=lambda c: c.id)
def test_gpu_v4_decode_batch128(case: Case, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 3000, (128,), generator=gen)
    prefix[:8] = torch.tensor([0, 1, case.ratio - 1, case.ratio, 2 * case.ratio - 1, 127, 128, 255])
    print(_gpu_run(case, prefix.tolist(), [1] * 128, 1, monkeypatch))


@pytest.mark.gpu
@pytest.mark.parametrize("case", V4_CASES, ids=lambda c: c.id)
def test_gpu_v4_prefill_2048(case: Case, monkeypatch):
    print(_gpu_run(case, [0, 1001, 130], [2048, 1047, 1], 2, monkeypatch))


@pytest.mark.gpu
def test_gpu_projection_precision():
    """The bf16 GEMM with fp32 output against the fp64-accumulated reference projection."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 4096, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(1024, 4096, generator=gen) * 4096**-0.5).to(torch.bfloat16).cuda()
    got, exp = project(x, w), ref_mod.linear(x, w)
    assert got.dtype == torch.float32
    rel = ((got - exp).norm() / exp.norm()).item()
    assert rel < 1e-5, rel  # fp32 accumulation over 4096 products


@pytest.mark.gpu
@pytest.mark.parametrize("case", V4_CASES[:2], ids=lambda c: c.id)
def test_gpu_decode_cuda_graph(case: Case):
    """The decode path captures into a CUDA graph (no host sync) and replays to the eager result."""
    gen = torch.Generator().manual_seed(8)
    p = _params(case, gen, "cuda")
    b = 64
    prefix = (torch.randint(0, 2000, (b,), generator=gen) | 3).tolist()  # ratio 4: all complete a window
    meta = _meta(DSV4Config.flash(), prefix, [1] * b, list(range(b)), "cuda")
    state0 = _random_state(case, b, prefix, list(range(b)), gen, "cuda")
    x = torch.randn(b, case.hidden, generator=gen).to(torch.bfloat16).cuda()
    args = (p["wkv"], p["wgate"], p["ape"], p["norm_weight"])
    s_eager, e_eager, h_eager = compress_triton(*args, _clone(state0), x, meta, p["freqs"], 1e-6)
    state = _clone(state0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        compress_triton(*args, state, x, meta, p["freqs"], 1e-6)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _, e_g, h_g = compress_triton(*args, state, x, meta, p["freqs"], 1e-6)
    state.kv.copy_(state0.kv)
    state.score.copy_(state0.score)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(h_g, h_eager)
    assert torch.equal(e_g.view(torch.int16), e_eager.view(torch.int16))
    assert torch.equal(state.kv, s_eager.kv) and torch.equal(state.score, s_eager.score)


@pytest.mark.gpu
@pytest.mark.parametrize("case", V4_CASES, ids=lambda c: c.id)
def test_gpu_opcheck(case: Case):
    gen = torch.Generator().manual_seed(6)
    p = _params(case, gen, "cuda")
    prefix, extend = [0, 5, 130], [9, 1, 3]
    meta = _meta(DSV4Config.flash(), prefix, extend, [2, 0, 1], "cuda")
    state = _random_state(case, 3, prefix, [2, 0, 1], gen, "cuda")
    t = meta.num_tokens
    kv = torch.randn(t, case.coff * case.dc, generator=gen).cuda()
    sc = torch.randn(t, case.coff * case.dc, generator=gen).cuda()
    torch.library.opcheck(torch.ops.dsv4fn.compress_windows.default, _op_args(case, kv, sc, p, state, meta))
