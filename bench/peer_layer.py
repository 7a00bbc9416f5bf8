"""The peer pipeline of one attention layer step: the baseline of issue 7's layer target.

`peer_layer` is `dsv4fn.attention_layer` on its kernel path (fp32 projections, `backend="triton"` for the
raw-KV store) with the parts that public peers cover done by those peers: the same composition
(`dsv4fn.layer.layer_step`) with other step implementations (`peer_steps`). Step by step:

    step (spec §2)                    ours: attention_layer(backend=b)       peer pipeline: peer_layer
    q LoRA, q norm + RoPE             linear_fp32, rms_normalize, norm_rope  same
    raw KV: projection, norm + RoPE   linear_fp32, norm_rope                 same
    raw KV into the window cache      store_kv(backend=b)                    store_kv(backend="triton")
    indexer compressor                compress(backend=b)                    compress(backend="torch")      PEER
    indexer query                     linear_fp32, prepare_query             same
    indexer logits                    index_topk(backend=b): logits + top-k  DeepGEMM fp8_paged_mqa_logits  PEER
    top-k, as cache slots + lengths     (or fused)                           torch.topk + `topk_slots` glue PEER
    attention compressor              compress(backend=b)                    compress(backend="torch")      PEER
    sparse attention with sink        attend(backend=b)                      FlashMLA sparse_decode_fwd     PEER
    inverse RoPE, grouped output      apply_rope, grouped_linear_fp32,       same
    projection                        linear_fp32

The logits and attention pieces are injected (`logits_fn`, `attend_fn`): the bench passes the DeepGEMM
and FlashMLA closures made here (`deepgemm_logits_fn`, `flashmla_attend_fn`; each raises
`peers.PeerMissing` when its library cannot run, and nothing is substituted for it); the CPU tests pass
the torch references (`reference_logits`, `reference_attend`) to test the composition itself.

Per-batch setup that the peers need (DeepGEMM's schedule and block table, FlashMLA's tile-scheduler
metadata) is made once per batch, like our `plan`, and not per call. The torch glue between the peers
(`topk_slots`: logical top-k positions -> cache slots and lengths, FlashMLA's lengths clamped to >= 1)
runs inside every call and is part of the peer row's time.

The reference compressor loops over requests on the host (`.tolist()`): the peer pipeline with it
synchronises the host once per call, so it has no CUDA-graph time (its closure refuses to be captured).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4fn import compress
from dsv4fn.config import DSV4Config
from dsv4fn.index_topk import logits_width
from dsv4fn.index_topk.reference import paged_logits
from dsv4fn.layer import LayerAux, LayerParams, LayerState, LayerSteps, layer_step, layer_steps
from dsv4fn.state import DSV4AttnMetadata, IndexerKeyCache, PagedKVCache

from . import peers

# (q8 e4m3 [t, hi, di], weights fp32 [t, hi], key cache, meta) -> logits fp32 [t, logits_width(meta)],
# -inf past each row's visible entries
LogitsFn = Callable[[Tensor, Tensor, IndexerKeyCache, DSV4AttnMetadata], Tensor]
# (q bf16 [t, 1, h, d], cache, indices int32 [t, 1, k1], lens int32 [t], extra_cache, extra_indices
#  [t, 1, k2], extra_lens [t], sink fp32 [h], scale) -> o bf16 [t, 1, h, d]
AttendFn = Callable[
    [Tensor, PagedKVCache, Tensor, Tensor, PagedKVCache | None, Tensor | None, Tensor | None, Tensor, float], Tensor
]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def topk_slots(logits: Tensor, meta: DSV4AttnMetadata) -> tuple[Tensor, Tensor]:
    """`torch.topk` of k = meta.topk over fp32 logits `[t, n]` (−inf past each row's visible entries), then
    the glue to what `index_topk` returns: (cache slots int32 `[t, csa.width]`, −1 padded; lengths int32
    `[t]` = min(visible, topk)). The same sets as `select_topk` (the order within a row may differ).

    Part of the peer row's time: torch glue the peer pipeline needs to hand FlashMLA cache slots (a real
    pipeline pays it too). No host sync, no value-dependent size."""
    csa = meta.csa
    assert csa is not None
    t, n = logits.shape
    k = min(meta.topk, n)
    # sorted (torch's default): a row with fewer than k visible entries has them first, then −inf columns
    top = torch.topk(logits, k, dim=-1).indices
    lens = csa.visible.clamp(max=meta.topk).to(torch.int32)
    keep = torch.arange(k, device=logits.device).view(1, k) < lens.view(t, 1)
    page = csa.page_size
    pages = meta.page_table[meta.token_request.long().view(t, 1), top // page]
    slots = torch.where(keep, pages * page + top % page, -1).to(torch.int32)
    return F.pad(slots, (0, csa.width - k), value=-1), lens


def peer_steps(
    device: torch.device,
    logits_fn: LogitsFn | None,
    attend_fn: AttendFn,
    backend: str = "triton",
    compress_backend: str = "torch",
) -> LayerSteps:
    """The step implementations of the peer pipeline (the table in the module docstring): `attention_layer`'s
    kernel path on `backend` (fp32 projections, the raw-KV store) with the compressors on `compress_backend`,
    `logits_fn` + `torch.topk` (`topk_slots`) for the top-k and `attend_fn` for the attention."""

    def topk(q8: Tensor, w: Tensor, keys: IndexerKeyCache, meta: DSV4AttnMetadata) -> tuple[Tensor, Tensor]:
        assert logits_fn is not None  # (peer_layer refuses a CSA layer without one)
        return topk_slots(logits_fn(q8, w, keys, meta), meta)

    return dataclasses.replace(
        layer_steps(backend, device),
        compress=lambda cp, st, x, meta, cache, freqs, eps: compress(
            cp, st, x, meta, cache, freqs, eps=eps, backend=compress_backend
        ),
        index_topk=topk,
        attend=attend_fn,
    )


def peer_layer(
    cfg: DSV4Config,
    params: LayerParams,
    state: LayerState,
    x: Tensor,
    meta: DSV4AttnMetadata,
    *,
    logits_fn: LogitsFn | None,
    attend_fn: AttendFn,
    backend: str = "triton",
    compress_backend: str = "torch",
) -> tuple[Tensor, LayerState, LayerAux]:
    """One layer step as `attention_layer` computes it on its kernel path (`dsv4fn.layer.layer_step`, the same
    composition), with the peer-covered parts swapped in (`peer_steps`); `logits_fn` may be None for a layer
    without an indexer. `backend`: the raw-KV store (ours, as in the kernel path); `compress_backend`: both
    compressors ("torch": the reference compressor). Donates `state`."""
    if params.indexer is not None and logits_fn is None:
        raise ValueError("logits_fn: a CSA layer (with an indexer) needs one")
    steps = peer_steps(x.device, logits_fn, attend_fn, backend, compress_backend)
    return layer_step(cfg, params, state, x, meta, steps)


# ---------------------------------------------------------------------------------------------
# Reference pieces (CPU tests: the composition with the torch references in the peers' places)
# ---------------------------------------------------------------------------------------------


def reference_logits(q8: Tensor, w: Tensor, keys: IndexerKeyCache, meta: DSV4AttnMetadata) -> Tensor:
    assert meta.csa is not None
    return paged_logits(q8, w, keys, meta.page_table, meta.token_request, meta.csa.visible, logits_width(meta))


# the reference path's attention step (dsv4fn.attend on backend "torch", o only)
reference_attend: AttendFn = layer_steps("torch", torch.device("cpu")).attend


# ---------------------------------------------------------------------------------------------
# The peers, bound per call (bench/peers.py binds its tensors once; here q, the selection and the caches
# change from call to call)
# ---------------------------------------------------------------------------------------------


def deepgemm_logits_fn(meta: DSV4AttnMetadata) -> LogitsFn:
    """DeepGEMM's `fp8_paged_mqa_logits` for the batch planned in `meta`, as a `LogitsFn`. Made once per batch
    (not timed): the block table (rows are query tokens, next_n = 1: MTP and prefill rows repeat their
    request's row, as SGLang does) and, at the first call (call it first outside the timing), the schedule from
    the visible counts. Raises `PeerMissing`."""
    dg = peers.deep_gemm_module()
    csa = meta.csa
    assert csa is not None
    width = logits_width(meta)
    dev = meta.page_table.device
    block_table = meta.page_table[meta.token_request.long()].contiguous()
    lens_1d = csa.visible.contiguous()
    outside = torch.arange(width, device=dev).view(1, -1) >= lens_1d.view(-1, 1)
    chosen: list[tuple[Tensor, Tensor, bool]] = []  # (context_lens as the call wants them, schedule, clean)

    def finish(lg: Tensor, clean: bool) -> Tensor:
        return lg if clean else lg.masked_fill_(outside, float("-inf"))

    def run(q8: Tensor, w: Tensor, cache: IndexerKeyCache, m: DSV4AttnMetadata) -> Tensor:
        if m is not meta:
            raise ValueError("meta: this logits_fn was made for another batch")
        q4, kv = q8.unsqueeze(1).contiguous(), cache.as_deepgemm()  # [t, next_n = 1, hi, di]; [pages, 64, 1, di + 4]
        w = w.contiguous()
        if chosen:
            lens, sched, clean = chosen[0]
            return finish(dg.fp8_paged_mqa_logits(q4, kv, w, lens, block_table, sched, width, clean), clean)
        # the first call: find the context_lens rank this DeepGEMM wants (peers.deepgemm_probe). sgl-deep-gemm
        # 0.1.4's cleaning pass rejects the 2-D lens its logits kernel wants: then the columns past visible get
        # −inf from one masked_fill per call
        errors: list[str] = []
        for clean in (True, False):
            got = peers.deepgemm_probe(dg, q4, kv, w, lens_1d, block_table, width, clean, errors)
            if got is not None:
                chosen.append((got[0], got[1], clean))
                return finish(got[2], clean)
        raise RuntimeError("DeepGEMM fp8_paged_mqa_logits failed with 1-D and 2-D context_lens: " + " | ".join(errors))

    return run


def flashmla_attend_fn() -> AttendFn:
    """FlashMLA's DSV4 sparse decode (`peers.flashmla_op`), arguments bound by the names in its schema, as an
    `AttendFn`. The first call builds FlashMLA's tile-scheduler metadata and later calls reuse it: make one
    per batch (like our plan) and call it first outside the timing; its lengths must not change between
    calls (in the layer they come from the plan: window lengths and min(visible, topk)). Raises `PeerMissing`."""
    op, bind, _ = peers.flashmla_binder()
    made: dict[str, Any] = {}

    def attend_fn(
        q: Tensor, cache: PagedKVCache, indices: Tensor, lens: Tensor, extra_cache: PagedKVCache | None,
        extra_indices: Tensor | None, extra_lens: Tensor | None, sink: Tensor, scale: float,
    ) -> Tensor:  # fmt: skip
        shapes = (tuple(q.shape), tuple(indices.shape), None if extra_indices is None else tuple(extra_indices.shape))
        if made and made["shapes"] != shapes:
            raise ValueError(f"q/indices: shapes {shapes} differ from this attend_fn's batch {made['shapes']}")
        values: dict[str, Any] = dict(
            q=q,
            k_cache=cache.as_flashmla(),
            indices=indices,
            topk_length=lens.clamp_min(1),  # FlashMLA wants lengths >= 1 (index −1 marks an empty slot)
            attn_sink=sink,
            tile_scheduler_metadata=made.get("sched"),
            num_splits=made.get("splits"),
            extra_k_cache=None if extra_cache is None else extra_cache.as_flashmla(),
            extra_indices=extra_indices,
            extra_topk_length=None if extra_lens is None else extra_lens.clamp_min(1),
            d_v=q.shape[-1],
            sm_scale=scale,
        )
        res = op(*bind(values))
        if not made:
            made["shapes"] = shapes
            if len(res) >= 4 and res[2] is not None:  # the scheduler metadata made by the first call
                made["sched"], made["splits"] = res[2], res[3]
        return res[0]

    return attend_fn
