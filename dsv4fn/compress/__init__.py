"""`compress`: the DSV4 compressor step (spec §3) — pool completed windows, norm, RoPE, store."""

import torch
from jaxtyping import BFloat16, Float32
from torch import Tensor

from .. import _backend
from .._contracts import (
    check_not_donated,
    check_same_device,
    check_tensor,
    contract,
    mark_donated,
    require,
    validate_positions,
    validate_range,
    validating,
)
from .._pytree import pytree_dataclass, static
from ..formats import store_index_keys, store_kv
from ..norm_rope.reference import hadamard
from ..state import DSV4AttnMetadata, IndexerKeyCache, KVAndScore, PagedKVCache
from .reference import compress_reference, pool, window_candidates

_backend.register("compress", "torch")(compress_reference)


@pytree_dataclass
class CompressorParams:
    """One compressor: `wkv`, `wgate` (hidden -> coff·dc), `ape` fp32 `[r, coff·dc]`, RMSNorm `norm`.

    `rotate=True` is the indexer's compressor: entries are Hadamard-rotated and stored as FP8 keys."""

    wkv: BFloat16[Tensor, "cw hidden"]
    wgate: BFloat16[Tensor, "cw hidden"]
    ape: Float32[Tensor, "r cw"]
    norm: Float32[Tensor, " dc"]
    ratio: int = static()
    dim: int = static()
    overlap: bool = static()
    rotate: bool = static()

    def _invariants(self) -> list[str]:
        coff = 2 if self.overlap else 1
        e = []
        if self.wkv.shape[0] != coff * self.dim:
            e.append(f"wkv rows {self.wkv.shape[0]} != coff*dim {coff * self.dim}")
        if self.ape.shape[0] != self.ratio:
            e.append(f"ape rows {self.ape.shape[0]} != ratio {self.ratio}")
        return e

    def empty_state(self, n_slots: int, device: torch.device | str = "cpu") -> KVAndScore:
        return KVAndScore.empty(n_slots, ratio=self.ratio, dim=self.dim, overlap=self.overlap, device=device)


@contract
def compress(
    params: CompressorParams,
    state: KVAndScore,
    x: BFloat16[Tensor, "t hidden"],
    meta: DSV4AttnMetadata,
    cache: PagedKVCache | IndexerKeyCache,
    freqs: Float32[Tensor, " half"],
    *,
    eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[KVAndScore, Tensor, PagedKVCache | IndexerKeyCache]:
    """One compressor step for the batch planned in `meta`.

    Pools every window completed by this step's tokens (prefill chunks of any length from any
    position, decode steps, mixed), RMS-normalizes with `params.norm`, rotates at `j·r`, and stores
    the entries at `meta.stream(r).write_loc`: FP8 MODEL1 records (attention compressor) or
    Hadamard-rotated FP8 keys (indexer compressor). Returns (new state, entries bf16 `[t, dc]` aligned
    with the tokens that complete them — zero rows elsewhere — , new cache). Donates `state`, `cache` (with
    `DSV4FN_VALIDATE=1`, passing either to a step again raises: use the returned ones).
    """
    require(
        isinstance(params, CompressorParams),
        f"params: expected a CompressorParams, got {type(params).__name__}",
        TypeError,
    )
    require(isinstance(state, KVAndScore), f"state: expected a KVAndScore, got {type(state).__name__}", TypeError)
    require(
        isinstance(meta, DSV4AttnMetadata), f"meta: expected a DSV4AttnMetadata, got {type(meta).__name__}", TypeError
    )
    check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(meta.num_tokens, params.wkv.shape[1]))
    t = x.shape[0]
    require(
        state.ratio == params.ratio and state.dim == params.dim and state.overlap == params.overlap,
        f"state: (ratio, dim, overlap)=({state.ratio}, {state.dim}, {state.overlap}) does not match params "
        f"({params.ratio}, {params.dim}, {params.overlap})",
    )
    check_tensor("state.kv", state.kv, dtype=torch.float32, ndim=3, contiguous=True)
    check_tensor("freqs", freqs, dtype=torch.float32, ndim=1)
    stream = meta.stream(params.ratio)
    check_same_device(x=x, kv=state.kv, page_table=meta.page_table)
    if params.rotate:
        require(
            isinstance(cache, IndexerKeyCache), "cache: the indexer compressor writes an IndexerKeyCache", TypeError
        )
    else:
        require(isinstance(cache, PagedKVCache), "cache: the attention compressor writes a PagedKVCache", TypeError)
    checking = validating()
    if checking:
        check_not_donated("compress", {"state": state, "cache": cache})
        validate_range("meta.state_slots", meta.state_slots, 0, state.kv.shape[0])
        validate_positions("meta.prefix_lens", state.kv, meta.state_slots, meta.prefix_lens, meta.extend_lens)
    _, fn = _backend.resolve("compress", backend, x.device)
    new_state, entries, _ = fn(params.wkv, params.wgate, params.ape, params.norm, state, x, meta, freqs, eps)
    assert entries.shape[0] == t
    if params.rotate:
        assert isinstance(cache, IndexerKeyCache)
        new_cache = store_index_keys(cache, hadamard(entries.float()), stream.write_loc, backend=backend)
    else:
        assert isinstance(cache, PagedKVCache)
        new_cache = store_kv(cache, entries, stream.write_loc, backend=backend)
    if checking:
        mark_donated("compress", (state, cache), (new_state, new_cache))
    return new_state, entries, new_cache


__all__ = ["CompressorParams", "compress", "compress_reference", "pool", "window_candidates"]
