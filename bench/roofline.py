"""Explicit byte and FLOP models, one function per op, and the peaks they are measured against.

Every model counts the *ideal* traffic: each input byte the op needs is read from HBM once and each
output byte written once (caches, weights, metadata included; L2 reuse, re-reads by split kernels
and scratch buffers are not). FLOPs count the multiply-adds of the matrix products (2 per MAC) and
ignore element-wise work unless said otherwise. `roofline_us = max(bytes / BW, flops / PEAK)`.

Peaks (`PEAKS`): what a good kernel can reach on the GPU, measured, not the datasheet:
* H100 SXM (80 GB HBM3): 3.0 TB/s is the device-to-device copy rate we measured (the datasheet says
  3.35); 800 TFLOP/s is dense bf16 tensor-core throughput reached by cuBLAS on large GEMMs (the
  datasheet's 989 is not reached in practice).
* H200: not measured by us; 4.3 TB/s assumes the same ~90% copy efficiency of its 4.8 TB/s, and the
  same tensor cores as the H100 (~790 TFLOP/s measured by others on this machine type).
"""

import dataclasses
import math

from dsv4fn import DSV4Config

# (bytes/s, bf16 FLOP/s)
PEAKS: dict[str, tuple[float, float]] = {
    "h100": (3.0e12, 800e12),
    "h200": (4.3e12, 790e12),
}
DEFAULT_PEAK = "h100"

BF16, FP32, I32 = 2, 4, 4


@dataclasses.dataclass(frozen=True, slots=True)
class Cost:
    bytes: float
    flops: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def peak_for(gpu_slug: str) -> tuple[float, float, str]:
    """(bandwidth, flops, key) for a GPU slug; unknown GPUs (and CPU) use the H100 numbers."""
    for key, (bw, fl) in PEAKS.items():
        if key in gpu_slug:
            return bw, fl, key
    bw, fl = PEAKS[DEFAULT_PEAK]
    return bw, fl, DEFAULT_PEAK + "?"


def model1_token_bytes(cfg: DSV4Config) -> int:
    """One MODEL1 token: nope e4m3 bytes + rope bf16 + (tiles + pad) scale bytes (584 for d = 448 + 64)."""
    tiles = cfg.nope_dim // cfg.quant_tile
    return cfg.nope_dim + BF16 * cfg.rope_dim + -(-(tiles + 1) // 8) * 8


def index_key_bytes(cfg: DSV4Config) -> int:
    """One indexer key: `di` e4m3 bytes + an fp32 scale (132 for di = 128)."""
    return cfg.index_head_dim + FP32


def attend(cfg: DSV4Config, q_rows: int, rows: int, pairs: int, width: int) -> Cost:
    """Sparse attention decode: `q_rows` query rows (requests × s_q) of `rows` requests; `pairs`
    valid (query, token) pairs in all, main and extra lists together; `width` index columns per
    query row (main + extra list widths).

    Reads: q bf16 `h·d` per query row; both index lists (int32, full width); the lengths; the sink;
    each valid token's MODEL1 record once per query row that selects it (rows gather independently;
    the s_q queries of a request are counted separately since their lists differ). Writes: o bf16
    and lse fp32. FLOPs: q·Kᵀ and P·V, `2 · 2 · h · d` per valid (query, token) pair."""
    h, d = cfg.num_heads, cfg.head_dim
    read = q_rows * h * d * BF16 + q_rows * width * I32 + 2 * rows * I32 + h * FP32
    read += pairs * model1_token_bytes(cfg)
    write = q_rows * h * d * BF16 + q_rows * h * FP32
    return Cost(read + write, 4.0 * h * d * pairs)


def index_logits(cfg: DSV4Config, tokens: int, keys_read: int, keys_per_token: int, width: int) -> Cost:
    """Indexer logits. `tokens` query rows; `keys_read` distinct keys read in all (one request's keys
    are read once for all of its query rows); `keys_per_token` visible keys summed over rows (the
    dot products); `width` columns of the fp32 logits buffer (written whole, −inf past the visible).

    Reads: q8 `tokens·hi·di` e4m3, head weights fp32, the keys (132 B each), the page table entries
    of the visible pages. Writes: logits `tokens·width` fp32.
    FLOPs: `2·hi·di` per (row, key) for the dot products (+ `2·hi` for weight·relu, included)."""
    hi, di = cfg.index_heads, cfg.index_head_dim
    page = cfg.compressed_page_size(cfg.csa_ratio)
    read = tokens * hi * di + tokens * hi * FP32 + keys_read * index_key_bytes(cfg)
    read += math.ceil(keys_read / page) * I32 + tokens * I32
    write = tokens * width * FP32
    return Cost(read + write, 2.0 * keys_per_token * hi * (di + 1))


def topk(cfg: DSV4Config, tokens: int, width: int) -> Cost:
    """Top-k over fp32 logits `[tokens, width]`: reads the logits and the visible counts; writes the
    slots int32 `[tokens, pad(topk)]` and the lengths. No FLOPs counted (comparisons)."""
    w_out = cfg.topk_width()
    return Cost(tokens * width * FP32 + tokens * I32 + tokens * (w_out + 1) * I32, 0.0)


def index_topk(cfg: DSV4Config, tokens: int, keys_read: int, keys_per_token: int) -> Cost:
    """Fused indexer + top-k, the ideal: the logits never leave the chip. Reads as `index_logits`;
    writes only the selected slots and lengths."""
    logits = index_logits(cfg, tokens, keys_read, keys_per_token, 0)
    return Cost(logits.bytes + tokens * (cfg.topk_width() + 1) * I32, logits.flops)


def compress(cfg: DSV4Config, tokens: int, ratio: int, dim: int, entries: int, rows_read: int) -> Cost:
    """One compressor step over `tokens` new tokens producing `entries` pooled entries.

    Reads: x bf16 `tokens·hidden`; `wkv` and `wgate` bf16 `coff·dc × hidden` (once); the `ape` rows
    of the tokens; `rows_read` carried state rows (kv + score fp32 `coff·dc` each) for the pooling.
    Writes: one state row (kv + score) per token, and per entry its cache record (MODEL1 for
    `dc = d`, an indexer key for `dc = di`). FLOPs: the two projections, `2·2·coff·dc·hidden` per token."""
    coff = 2 if cfg.overlap(ratio) else 1
    hidden = cfg.hidden_size
    width = coff * dim
    read = tokens * hidden * BF16 + 2 * width * hidden * BF16 + tokens * width * FP32
    read += rows_read * 2 * width * FP32 + dim * FP32
    record = model1_token_bytes(cfg) if dim == cfg.head_dim else index_key_bytes(cfg)
    write = tokens * 2 * width * FP32 + entries * record
    return Cost(read + write, 4.0 * tokens * width * hidden)


def norm_rope(cfg: DSV4Config, rows: int, dim: int, in_bytes: int, out_bytes: int, weight: bool) -> Cost:
    """RMS-normalize + RoPE of `rows` vectors of `dim`: reads them (`in_bytes` each element), cos and
    sin fp32 `rope/2` per row (one table row per token; shared by the heads of a token is not assumed),
    the weight; writes them (`out_bytes`). FLOPs: ~4 per element (square, sum, scale, weight) plus 6
    per rotated pair — element-wise, reported for completeness."""
    half = cfg.rope_dim // 2
    read = rows * dim * in_bytes + 2 * rows * half * FP32 + (dim * FP32 if weight else 0)
    return Cost(read + rows * dim * out_bytes, rows * (4.0 * dim + 6.0 * half))


def store_kv(cfg: DSV4Config, rows: int) -> Cost:
    """FP8 quantize + store `rows` bf16 `[d]` vectors into the MODEL1 cache: reads the rows and their
    slots; writes one 584-byte record each. No FLOPs counted."""
    return Cost(rows * (cfg.head_dim * BF16 + I32) + rows * model1_token_bytes(cfg), 0.0)


def store_index_keys(cfg: DSV4Config, rows: int) -> Cost:
    """FP8 quantize + store `rows` fp32 `[di]` keys: reads rows and slots; writes 132 bytes each."""
    return Cost(rows * (cfg.index_head_dim * FP32 + I32) + rows * index_key_bytes(cfg), 0.0)


def layer_weights(cfg: DSV4Config, ratio: int) -> Cost:
    """Bytes of every weight a layer step reads (bf16 projections, fp32 norms/ape/sink), and the
    FLOPs per token of its projections (`2 · params`)."""
    hd, q, hid = cfg.num_heads * cfg.head_dim, cfg.q_lora_rank, cfg.hidden_size
    mats = q * hid + hd * q + cfg.head_dim * hid + cfg.o_lora_rank * hd + hid * cfg.o_groups * cfg.o_lora_rank
    small = (q + cfg.head_dim + cfg.num_heads) * FP32
    if ratio:
        coff = 2 if cfg.overlap(ratio) else 1
        mats += 2 * coff * cfg.head_dim * hid
        small += (ratio * coff * cfg.head_dim + cfg.head_dim) * FP32
    if ratio == cfg.csa_ratio:
        hi_di = cfg.index_heads * cfg.index_head_dim
        mats += hi_di * q + cfg.index_heads * hid + 2 * 2 * cfg.index_head_dim * hid
        small += (ratio * 2 * cfg.index_head_dim + cfg.index_head_dim) * FP32
    return Cost(mats * BF16 + small, 2.0 * mats)


def layer(
    cfg: DSV4Config, ratio: int, rows: int, s_q: int, pairs: int, width: int, keys_read: int, keys_per_token: int,
    entries: int,
) -> Cost:  # fmt: skip
    """One attention layer step for `rows` requests × `s_q` tokens: x in and out (bf16 `hidden`),
    the weights once (`layer_weights`), the projections' FLOPs, the new raw token stored, the
    compressor state rows and `entries` new compressed entries, the indexer (CSA: keys read as in
    `index_topk`), and the attention (`pairs`, `width` as in `attend`). Intermediate activations
    between the steps are not counted (a fully fused layer would not write them)."""
    t = rows * s_q
    w = layer_weights(cfg, ratio)
    cost = Cost(w.bytes + 2 * t * cfg.hidden_size * BF16, w.flops * t)
    cost += Cost(t * model1_token_bytes(cfg), 0.0)  # raw KV stored
    if ratio:
        coff = 2 if cfg.overlap(ratio) else 1
        cost += Cost(t * 2 * coff * cfg.head_dim * FP32 + entries * model1_token_bytes(cfg), 0.0)  # state rows
    if ratio == cfg.csa_ratio:
        cost += Cost(t * 2 * 2 * cfg.index_head_dim * FP32 + entries * index_key_bytes(cfg), 0.0)
        ix = index_topk(cfg, t, keys_read, keys_per_token)
        cost += Cost(ix.bytes - t * cfg.index_heads * (cfg.index_head_dim + FP32), ix.flops)  # q8 made on chip
    att = attend(cfg, t, rows, pairs, width)
    cost += Cost(att.bytes - 2 * t * cfg.num_heads * cfg.head_dim * BF16 - t * cfg.num_heads * FP32, att.flops)
    return cost


def metrics(cost: Cost, time_us: float, bw: float, peak_flops: float) -> dict[str, float]:
    """GB/s, TFLOP/s, % of peak bandwidth, % of peak FLOPs, the roofline time and % of it reached."""
    if not (time_us > 0) or math.isnan(time_us):
        nan = float("nan")
        return dict(gbps=nan, tflops=nan, pct_bw=nan, pct_flops=nan, roofline_us=nan, pct_roofline=nan)
    t = time_us * 1e-6
    roof = max(cost.bytes / bw, cost.flops / peak_flops) * 1e6
    return dict(
        gbps=cost.bytes / t / 1e9,
        tflops=cost.flops / t / 1e12,
        pct_bw=100.0 * cost.bytes / t / bw,
        pct_flops=100.0 * cost.flops / t / peak_flops,
        roofline_us=roof,
        pct_roofline=100.0 * roof / time_us,
    )
