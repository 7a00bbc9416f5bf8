"""Shape grids of the benchmark: one frozen `Case` per measured shape.

A case names the op, the model preset (`DSV4Config.flash()`, `.pro()`, `.tiny()`), the mode and the
sizes. Modes:
* `decode`: every request adds one token (`s_q = 1`); `batch` requests, each with about `context`
  tokens of history (lengths vary a little per request, up to `context`).
* `mtp`: decode with two query tokens per request (`s_q = 2`, multi-token prediction).
* `prefill`: one request processes a chunk of `chunk` new tokens that ends at position `context`.

Contexts of 1M tokens use one layer's caches only and only the batches whose inputs fit in the
memory budget (`fits`); the rest of the grid is dropped before the run, with a note.
"""

import dataclasses
from collections.abc import Iterable

from dsv4fn import DSV4Config

K = 1024
M = 1024 * 1024

# every op the harness knows, in run order
OPS = (
    "attend",  # sparse attention decode of a CSA layer: window (main) + top-k compressed (extra)
    "attend_hca",  # sparse attention decode of an HCA layer: window + every ratio-128 entry
    "index_logits",  # FP8 paged MQA logits of the lightning indexer
    "topk",  # top-k over given logits
    "index_topk",  # indexer logits + top-k (fused where a backend fuses them)
    "compress",  # one compressor step (ratio 4 with overlap, and ratio 128)
    "norm_rope",  # fused RMS-normalize + RoPE of q (per head, no weight) and of kv (weighted)
    "store_kv",  # FP8 quantize + paged store: MODEL1 attention cache and the indexer key cache
    "layer_csa",  # one whole ratio-4 (CSA) attention layer step
    "layer_hca",  # one whole ratio-128 (HCA) attention layer step
)

# ops whose cost does not depend on the context length: one context is enough
CONTEXT_FREE = ("attend", "compress", "norm_rope", "store_kv")
# ops with a variant axis, and their variants
VARIANTS: dict[str, tuple[str, ...]] = {
    "compress": ("c4", "c128"),
    "norm_rope": ("q", "kv"),
    "store_kv": ("model1", "indexer"),
}
# ops without a prefill measurement (top-k over a chunk is the same kernel as decode rows)
NO_PREFILL = ("topk",)


def model_config(name: str) -> DSV4Config:
    presets = {"flash": DSV4Config.flash, "pro": DSV4Config.pro, "tiny": DSV4Config.tiny}
    key = name.removeprefix("v4-")
    if key not in presets:
        raise ValueError(f"--config: unknown model {name!r}; expected one of {sorted(presets)}")
    return presets[key]()


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """One measured shape. `batch` counts requests; `s_q` query tokens per request (prefill: the chunk)."""

    op: str
    model: str  # "flash" | "pro" | "tiny"
    mode: str  # "decode" | "mtp" | "prefill"
    batch: int
    context: int  # tokens of history of each request after this step (upper bound)
    s_q: int = 1
    variant: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.s_q

    @property
    def config(self) -> DSV4Config:
        return model_config(self.model)

    @property
    def name(self) -> str:
        v = f"/{self.variant}" if self.variant else ""
        return f"{self.op}{v}/{self.model}/{self.mode}/b{self.batch}/ctx{fmt_tokens(self.context)}/sq{self.s_q}"


def fmt_tokens(n: int) -> str:
    if n % M == 0:
        return f"{n // M}M"
    if n % K == 0:
        return f"{n // K}k"
    return str(n)


@dataclasses.dataclass(frozen=True, slots=True)
class Grid:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    mtp_batches: tuple[int, ...]
    mtp_contexts: tuple[int, ...]
    prefill_chunks: tuple[int, ...]
    prefill_contexts: tuple[int, ...]


FULL = Grid(
    batches=(1, 8, 32, 64, 128, 256),
    contexts=(8 * K, 64 * K, 1 * M),
    mtp_batches=(1, 32, 128),
    mtp_contexts=(64 * K,),
    prefill_chunks=(2 * K, 8 * K),
    prefill_contexts=(64 * K,),
)
QUICK = Grid(
    batches=(1, 64),
    contexts=(64 * K,),
    mtp_batches=(32,),
    mtp_contexts=(64 * K,),
    prefill_chunks=(2 * K,),
    prefill_contexts=(8 * K,),
)
# tiny model: positions up to 4096
TINY_FULL = Grid(
    batches=(1, 4, 16), contexts=(256, 2048), mtp_batches=(4,), mtp_contexts=(256,), prefill_chunks=(64,),
    prefill_contexts=(256,),
)  # fmt: skip
TINY_QUICK = Grid(
    batches=(2,), contexts=(256,), mtp_batches=(2,), mtp_contexts=(256,), prefill_chunks=(32,), prefill_contexts=(128,)
)


def cases(
    ops: Iterable[str],
    models: Iterable[str],
    modes: Iterable[str] = ("decode", "mtp", "prefill"),
    *,
    quick: bool = False,
    batches: tuple[int, ...] | None = None,
    contexts: tuple[int, ...] | None = None,
) -> list[Case]:
    """The grid: for each op and model, decode at every (batch, context), MTP and prefill chunks."""
    out: list[Case] = []
    modes = tuple(modes)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--op: unknown op {op!r}; expected one of {OPS}")
        for model in models:
            model_config(model)  # validates the name
            if model == "tiny":
                g = TINY_QUICK if quick else TINY_FULL
            else:
                g = QUICK if quick else FULL
            bs = batches or g.batches
            cs = contexts or g.contexts
            if op in CONTEXT_FREE:
                cs = (max(c for c in cs if c <= 64 * K) if any(c <= 64 * K for c in cs) else min(cs),)
            for variant in VARIANTS.get(op, ("",)):
                if "decode" in modes:
                    out += [Case(op, model, "decode", b, c, 1, variant) for c in cs for b in bs]
                if "mtp" in modes and op not in ("norm_rope", "store_kv", "compress"):
                    mb = batches or g.mtp_batches
                    mc = contexts or g.mtp_contexts
                    out += [Case(op, model, "mtp", b, c, 2, variant) for c in mc for b in mb]
                if "prefill" in modes and op not in NO_PREFILL:
                    out += [Case(op, model, "prefill", 1, c, n, variant) for c in g.prefill_contexts
                            for n in g.prefill_chunks if n <= c]  # fmt: skip
    return out


def input_bytes(case: Case) -> int:
    """Rough device bytes of one case's inputs (caches dominate), to drop what cannot fit."""
    cfg = case.config
    blocks = case.batch * -(-case.context // cfg.block_size)
    c4_page = cfg.compressed_page_size(cfg.csa_ratio)
    c128_page = cfg.compressed_page_size(cfg.hca_ratio)
    token = cfg.nope_dim + 2 * cfg.rope_dim + 8
    c4_cache = blocks * c4_page * token
    c128_cache = blocks * c128_page * token
    keys = blocks * c4_page * (cfg.index_head_dim + 4)
    visible = case.context // cfg.csa_ratio
    logits = case.tokens * max(visible, 64) * 4
    op = case.op
    if op == "attend":
        return c4_cache
    if op == "attend_hca":
        return c128_cache
    if op in ("index_logits", "index_topk"):
        return keys + logits
    if op == "topk":
        return 2 * logits
    if op == "layer_csa":
        return c4_cache + keys + 2 * logits
    if op == "layer_hca":
        return c128_cache
    return 0


def fits(case: Case, budget_bytes: float) -> bool:
    return input_bytes(case) <= budget_bytes
