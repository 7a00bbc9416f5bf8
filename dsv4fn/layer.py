"""One DSV4 attention layer composed from the steps, as a pure function of params and state (spec §2)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import BFloat16, Float32
from torch import Tensor

from . import _backend
from ._contracts import check_not_donated, check_tensor, mark_donated, require, validating
from ._linear import grouped_linear_fp32, linear, linear_fp32
from ._pytree import pytree_dataclass, static
from .attend import attend
from .compress import CompressorParams, compress
from .config import DSV4Config
from .formats import store_kv
from .index_topk import index_topk, prepare_query
from .norm_rope import apply_rope, norm_rope, rms_normalize, rope_cos_sin, rope_frequencies
from .state import DSV4AttnMetadata, IndexerKeyCache, KVAndScore, PagedKVCache


@pytree_dataclass
class IndexerParams:
    wq_b: BFloat16[Tensor, "hidx q_lora"]  # q latent -> hi·di
    weights_proj: BFloat16[Tensor, "hi hidden"]
    compressor: CompressorParams  # dc = di, rotate


@pytree_dataclass
class LayerParams:
    wq_a: BFloat16[Tensor, "q_lora hidden"]
    q_norm: Float32[Tensor, " q_lora"]
    wq_b: BFloat16[Tensor, "hd q_lora"]
    wkv: BFloat16[Tensor, "d hidden"]
    kv_norm: Float32[Tensor, " d"]
    sink: Float32[Tensor, " h"]
    wo_a: BFloat16[Tensor, "g o_lora gd"]
    wo_b: BFloat16[Tensor, "hidden go"]
    freqs: Float32[Tensor, " half"]  # the layer's RoPE frequencies
    compressor: CompressorParams | None
    indexer: IndexerParams | None
    ratio: int = static()


@pytree_dataclass
class LayerState:
    """Caches and carries of one layer. Every step donates the state it is given."""

    swa: PagedKVCache
    compressed: PagedKVCache | None
    index_keys: IndexerKeyCache | None
    comp_state: KVAndScore | None
    index_state: KVAndScore | None


@pytree_dataclass
class LayerAux:
    """What a layer step selected, for inspection (top-k hit rates, tests)."""

    csa_indices: Tensor | None
    csa_lens: Tensor | None
    entries: Tensor | None


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _compressor(cfg: DSV4Config, ratio: int, dim: int, rotate: bool, gen: torch.Generator) -> CompressorParams:
    coff = 2 if cfg.overlap(ratio) else 1
    hs = cfg.hidden_size**-0.5
    return CompressorParams(
        wkv=_randn((coff * dim, cfg.hidden_size), hs, gen, torch.bfloat16),
        wgate=_randn((coff * dim, cfg.hidden_size), hs, gen, torch.bfloat16),
        ape=_randn((ratio, coff * dim), 0.5, gen, torch.float32),
        norm=1 + _randn((dim,), 0.1, gen, torch.float32),
        ratio=ratio,
        dim=dim,
        overlap=cfg.overlap(ratio),
        rotate=rotate,
    )


def init_layer_params(cfg: DSV4Config, layer: int, *, seed: int = 0) -> LayerParams:
    """Random weights with unit-variance activations (for tests and the demo)."""
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    r = cfg.compress_ratios[layer]
    h, d, g = cfg.num_heads, cfg.head_dim, cfg.o_groups
    comp = _compressor(cfg, r, d, False, gen) if r > 0 else None
    idx = None
    if r == cfg.csa_ratio:
        idx = IndexerParams(
            wq_b=_randn(
                (cfg.index_heads * cfg.index_head_dim, cfg.q_lora_rank), cfg.q_lora_rank**-0.5, gen, torch.bfloat16
            ),
            weights_proj=_randn((cfg.index_heads, cfg.hidden_size), cfg.hidden_size**-0.5, gen, torch.bfloat16),
            compressor=_compressor(cfg, r, cfg.index_head_dim, True, gen),
        )
    return LayerParams(
        wq_a=_randn((cfg.q_lora_rank, cfg.hidden_size), cfg.hidden_size**-0.5, gen, torch.bfloat16),
        q_norm=1 + _randn((cfg.q_lora_rank,), 0.1, gen, torch.float32),
        wq_b=_randn((h * d, cfg.q_lora_rank), cfg.q_lora_rank**-0.5, gen, torch.bfloat16),
        wkv=_randn((d, cfg.hidden_size), cfg.hidden_size**-0.5, gen, torch.bfloat16),
        kv_norm=1 + _randn((d,), 0.1, gen, torch.float32),
        sink=_randn((h,), 1.0, gen, torch.float32),
        wo_a=_randn((g, cfg.o_lora_rank, h // g * d), (h // g * d) ** -0.5, gen, torch.bfloat16),
        wo_b=_randn((cfg.hidden_size, g * cfg.o_lora_rank), (g * cfg.o_lora_rank) ** -0.5, gen, torch.bfloat16),
        freqs=rope_frequencies(cfg, r),
        compressor=comp,
        indexer=idx,
        ratio=r,
    )


def init_layer_state(
    cfg: DSV4Config, layer: int, *, num_blocks: int, num_swa_pages: int, num_slots: int, device: str = "cpu"
) -> LayerState:
    """Empty caches: `num_blocks` pages of the shared page table, `num_swa_pages` window pages,
    `num_slots` compressor-state slots."""
    r = cfg.compress_ratios[layer]
    kw = dict(nope_dim=cfg.nope_dim, rope_dim=cfg.rope_dim, tile=cfg.quant_tile, device=device)
    swa = PagedKVCache.allocate(num_swa_pages, cfg.swa_page_size, **kw)  # type: ignore[arg-type]
    comp = PagedKVCache.allocate(num_blocks, cfg.compressed_page_size(r), **kw) if r else None  # type: ignore[arg-type]
    keys = idx_state = comp_state = None
    if r:
        comp_state = KVAndScore.empty(num_slots, ratio=r, dim=cfg.head_dim, overlap=cfg.overlap(r), device=device)
    if r == cfg.csa_ratio:
        keys = IndexerKeyCache.allocate(num_blocks, cfg.compressed_page_size(r), dim=cfg.index_head_dim, device=device)
        idx_state = KVAndScore.empty(num_slots, ratio=r, dim=cfg.index_head_dim, overlap=True, device=device)
    return LayerState(swa=swa, compressed=comp, index_keys=keys, comp_state=comp_state, index_state=idx_state)


@dataclasses.dataclass(frozen=True)
class LayerSteps:
    """The implementations one layer step calls, in spec order. `attention_layer` takes them from its `backend`
    (`layer_steps`); `layer_step` composes any set: bench/peer_layer.py puts DeepGEMM, `torch.topk`, FlashMLA and
    the reference compressor in their places, and a kernel under test can take its step's place the same way."""

    linear: Callable[[Tensor, Tensor], Tensor]  # x [..., in] · w [out, in]ᵀ -> fp32 [..., out]
    grouped_linear: Callable[[Tensor, Tensor], Tensor]  # o [t, g, in] · wo_a [g, out, in] -> bf16 [t, g, out]
    store_kv: Callable[[PagedKVCache, Tensor, Tensor], PagedKVCache]  # (cache, kv bf16 [t, d], slots) -> cache
    # (compressor params, state, x, meta, cache, freqs, eps) -> (state, entries, cache), as `compress`
    compress: Callable[..., tuple[Any, Any, Any]]
    # (q8, weights, key cache, meta) -> (cache slots int32 [t, width], lengths int32 [t]), as `index_topk`
    index_topk: Callable[[Tensor, Tensor, IndexerKeyCache, DSV4AttnMetadata], tuple[Tensor, Tensor]]
    # (q [t, 1, h, d], cache, indices, lens, extra_cache, extra_indices, extra_lens, sink, scale) -> o bf16
    attend: Callable[..., Tensor]


def _grouped_linear_fp64(o: Tensor, w: Tensor) -> Tensor:
    return torch.einsum("tgk,gok->tgo", o.double(), w.double()).float().to(torch.bfloat16)


def _grouped_linear_bf16(o: Tensor, w: Tensor) -> Tensor:
    return grouped_linear_fp32(o, w).to(torch.bfloat16)


def layer_steps(backend: str | None, device: torch.device) -> LayerSteps:
    """The steps of `attention_layer(backend=...)`: the reference path projects with batch-invariant fp64 GEMMs
    (chunking invariance is bitwise), kernel paths with fp32 GEMMs; every kernel step takes `backend`."""
    kernel_path = _backend.resolve("attend", backend, device)[0] not in ("torch",) and not (
        backend or _backend.default_backend()
    ).startswith("compare")

    def attend_o(
        q: Tensor, cache: PagedKVCache, indices: Tensor, lens: Tensor, extra_cache: PagedKVCache | None,
        extra_indices: Tensor | None, extra_lens: Tensor | None, sink: Tensor, scale: float,
    ) -> Tensor:  # fmt: skip
        return attend(
            q, cache, indices, lens, extra_cache=extra_cache, extra_indices=extra_indices, extra_lens=extra_lens,
            sink=sink, scale=scale, backend=backend,
        )[0]  # fmt: skip

    return LayerSteps(
        linear=linear_fp32 if kernel_path else linear,
        grouped_linear=_grouped_linear_bf16 if kernel_path else _grouped_linear_fp64,
        store_kv=lambda cache, kv, loc: store_kv(cache, kv, loc, backend=backend),
        compress=lambda cp, st, x, meta, cache, freqs, eps: compress(
            cp, st, x, meta, cache, freqs, eps=eps, backend=backend
        ),
        index_topk=lambda q8, w, keys, meta: index_topk(q8, w, keys, meta, backend=backend),
        attend=attend_o,
    )


def layer_step(
    cfg: DSV4Config, params: LayerParams, state: LayerState, x: Tensor, meta: DSV4AttnMetadata, steps: LayerSteps
) -> tuple[Tensor, LayerState, LayerAux]:
    """The composition of one layer step with the given step implementations (`attention_layer` without its
    argument checks and donation tracking). Order (spec §2): q path; raw KV stored in the window cache; (CSA)
    indexer compressor, indexer query, top-k; attention compressor; sparse attention with sink; inverse RoPE;
    grouped output."""
    t = x.shape[0]
    h, d, eps = cfg.num_heads, cfg.head_dim, cfg.norm_eps
    linear_ = steps.linear
    cos, sin = rope_cos_sin(params.freqs, meta.positions)
    # 1-2. query: q LoRA, per-head weightless RMS-normalize, RoPE
    qr = rms_normalize(linear_(x, params.wq_a), params.q_norm, eps).to(torch.bfloat16)
    q = norm_rope(
        linear_(qr, params.wq_b).view(t, h, d), None, eps, cos.unsqueeze(1), sin.unsqueeze(1), out_dtype=torch.bfloat16
    )
    # 3. raw KV into the window cache
    kv = norm_rope(linear_(x, params.wkv), params.kv_norm, eps, cos, sin, out_dtype=torch.bfloat16)
    swa = steps.store_kv(state.swa, kv, meta.swa_write_loc)
    new = dataclasses.replace(state, swa=swa)
    extra_cache = extra_idx = extra_lens = None
    csa_idx = csa_lens = entries = None
    # 4. indexer (CSA layers): its own compressor, then scores and top-k
    if params.indexer is not None:
        assert state.index_state is not None and state.index_keys is not None
        ip = params.indexer
        idx_state, _, keys = steps.compress(
            ip.compressor, state.index_state, x, meta, state.index_keys, params.freqs, eps
        )
        assert isinstance(keys, IndexerKeyCache)
        new = dataclasses.replace(new, index_state=idx_state, index_keys=keys)
        qi = linear_(qr, ip.wq_b).view(t, cfg.index_heads, cfg.index_head_dim).to(torch.bfloat16)
        w_raw = linear_(x, ip.weights_proj)
        q8, w = prepare_query(qi, w_raw, cos, sin, cfg.index_weight_scale)
        csa_idx, csa_lens = steps.index_topk(q8, w, keys, meta)
    # 5. attention compressor
    if params.compressor is not None:
        assert state.comp_state is not None and state.compressed is not None
        comp_state, entries, comp = steps.compress(
            params.compressor, state.comp_state, x, meta, state.compressed, params.freqs, eps
        )
        assert isinstance(comp, PagedKVCache)
        new = dataclasses.replace(new, comp_state=comp_state, compressed=comp)
        extra_cache = comp
        stream = meta.stream(params.ratio)
        if stream.indexed:
            extra_idx, extra_lens = csa_idx, csa_lens
        else:
            extra_idx, extra_lens = stream.indices, stream.lens
    # 6. sparse attention (window = main cache, compressed = extra cache)
    o = steps.attend(
        q.view(t, 1, h, d), swa, meta.window_indices.view(t, 1, -1), meta.window_lens, extra_cache,
        None if extra_idx is None else extra_idx.view(t, 1, -1), extra_lens, params.sink, cfg.softmax_scale,
    )  # fmt: skip
    # 7-8. inverse RoPE, grouped output projection
    o = apply_rope(o.view(t, h, d), cos.unsqueeze(1), sin.unsqueeze(1), inverse=True)
    u = steps.grouped_linear(o.view(t, cfg.o_groups, -1), params.wo_a)
    out = linear_(u.flatten(1), params.wo_b).to(torch.bfloat16)
    return out, new, LayerAux(csa_indices=csa_idx, csa_lens=csa_lens, entries=entries)


def attention_layer(
    cfg: DSV4Config,
    params: LayerParams,
    state: LayerState,
    x: Tensor,
    meta: DSV4AttnMetadata,
    *,
    backend: str | None = None,
) -> tuple[Tensor, LayerState, LayerAux]:
    """x bf16 `[t, hidden]` (already `attn_norm`-ed) -> (out bf16 `[t, hidden]`, new state, aux).

    Order (spec §2): q path; raw KV stored in the window cache; (CSA) indexer compressor, indexer
    query, top-k; attention compressor; sparse attention with sink; inverse RoPE; grouped output.
    Donates `state` and the caches and compressor states in it: with `DSV4FN_VALIDATE=1`, passing that
    `LayerState` (or one of those fields) to a step again raises — use the returned state."""
    require(isinstance(cfg, DSV4Config), f"cfg: expected a DSV4Config, got {type(cfg).__name__}", TypeError)
    require(isinstance(params, LayerParams), f"params: expected a LayerParams, got {type(params).__name__}", TypeError)
    require(isinstance(state, LayerState), f"state: expected a LayerState, got {type(state).__name__}", TypeError)
    require(
        isinstance(meta, DSV4AttnMetadata), f"meta: expected a DSV4AttnMetadata, got {type(meta).__name__}", TypeError
    )
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(meta.num_tokens, cfg.hidden_size))
    if params.indexer is not None:
        require(
            state.index_state is not None and state.index_keys is not None,
            "state: a CSA layer (params.indexer set) needs state.index_state and state.index_keys",
        )
    if params.compressor is not None:
        require(
            state.comp_state is not None and state.compressed is not None,
            f"state: a compressed layer (ratio {params.ratio}) needs state.comp_state and state.compressed",
        )
    donated: dict[str, object] | None = None
    if validating():
        # the state and the fields this layer's steps donate (and replace in the returned state), checked
        # before any step writes
        donated = {"state": state, "state.swa": state.swa}
        if params.indexer is not None:
            donated |= {"state.index_state": state.index_state, "state.index_keys": state.index_keys}
        if params.compressor is not None:
            donated |= {"state.comp_state": state.comp_state, "state.compressed": state.compressed}
        check_not_donated("attention_layer", donated)
    out, new, aux = layer_step(cfg, params, state, x, meta, layer_steps(backend, x.device))
    if donated is not None:
        fresh = (new, new.swa, new.compressed, new.index_keys, new.comp_state, new.index_state)
        mark_donated("attention_layer", tuple(donated.values()), fresh)
    return out, new, aux
