"""The peer pipeline of a whole layer step (bench/peer_layer.py) and its row in the harness.

On CPU the composition is tested with the torch references in the peers' places (DeepGEMM -> paged
logits, FlashMLA -> sparse attention): it must give `attention_layer(backend="torch")`'s selections and
output (the harness's layer checks) and the same compressor states and caches. DeepGEMM and FlashMLA are
absent here: the harness must report the row as missing, never fake it.
"""

import io
import os
import re
from contextlib import redirect_stdout

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest

import dsv4fn
from bench import peer_layer, peers
from bench import run as bench_run
from bench.configs import Case
from dsv4fn.formats import model1
from dsv4fn.index_topk.reference import select_topk

CPU = torch.device("cpu")
# the raw-KV store of the peer pipeline is ours on the kernel path: Triton (the interpreter on CPU)
STORE_BACKEND = "triton" if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def _layer_inputs(case: Case, dev: torch.device, seed: int = 0):
    """What `bench.run.setup_layer` builds: the batch, params, a filled random state, x."""
    torch.manual_seed(seed)
    bt = bench_run.make_batch(case, dev)
    cfg, meta = bt.cfg, bt.meta
    ratio = cfg.csa_ratio if case.op == "layer_csa" else cfg.hca_ratio
    li = bench_run.layer_index(cfg, ratio)
    params = bench_run.layer_params(cfg, li, dev)
    st = dsv4fn.init_layer_state(
        cfg, li, num_blocks=bt.n_blocks, num_swa_pages=bt.n_swa, num_slots=meta.batch_size, device=str(dev)
    )
    bench_run.fill_model1(st.swa)
    if st.compressed is not None:
        bench_run.fill_model1(st.compressed)
    if st.index_keys is not None:
        bench_run.fill_index_keys(st.index_keys)
    for s in (st.comp_state, st.index_state):
        if s is not None:
            bench_run.random_state(s, bt.meta)
    x = torch.randn(meta.num_tokens, cfg.hidden_size, device=dev).to(torch.bfloat16)
    return bt, params, st, x


# ---------------------------------------------------------------------------------------------
# torch.topk + glue == select_topk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "batch", "context"), [("decode", 6, 256), ("decode", 5, 72), ("mtp", 3, 96)])
def test_topk_slots_matches_select_topk(mode, batch, context):
    """Random logits (distinct values) over each row's visible entries, rows with visible < topk and >= topk:
    the same lengths, the same slot set per row, −1 everywhere else."""
    torch.manual_seed(batch * 1000 + context)
    bt = bench_run.make_batch(Case("index_topk", "tiny", mode, batch, context, 2 if mode == "mtp" else 1), CPU)
    meta = bt.meta
    csa = meta.csa
    assert csa is not None
    vis = csa.visible
    assert bool((vis < meta.topk).any()) or bool((vis >= meta.topk).any())
    logits = bench_run.random_logits(bt)
    e_sel, e_lens = select_topk(
        logits, vis, meta.topk, csa.width, meta.page_table, meta.token_request, csa.page_size
    )  # fmt: skip
    g_sel, g_lens = peer_layer.topk_slots(logits, meta)
    assert g_sel.dtype == torch.int32 and g_lens.dtype == torch.int32
    assert g_sel.shape == e_sel.shape
    assert torch.equal(g_lens, e_lens)
    assert torch.equal(g_sel.sort(dim=-1).values, e_sel.sort(dim=-1).values)
    col = torch.arange(g_sel.shape[1])
    assert torch.equal(g_sel >= 0, col.view(1, -1) < g_lens.view(-1, 1))  # entries first, then −1


# ---------------------------------------------------------------------------------------------
# The composition with the reference pieces == the reference layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "mode", "batch", "context"),
    [("layer_csa", "decode", 4, 256), ("layer_csa", "mtp", 2, 208), ("layer_hca", "decode", 4, 256),
     ("layer_hca", "mtp", 2, 208)],
)  # fmt: skip
def test_peer_layer_with_reference_pieces_matches_reference_layer(op, mode, batch, context):
    case = Case(op, "tiny", mode, batch, context, 2 if mode == "mtp" else 1)
    bt, params, st, x = _layer_inputs(case, CPU, seed=batch + context)
    cfg, meta = bt.cfg, bt.meta
    stream = meta.stream(params.ratio)
    assert bool((stream.write_loc >= 0).any()), "the case should complete compressor windows"
    expect = dsv4fn.attention_layer(cfg, params, bench_run.clone_tree(st), x, meta, backend="torch")
    seen: list[torch.Tensor] = []

    def logits_fn(q8, w, keys, m):
        seen.append(peer_layer.reference_logits(q8, w, keys, m))
        return seen[-1]

    got = peer_layer.peer_layer(
        cfg, params, bench_run.clone_tree(st), x, meta, logits_fn=logits_fn, attend_fn=peer_layer.reference_attend,
        backend=STORE_BACKEND,
    )  # fmt: skip
    out, new, aux = got
    assert out.dtype == torch.bfloat16 and out.shape == expect[0].shape
    assert not torch.isnan(out).any()
    if op == "layer_csa":
        assert meta.csa is not None and aux.csa_lens is not None and aux.csa_indices is not None
        assert expect[2].csa_lens is not None and expect[2].csa_indices is not None
        assert torch.equal(aux.csa_lens, expect[2].csa_lens)
        # the sets may differ only where logits tie: torch.topk and the reference's stable sort break exact
        # ties differently (the tiny config's 4 index heads give many exact-zero logits), and the peer's q
        # comes from fp32 projections (the reference: fp64), 1e-5 of the row's largest logit
        page = meta.csa.page_size
        el = bench_run.slots_to_logical(expect[2].csa_indices, meta, page)
        gl = bench_run.slots_to_logical(aux.csa_indices, meta, page)
        ok, detail = bench_run.check_selection(seen[0], aux.csa_lens, el, gl, 1e-5)
        assert ok, detail
        # outputs of the tokens that select the same set: within the layer tolerance (the harness's check;
        # the overlap of a tie-swapped set is checked above)
        ok, detail = bench_run.check_csa_layer(expect, got, min_overlap=0.0)
        assert ok, detail
        assert not detail.startswith("same set 0/"), detail
    else:
        ok, detail = bench_run.check_hca_layer(expect, got)
        assert ok, detail
        assert aux.csa_indices is None
    # both compressors are the reference in both pipelines and read only x: bitwise the same
    e_new = expect[1]
    for name in ("comp_state", "index_state"):
        a, b = getattr(e_new, name), getattr(new, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.kv, b.kv) and torch.equal(a.score, b.score), name
    for name in ("compressed", "index_keys"):
        a, b = getattr(e_new, name), getattr(new, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.data, b.data), name
    assert aux.entries is not None and expect[2].entries is not None
    assert torch.equal(aux.entries, expect[2].entries)
    # the raw KV (fp32 vs fp64 projection before one bf16 rounding) in the window cache
    loc = meta.swa_write_loc
    ek, gk = model1.gather(e_new.swa, loc), model1.gather(new.swa, loc)
    assert bench_run.rel_rms(ek.float(), gk.float()) <= 5e-3


def test_peer_layer_needs_a_logits_fn_for_csa():
    bt, params, st, x = _layer_inputs(Case("layer_csa", "tiny", "decode", 2, 128), CPU)
    with pytest.raises(ValueError, match="logits_fn"):
        peer_layer.peer_layer(
            bt.cfg, params, st, x, bt.meta, logits_fn=None, attend_fn=peer_layer.reference_attend,
            backend=STORE_BACKEND,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The harness: a missing peer is reported as missing
# ---------------------------------------------------------------------------------------------


def test_layer_ops_list_the_peer_pipeline():
    both = ("peer-pipeline", "peer-pipeline+triton-compress")
    assert set(both) <= set(peers.PEERS)
    assert peers.OP_PEERS["layer_csa"] == both
    assert peers.OP_PEERS["layer_hca"] == both


def test_availability_of_the_composite(monkeypatch):
    peers._state.clear()
    monkeypatch.setitem(peers._state, "flashmla", ("op", "schema"))
    monkeypatch.setitem(peers._state, "deepgemm", peers.PeerMissing("import deep_gemm failed: nope"))
    av = peers.availability()
    assert av["flashmla"] == "ok"
    assert av["peer-pipeline"] == "missing: deepgemm import deep_gemm failed: nope"
    monkeypatch.setitem(peers._state, "deepgemm", object())
    assert peers.availability()["peer-pipeline"] == "ok"
    assert peers.availability()["peer-pipeline+triton-compress"] == "ok"
    peers._state.clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlashMLA and DeepGEMM may be present with CUDA")
def test_peer_factories_raise_peer_missing_without_cuda():
    peers._state.clear()
    with pytest.raises(peers.PeerMissing):
        peer_layer.flashmla_attend_fn()
    bt = bench_run.make_batch(Case("layer_csa", "tiny", "decode", 2, 128), CPU)
    with pytest.raises(peers.PeerMissing):
        peer_layer.deepgemm_logits_fn(bt.meta)
    assert peers.availability()["peer-pipeline"].startswith("missing: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlashMLA and DeepGEMM may be present with CUDA")
@pytest.mark.parametrize("op", ["layer_csa", "layer_hca"])
def test_run_case_reports_the_peer_pipeline_missing(op):
    """Through the factory (no availability verdict beforehand): the row says missing, with no time."""
    peers._state.clear()
    args = bench_run.parse_args(["--backend", "torch", "--device", "cpu"])
    args.backends = ["torch"]
    args.peers = list(peers.PEERS)
    args.timers = ["cpu"]
    common = dict(date="", git_sha="", gpu="cpu", gpu_slug="cpu", seed=0, torch="", triton="", cuda="", python="",
                  _peaks=(1e12, 1e12, "test"))  # fmt: skip
    peer_state: dict[str, str] = {}
    rows = bench_run.run_case(Case(op, "tiny", "decode", 2, 128), CPU, args, common, peer_state, print)
    bench_run.add_speedups(rows)
    peer_rows = [r for r in rows if r["impl"].startswith("peer-pipeline")]
    assert len(peer_rows) == 2
    for r in peer_rows:
        assert r["impl_kind"] == "peer" and r["status"].startswith("missing: ") and r["check"] == "n/a"
        assert r["time_us"] != r["time_us"]  # NaN: nothing was timed
    assert peer_state["peer-pipeline"].startswith("missing: ")
    ours = [r for r in rows if r["impl"] == "torch"]
    assert ours and ours[0]["status"] == "ok" and ours[0]["peer"] == ""  # no speed-up against a missing peer


def _reference_peers(monkeypatch):
    """The harness's peer factory with the torch references in the peers' places: tests the wiring only (the
    bench itself never substitutes a peer)."""
    monkeypatch.setattr(peer_layer, "flashmla_attend_fn", lambda: peer_layer.reference_attend)
    monkeypatch.setattr(peer_layer, "deepgemm_logits_fn", lambda meta: peer_layer.reference_logits)


@pytest.mark.parametrize("op", ["layer_csa", "layer_hca"])
def test_setup_layer_peer_runs_on_its_own_state(op, monkeypatch):
    """The peer closure checks against the reference from the state it starts from and writes only into its
    own copy: the state our backends use is untouched (a decode step that completes a window would move it)."""
    _reference_peers(monkeypatch)
    torch.manual_seed(11)
    bench = bench_run.setup_layer(Case(op, "tiny", "decode", 4, 256), CPU)
    before = bench.make("torch", True)()
    fn, check = bench.peers["peer-pipeline"]()
    ok, detail = check(fn())
    assert ok, detail
    assert "vs the reference, compressor torch" in detail
    fn()
    fn()  # timed calls keep writing into the peer's copy
    after = bench.make("torch", True)()
    assert torch.equal(before[0], after[0])


@pytest.mark.parametrize("op", ["layer_csa", "layer_hca"])
def test_run_case_times_the_peer_pipeline_and_computes_speedups(op, monkeypatch):
    _reference_peers(monkeypatch)
    args = bench_run.parse_args(["--device", "cpu"])
    args.backends, args.peers, args.timers = ["torch"], list(peers.PEERS), ["cpu"]
    common = dict(date="", git_sha="", gpu="cpu", gpu_slug="cpu", seed=0, torch="", triton="", cuda="", python="",
                  _peaks=(1e12, 1e12, "test"))  # fmt: skip
    torch.manual_seed(5)
    rows = bench_run.run_case(Case(op, "tiny", "decode", 4, 256), CPU, args, common, {}, print)
    bench_run.add_speedups(rows)
    by = {r["impl"]: r for r in rows}
    p, ours = by["peer-pipeline"], by["torch"]
    assert p["status"] == "ok" and p["check"] == "pass", p["check_detail"]
    assert p["time_us"] > 0
    assert ours["peer"] == "peer-pipeline"
    assert ours["speedup_vs_peer"] == pytest.approx(p["time_us"] / ours["time_us"])


def test_speedups_against_the_peer_pipeline():
    """add_speedups treats the layer's peer like any other: ours get speedup_vs_peer = peer time / ours."""
    base = dict(case="c", timer="l2flush", status="ok", peer="", speedups="", speedup_vs_peer=float("nan"))
    rows = [
        dict(base, impl="triton", impl_kind="backend", time_us=100.0),
        dict(base, impl="torch", impl_kind="backend", time_us=1000.0),
        dict(base, impl="peer-pipeline", impl_kind="peer", time_us=150.0),
    ]
    bench_run.add_speedups(rows)
    assert rows[0]["peer"] == "peer-pipeline" and rows[0]["speedup_vs_peer"] == pytest.approx(1.5)
    assert rows[0]["speedups"] == "peer-pipeline=1.5"
    assert rows[2]["peer"] == ""  # a peer is not compared with itself


@pytest.mark.skipif(torch.cuda.is_available(), reason="FlashMLA and DeepGEMM may be present with CUDA")
def test_cli_shows_the_peer_pipeline_missing():
    buf = io.StringIO()
    with redirect_stdout(buf):
        argv = "--op layer_csa,layer_hca --config tiny --mode decode --batch 1 --context 256 --backend torch"
        rc = bench_run.main([*argv.split(), "--no-csv", "--device", "cpu", "--seed", "3"])
    text = buf.getvalue()
    assert rc == 0, text
    assert "bench: peer peer-pipeline: missing" in text
    lines = [ln for ln in text.splitlines() if re.match(r"layer_(csa|hca)\s", ln) and "peer-pipeline" in ln]
    assert len(lines) == 4, text  # two layers x (the reference compressor, our compressor kernel)
    assert all("missing" in ln for ln in lines), lines


# ---------------------------------------------------------------------------------------------
# GPU: the real peers (skipped where they are missing)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_csa", "layer_hca"])
@pytest.mark.parametrize("model", ["flash", "pro"])
def test_peer_pipeline_on_gpu_matches_the_reference(op, model):
    dev = torch.device("cuda")
    bench = bench_run.setup_layer(Case(op, model, "decode", 4, 8192), dev)
    try:
        fn, check = bench.peers["peer-pipeline"]()
    except peers.PeerMissing as e:
        pytest.skip(f"peer missing: {e}")
    out = fn()
    ok, detail = check(out)
    assert ok, detail
    out2 = fn()  # timed calls reuse the per-batch metadata
    assert not torch.isnan(out2[0]).any()


@pytest.mark.gpu
def test_topk_slots_does_not_sync_the_host():
    dev = torch.device("cuda")
    bt = bench_run.make_batch(Case("index_topk", "flash", "decode", 8, 65536), dev)
    logits = bench_run.random_logits(bt)
    peer_layer.topk_slots(logits, bt.meta)  # warm-up
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sel, lens = peer_layer.topk_slots(logits, bt.meta)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert bt.meta.csa is not None and sel.shape == (bt.meta.num_tokens, bt.meta.csa.width)


# ---------------------------------------------------------------------------------------------
# The peers' argument binding and DeepGEMM's context_lens probe, on stand-ins (the GPU tests above run the
# real libraries; these reach the same code paths without them)
# ---------------------------------------------------------------------------------------------


class _Arg:
    def __init__(self, name: str, default: object = "none") -> None:
        self.name, self._default = name, default

    def has_default_value(self) -> bool:
        return self._default != "none"

    @property
    def default_value(self) -> object:
        return self._default


class _FakeFlashMLA:
    """A sparse decode op with FlashMLA's schema names: returns (o, lse, scheduler metadata, splits) and records
    the arguments of each call."""

    def __init__(self) -> None:
        names = ["q", "kv", "indices", "topk_length", "attn_sink", "tile_scheduler_metadata", "num_splits",
                 "extra_kv", "extra_indices", "extra_topk_length", "d_v", "sm_scale"]  # fmt: skip
        self._schema = type("S", (), {"arguments": [_Arg(n) for n in names] + [_Arg("out", None)]})()
        self.calls: list[list] = []

    def __call__(self, *args):
        self.calls.append(list(args))
        return args[0] * 2, args[0].sum(), "sched", "splits"


def test_flashmla_binding_is_shared_and_reuses_the_scheduler(monkeypatch):
    op = _FakeFlashMLA()
    monkeypatch.setitem(peers._state, "flashmla", (op, "schema"))
    q, kv, idx = torch.ones(1, 1, 2, 4), torch.zeros(3), torch.zeros(1, 1, 4)
    lens = torch.tensor([0], dtype=torch.int32)
    run, _ = peers.flashmla_sparse_decode(q, kv, idx, lens, None, None, None, None, 0.5, 4)
    o, _ = run()
    assert torch.equal(o, q * 2)
    first, timed = op.calls[0], op.calls[-1]
    assert first[5] is None and timed[5] == "sched" and timed[6] == "splits"  # metadata from the first call
    assert timed[1] is kv and timed[10] == 4 and timed[11] == 0.5 and timed[12] is None  # by name; default
    # the peer layer's per-call binding goes through the same binder
    op.calls.clear()
    cache = dsv4fn.PagedKVCache.allocate(2, 64)
    attend_fn = peer_layer.flashmla_attend_fn()
    for _ in range(2):
        attend_fn(q, cache, idx, lens, None, None, None, torch.zeros(2), 0.5)
    assert op.calls[0][5] is None and op.calls[1][5] == "sched"
    assert torch.equal(op.calls[1][3], lens.clamp_min(1))  # FlashMLA's lengths are >= 1
    # an argument the schema has and we cannot fill: missing, never guessed
    op._schema.arguments.append(_Arg("mystery"))
    with pytest.raises(peers.PeerMissing, match="mystery"):
        peers.flashmla_binder()
    peers._state.clear()


class _FakeDeepGEMM:
    """sgl-deep-gemm 0.1.4's behaviour: the logits kernel asserts 2-D context_lens, its cleaning pass 1-D ones."""

    def get_paged_mqa_logits_metadata(self, lens, block, sms):
        return ("sched", lens.dim())

    def fp8_paged_mqa_logits(self, q4, kv, w, lens, bt, sched, width, clean):
        if lens.dim() != 2:
            raise AssertionError("context_lens.dim() == 2")
        if clean:
            raise AssertionError("clean: context_lens.dim() == 1")
        return torch.arange(width, dtype=torch.float32).repeat(q4.shape[0], 1)


def test_deepgemm_probe_is_shared_and_cleans_by_mask(monkeypatch):
    dg = _FakeDeepGEMM()
    monkeypatch.setitem(peers._state, "deepgemm", dg)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: type("P", (), {"multi_processor_count": 4}))
    t, width = 3, 8
    q8, w = torch.zeros(t, 2, 4), torch.zeros(t, 2)
    lens = torch.tensor([8, 3, 0], dtype=torch.int32)
    errors: list[str] = []
    assert peers.deepgemm_probe(dg, q8.unsqueeze(1), None, w, lens, None, width, True, errors) is None
    assert len(errors) == 3
    lens_used, sched, _ = peers.deepgemm_probe(dg, q8.unsqueeze(1), torch.zeros(1, 64), w, lens, None, width, False, [])
    assert lens_used.shape == (t, 1) and sched == ("sched", 1)
    expect = torch.arange(width, dtype=torch.float32).repeat(t, 1)
    expect[torch.arange(width).view(1, -1) >= lens.view(-1, 1)] = float("-inf")
    run = peers.deepgemm_paged_logits(q8, torch.zeros(1, 64), w, lens, torch.zeros(t, 1), width, clean=True)
    assert torch.equal(run(), expect)
    peers._state.clear()
