"""Peer kernels run on the same inputs as ours: FlashMLA's DSV4 sparse decode, DeepGEMM's FP8 paged
MQA logits, and `torch.topk`. Each is optional: a peer that cannot be loaded is reported as
missing (with the reason), never replaced by something else.

* FlashMLA: `torch.ops.load_library(os.environ["DSV4_PEER_FLASHMLA_SO"])` (the library shipped in
  the sglang-kernel wheel) registers ops under `torch.ops.sgl_kernel`; the sparse decode op is found
  at run time by name (`*sparse_decode*`), and its arguments are bound by the names in its schema,
  following FlashMLA's `flash_mla_with_kvcache` contract: q bf16 `[b, s_q, h, d]`; the MODEL1 caches
  as `PagedKVCache.as_flashmla()` views `[pages, P, 1, 584]`; indices int32 `[b, s_q, k]` (k a
  multiple of 64, −1 unused); lengths int32 `[b]` clamped to >= 1; sink fp32 `[h]`; d_v 512.
  The first call builds the tile-scheduler metadata; timed calls reuse it (like our `plan`, it is
  made once per batch, not per layer).
* DeepGEMM: `deep_gemm.get_paged_mqa_logits_metadata(context_lens, 64, num_sms)` first (not timed),
  then `deep_gemm.fp8_paged_mqa_logits(q [t, 1, hi, di] e4m3, IndexerKeyCache.as_deepgemm(),
  weights fp32 [t, hi], context_lens int32 [t], block_table int32 [t, max_blocks], schedule,
  max_context_len)`. Query tokens are rows (next_n = 1): MTP and prefill rows repeat their request's
  block-table row, as SGLang does.
"""

import os
from collections.abc import Callable
from typing import Any

import torch

# "peer-pipeline": a whole layer step with DeepGEMM logits + torch.topk + FlashMLA + the reference
# compressor (bench/peer_layer.py); "+triton-compress": the same with our compressor kernel (the stricter
# baseline: only logits, top-k and attention differ); available when FlashMLA and DeepGEMM both are
PEERS = ("flashmla", "deepgemm", "torch.topk", "deepgemm+torch.topk", "peer-pipeline", "peer-pipeline+triton-compress")
# which peers each op is compared with
OP_PEERS: dict[str, tuple[str, ...]] = {
    "attend": ("flashmla",),
    "attend_hca": ("flashmla",),
    "index_logits": ("deepgemm",),
    "topk": ("torch.topk",),
    "index_topk": ("deepgemm+torch.topk",),
    "layer_csa": ("peer-pipeline", "peer-pipeline+triton-compress"),
    "layer_hca": ("peer-pipeline", "peer-pipeline+triton-compress"),
}

_state: dict[str, Any] = {}


class PeerMissing(RuntimeError):
    """The peer cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# FlashMLA
# ---------------------------------------------------------------------------------------------

# our names -> the names FlashMLA's schemas have used for the same argument
_FLASHMLA_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q",),
    "k_cache": ("kv", "k_cache", "kcache", "kv_cache"),
    "indices": ("indices",),
    "topk_length": ("topk_length",),
    "attn_sink": ("attn_sink",),
    "tile_scheduler_metadata": ("tile_scheduler_metadata",),
    "num_splits": ("num_splits",),
    "extra_k_cache": ("extra_kv", "extra_k_cache", "extra_kcache"),
    "extra_indices": ("extra_indices", "extra_indices_in_kvcache"),
    "extra_topk_length": ("extra_topk_length",),
    "d_v": ("d_v", "head_dim_v", "head_size_v"),
    "sm_scale": ("sm_scale", "softmax_scale"),
}


def flashmla_op() -> tuple[Any, str]:
    """(the sparse decode op overload, its schema string); raises `PeerMissing`."""
    if "flashmla" in _state:
        got = _state["flashmla"]
        if isinstance(got, PeerMissing):
            raise got
        return got
    try:
        if not torch.cuda.is_available():
            raise PeerMissing("needs CUDA")
        so = os.environ.get("DSV4_PEER_FLASHMLA_SO")
        if not so:
            raise PeerMissing("DSV4_PEER_FLASHMLA_SO is not set")
        if not os.path.exists(so):
            raise PeerMissing(f"DSV4_PEER_FLASHMLA_SO={so} does not exist")
        try:
            torch.ops.load_library(so)
        except Exception as e:  # a wrong torch ABI, a missing CUDA library ...
            raise PeerMissing(f"load_library failed: {type(e).__name__}: {e}") from e
        # the namespace object lists nothing until an op is touched: ask the dispatcher
        registered = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                             if n.startswith("sgl_kernel::")})  # fmt: skip
        names = [n for n in registered if "sparse_decode" in n and "shared" not in n and "nvfp4" not in n]
        if not names:
            raise PeerMissing(f"no *sparse_decode* op under torch.ops.sgl_kernel (ops: {registered})")
        ns = torch.ops.sgl_kernel
        name = "sparse_decode_fwd" if "sparse_decode_fwd" in names else sorted(names)[0]
        op = getattr(ns, name).default
        got = (op, f"sgl_kernel::{name}: {op._schema}")
        _state["flashmla"] = got
        return got
    except PeerMissing as e:
        _state["flashmla"] = e
        raise


def flashmla_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    extra_k_cache: torch.Tensor | None,
    extra_indices: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
    sm_scale: float,
    d_v: int = 512,
) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], str]:
    """Returns (a no-argument closure computing (o, lse) with cached scheduler metadata, schema)."""
    op, bind, schema = flashmla_binder()
    values: dict[str, Any] = dict(
        q=q,
        k_cache=k_cache,
        indices=indices,
        topk_length=topk_length,
        attn_sink=attn_sink,
        tile_scheduler_metadata=None,
        num_splits=None,
        extra_k_cache=extra_k_cache,
        extra_indices=extra_indices,
        extra_topk_length=extra_topk_length,
        d_v=d_v,
        sm_scale=sm_scale,
    )
    res = op(*bind(values))
    if len(res) >= 4 and res[2] is not None:  # scheduler metadata made by the first call: reuse it
        values["tile_scheduler_metadata"], values["num_splits"] = res[2], res[3]
    args = bind(values)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        r = op(*args)
        return r[0], r[1]

    return run, schema


def flashmla_binder() -> tuple[Any, Callable[[dict[str, Any]], list[Any]], str]:
    """(the op, bind, schema): `bind(values)` lists the op's arguments in schema order, each taken from
    `values` by our name (`_FLASHMLA_ALIASES`: the names FlashMLA's schemas have used), defaults for the rest.
    Raises `PeerMissing` (also for a schema argument we cannot fill)."""
    op, schema = flashmla_op()
    by_name = {n: ours for ours, names in _FLASHMLA_ALIASES.items() for n in names}
    order: list[tuple[str | None, Any]] = []
    for a in op._schema.arguments:
        if a.name in by_name:
            order.append((by_name[a.name], None))
        elif a.has_default_value():
            order.append((None, a.default_value))
        else:
            raise PeerMissing(f"FlashMLA schema has an argument we cannot fill: {a.name} ({schema})")

    def bind(values: dict[str, Any]) -> list[Any]:
        return [values[k] if k is not None else default for k, default in order]

    return op, bind, schema


# ---------------------------------------------------------------------------------------------
# DeepGEMM
# ---------------------------------------------------------------------------------------------


def deep_gemm_module() -> Any:
    if "deepgemm" in _state:
        got = _state["deepgemm"]
        if isinstance(got, PeerMissing):
            raise got
        return got
    try:
        if not torch.cuda.is_available():
            raise PeerMissing("needs CUDA")
        try:
            import deep_gemm  # type: ignore[import-not-found]
        except Exception as e:
            raise PeerMissing(f"import deep_gemm failed: {type(e).__name__}: {e}") from e
        for fn in ("fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata"):
            if not hasattr(deep_gemm, fn):
                raise PeerMissing(f"deep_gemm has no {fn}")
        _state["deepgemm"] = deep_gemm
        return deep_gemm
    except PeerMissing as e:
        _state["deepgemm"] = e
        raise


def deepgemm_paged_logits(
    q8: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
    *,
    clean: bool = False,
) -> Callable[[], torch.Tensor]:
    """q8 e4m3 `[t, hi, di]` (rows are queries), kv_cache `[pages, 64, 1, di + 4]` uint8, weights fp32
    `[t, hi]`, context_lens int32 `[t]`, block_table int32 `[t, max_blocks]` -> closure giving fp32
    logits `[t, max_context_len]`; columns past a row's context are −inf only with `clean`."""
    dg = deep_gemm_module()
    q4 = q8.unsqueeze(1).contiguous()
    w = weights.contiguous()
    bt = block_table.contiguous()
    errors: list[str] = []
    got = deepgemm_probe(dg, q4, kv_cache, w, context_lens, bt, max_context_len, clean, errors)
    if got is not None:
        call_lens, schedule, _ = got

        def run(lens: torch.Tensor = call_lens, sched: torch.Tensor = schedule) -> torch.Tensor:
            return dg.fp8_paged_mqa_logits(q4, kv_cache, w, lens, bt, sched, max_context_len, clean)

        return run
    if clean:
        # sgl-deep-gemm 0.1.4: the logits kernel wants 2-D context_lens but its cleaning pass asserts
        # 1-D ones; clean with one masked_fill instead (inside the timed closure: the pipeline needs it)
        raw = deepgemm_paged_logits(q8, kv_cache, weights, context_lens, block_table, max_context_len, clean=False)
        cols = torch.arange(max_context_len, device=q8.device)
        outside = cols.view(1, -1) >= context_lens.view(-1, 1)

        def run_clean() -> torch.Tensor:
            return raw().masked_fill_(outside, float("-inf"))

        return run_clean
    raise RuntimeError("DeepGEMM fp8_paged_mqa_logits failed with 1-D and 2-D context_lens: " + " | ".join(errors))


def deepgemm_probe(
    dg: Any,
    q4: torch.Tensor,
    kv_cache: torch.Tensor,
    w: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
    clean: bool,
    errors: list[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The context_lens rank each DeepGEMM call wants differs between versions (sgl-deep-gemm 0.1.4 asserts a
    2-D `[t, next_n = 1]` one in the logits kernel): try the combinations, return (the lens the logits call
    takes, the schedule, the logits of that first call) for the first that runs, or None (the failures are
    appended to `errors`). q4 `[t, 1, hi, di]`; context_lens int32 `[t]`."""
    num_sms = torch.cuda.get_device_properties(q4.device).multi_processor_count
    lens_1d = context_lens.contiguous()
    lens_2d = lens_1d.view(-1, 1)
    for meta_lens, call_lens in ((lens_1d, lens_2d), (lens_2d, lens_2d), (lens_1d, lens_1d)):
        try:
            schedule = dg.get_paged_mqa_logits_metadata(meta_lens, kv_cache.shape[1], num_sms)
            logits = dg.fp8_paged_mqa_logits(q4, kv_cache, w, call_lens, block_table, schedule, max_context_len, clean)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}".splitlines()[0][:160])
            continue
        return call_lens, schedule, logits
    return None


def availability() -> dict[str, str]:
    """Peer name -> "ok" or why it is missing (loads the libraries)."""
    out: dict[str, str] = {"torch.topk": "ok"}
    for name, probe in (("flashmla", flashmla_op), ("deepgemm", deep_gemm_module)):
        try:
            probe()
            out[name] = "ok"
        except PeerMissing as e:
            out[name] = f"missing: {e}"
    out["deepgemm+torch.topk"] = out["deepgemm"]
    missing = [f"{p} {out[p].removeprefix('missing: ')}" for p in ("flashmla", "deepgemm") if out[p] != "ok"]
    out["peer-pipeline"] = "ok" if not missing else "missing: " + "; ".join(missing)
    out["peer-pipeline+triton-compress"] = out["peer-pipeline"]
    return out
