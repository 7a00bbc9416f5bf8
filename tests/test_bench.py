"""The benchmark harness on CPU: roofline models checked by hand, the CLI's quick grid writes its CSV."""

import csv
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import configs, roofline
from bench import run as bench_run
from dsv4fn import DSV4Config

FLASH = DSV4Config.flash()


def test_model1_token_bytes_is_584():
    assert roofline.model1_token_bytes(FLASH) == 448 + 128 + 8
    assert roofline.index_key_bytes(FLASH) == 132


def test_attend_model_by_hand():
    # b = 2 requests, s_q = 1, 64 heads × 512; 128 + 512 index columns; 100 + 300 valid pairs in all
    c = roofline.attend(FLASH, q_rows=2, rows=2, pairs=400, width=640)
    q = 2 * 64 * 512 * 2  # bf16 q
    idx = 2 * 640 * 4  # int32 indices, full width
    lens = 2 * 2 * 4  # main + extra lengths
    sink = 64 * 4
    kv = 400 * 584  # one MODEL1 record per valid pair
    out = 2 * 64 * 512 * 2 + 2 * 64 * 4  # o bf16 + lse fp32
    assert c.bytes == q + idx + lens + sink + kv + out == 501_648
    assert c.flops == 4 * 64 * 512 * 400 == 52_428_800


def test_index_logits_model_by_hand():
    # 2 rows, 1000 distinct keys read, 1000 (row, key) dots, a 1024-column fp32 logits buffer
    c = roofline.index_logits(FLASH, tokens=2, keys_read=1000, keys_per_token=1000, width=1024)
    read = 2 * 64 * 128 + 2 * 64 * 4 + 1000 * 132 + math.ceil(1000 / 64) * 4 + 2 * 4
    write = 2 * 1024 * 4
    assert c.bytes == read + write == 157_160
    assert c.flops == 2 * 1000 * 64 * 129
    fused = roofline.index_topk(FLASH, tokens=2, keys_read=1000, keys_per_token=1000)
    assert fused.bytes == read + 2 * (512 + 1) * 4  # the logits stay on chip; slots + lengths written


def test_small_models_by_hand():
    assert roofline.topk(FLASH, tokens=2, width=1024).bytes == 2 * 1024 * 4 + 2 * 4 + 2 * 513 * 4
    assert roofline.store_kv(FLASH, rows=3).bytes == 3 * (512 * 2 + 4) + 3 * 584
    assert roofline.store_index_keys(FLASH, rows=3).bytes == 3 * (128 * 4 + 4) + 3 * 132
    nr = roofline.norm_rope(FLASH, rows=2, dim=512, in_bytes=4, out_bytes=2, weight=True)
    assert nr.bytes == 2 * 512 * 4 + 2 * 2 * 32 * 4 + 512 * 4 + 2 * 512 * 2
    # ratio-128 compressor, one decode token completing one entry that pools 128 carried rows
    c = roofline.compress(FLASH, tokens=1, ratio=128, dim=512, entries=1, rows_read=128)
    read = 4096 * 2 + 2 * 512 * 4096 * 2 + 512 * 4 + 128 * 2 * 512 * 4 + 512 * 4
    assert c.bytes == read + 2 * 512 * 4 + 584
    assert c.flops == 4 * 512 * 4096


def test_layer_weights_flash_csa():
    w = roofline.layer_weights(FLASH, 4)
    mats = 1024 * 4096 + 64 * 512 * 1024 + 512 * 4096 + 1024 * 64 * 512 + 4096 * 8 * 1024
    mats += 2 * 2 * 512 * 4096  # compressor wkv + wgate, coff = 2
    mats += 64 * 128 * 1024 + 64 * 4096 + 2 * 2 * 128 * 4096  # indexer wq_b, weights_proj, its compressor
    assert w.flops == 2 * mats
    assert w.bytes > mats * 2


def test_metrics_roofline():
    m = roofline.metrics(roofline.Cost(3.0e6, 0.0), 1.0, 3.0e12, 800e12)  # 3 MB in 1 µs = 3 TB/s
    assert m["gbps"] == pytest.approx(3000.0)
    assert m["pct_bw"] == pytest.approx(100.0)
    assert m["roofline_us"] == pytest.approx(1.0)
    assert m["pct_roofline"] == pytest.approx(100.0)


def test_grid_shapes():
    full = configs.cases(configs.OPS, ["flash", "pro"])
    names = {c.name for c in full}
    assert "attend/flash/decode/b256/ctx64k/sq1" in names
    assert "index_logits/pro/decode/b1/ctx1M/sq1" in names
    assert "attend/flash/mtp/b32/ctx64k/sq2" in names
    assert any(c.mode == "prefill" and c.s_q == 8192 for c in full)
    assert all(c.batch in (1, 8, 32, 64, 128, 256) for c in full)
    assert len(names) == len(full)
    # 1M contexts: only what fits
    assert not configs.fits(configs.Case("layer_csa", "flash", "decode", 256, 1 << 20), 32e9)
    assert configs.fits(configs.Case("layer_csa", "flash", "decode", 1, 1 << 20), 32e9)
    with pytest.raises(ValueError, match="--op"):
        configs.cases(["nope"], ["flash"])


def test_gpu_slug():
    assert bench_run.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench_run.gpu_slug("NVIDIA H200") == "h200"
    assert bench_run.gpu_slug("cpu-x86_64") == "cpu"


def test_cli_quick_cpu_writes_csv(tmp_path, capsys):
    rc = bench_run.main(
        ["--quick", "--config", "tiny", "--op", "norm_rope,attend,topk", "--backend", "torch", "--mode", "decode",
         "--device", "cpu", "--out", str(tmp_path), "--seed", "1"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "us(L2)" in text and "attend" in text
    path = tmp_path / "cpu" / "results.csv"
    assert path.exists()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert set(bench_run.CSV_COLUMNS) <= set(rows[0])
    ours = [r for r in rows if r["impl"] == "torch"]
    assert {r["op"] for r in ours} == {"norm_rope", "attend", "topk"}
    for r in ours:
        assert r["timer"] == "cpu" and r["status"] == "ok" and r["check"] == "ref"
        assert float(r["time_us"]) > 0 and float(r["bytes"]) > 0
        assert r["gpu"].startswith("cpu") and r["torch"] == torch.__version__ and r["config"] == "tiny"
    peers = {r["impl"]: r for r in rows if r["impl_kind"] == "peer"}
    assert peers["flashmla"]["status"].startswith("missing")  # never faked on CPU
    assert peers["torch.topk"]["status"] == "ok" and peers["torch.topk"]["check"] == "pass"
    topk_torch = next(r for r in ours if r["op"] == "topk")
    assert topk_torch["peer"] == "torch.topk" and float(topk_torch["speedup_vs_peer"]) > 0
    # appending keeps one header
    bench_run.main(["--quick", "--config", "tiny", "--op", "norm_rope", "--backend", "torch", "--mode", "decode",
                    "--device", "cpu", "--out", str(tmp_path), "--peers", "none"])  # fmt: skip
    with open(path) as f:
        lines = f.read().splitlines()
    assert sum(line.startswith("date,") for line in lines) == 1
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize("variant", ["c4", "c128"])
@pytest.mark.parametrize("mode,s_q", [("decode", 1), ("mtp", 2)])
def test_compress_check_passes_for_triton_from_the_random_state(variant, mode, s_q):
    """The harness's random compressor state is canonical (unseen rows = fill), so the Triton step and the
    reference agree on the whole state without the reference having run on it first (an H100 run with
    `--backend triton` only failed this check before)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(3)
    bench = bench_run.setup_compress(configs.Case("compress", "tiny", mode, 9, 4096, s_q=s_q, variant=variant), dev)
    ok, detail = bench.check(bench.make("triton", True)())
    assert ok, detail


def test_tier_cost_measures_every_step_and_restores_the_registry(monkeypatch):
    from bench import tier_cost
    from dsv4fn import _backend, _contracts

    monkeypatch.setattr(tier_cost, "N", 5)
    monkeypatch.setattr(tier_cost, "LOOPS", 1)
    resolve = _backend.resolve
    out = tier_cost.measure()
    assert _backend.resolve is resolve and _contracts.VALIDATE is False
    for label, _ in tier_cost.CASES:
        assert 0 < out[f"{label}:plain"] < out[f"{label}:validate"]  # tier 3 adds work on top of tier 1
