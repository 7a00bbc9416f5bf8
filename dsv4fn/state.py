"""Typed, frozen state of DSV4 attention: compression carry, paged caches, per-step metadata.

Dimension names used in every contract (jaxtyping):
  b          requests in a batch                  t       query tokens of a step (flattened)
  b1         b + 1 (cumulative offsets)          n_slots compressor-state slots (one per live request)
  rows       coff·r state rows                   width   coff·dc state columns
  n_pages    pages of a cache                    page_bytes bytes of one page
  max_blocks page-table width (shared table)     max_swa  window page-table width
  w_win      window index width (pad(window))    w_c     compressed index width
  h d        query heads, head dim               hi di   indexer heads, indexer head dim

All state is immutable: steps return new objects. Cache-writing steps *donate* their input: the
returned state shares storage with (and supersedes) the one passed in, as with JAX buffer donation.
"""

import torch
from jaxtyping import Float32, Int32, UInt8
from torch import Tensor

from ._pytree import pytree_dataclass, static


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# Compressor carry state
# ---------------------------------------------------------------------------------------------


@pytree_dataclass
class KVAndScore:
    """Per-request partial windows of one compressor (spec §3, "carried state").

    Slot `s` holds fp32 rows: with overlap (coff = 2) rows `0..r-1` are the previous complete window
    and rows `r..2r-1` the unfinished one; without overlap rows `0..r-1` the unfinished window.
    Scores already include `ape`. Rows of positions not yet seen hold (kv 0, score -inf), so the state
    after any split of a sequence into steps is bit-identical to the state after one prefill.
    """

    kv: Float32[Tensor, "n_slots rows width"]
    score: Float32[Tensor, "n_slots rows width"]
    ratio: int = static()
    dim: int = static()  # dc: compressed entry size
    overlap: bool = static()

    @property
    def coff(self) -> int:
        return 2 if self.overlap else 1

    @staticmethod
    def empty(n_slots: int, *, ratio: int, dim: int, overlap: bool, device: torch.device | str = "cpu") -> "KVAndScore":
        coff = 2 if overlap else 1
        shape = (n_slots, coff * ratio, coff * dim)
        return KVAndScore(
            kv=torch.zeros(shape, dtype=torch.float32, device=device),
            score=torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
            ratio=ratio,
            dim=dim,
            overlap=overlap,
        )

    def _invariants(self) -> list[str]:
        e = []
        if self.kv.shape[1] != self.coff * self.ratio:
            e.append(f"rows={self.kv.shape[1]} but coff*ratio={self.coff * self.ratio}")
        if self.kv.shape[2] != self.coff * self.dim:
            e.append(f"width={self.kv.shape[2]} but coff*dim={self.coff * self.dim}")
        return e


# ---------------------------------------------------------------------------------------------
# Paged caches
# ---------------------------------------------------------------------------------------------


@pytree_dataclass
class PagedKVCache:
    """FlashMLA's DSV4 ("MODEL1") FP8 cache; for d = 448 + 64 this is the 584-byte format.

    A page of `page_size` tokens holds `page_size` data records (`nope_dim` e4m3 bytes, then
    `rope_dim` bf16 values) followed by `page_size` scale records (`nope_dim/tile` UE8M0 bytes + pad,
    8 bytes for MODEL1); the page stride is padded up to a multiple of the data record size.
    Slot `loc = page * page_size + offset`.
    """

    data: UInt8[Tensor, "n_pages page_bytes"]
    page_size: int = static()
    nope_dim: int = static()
    rope_dim: int = static()
    tile: int = static()

    @property
    def head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def num_tiles(self) -> int:
        return self.nope_dim // self.tile

    @property
    def record_bytes(self) -> int:
        return self.nope_dim + 2 * self.rope_dim

    @property
    def scale_bytes(self) -> int:
        return _round_up(self.num_tiles + 1, 8)

    @property
    def token_bytes(self) -> int:
        return self.record_bytes + self.scale_bytes

    @property
    def page_bytes(self) -> int:
        return page_bytes_model1(self.page_size, self.nope_dim, self.rope_dim, self.tile)

    @property
    def num_pages(self) -> int:
        return self.data.shape[0]

    @property
    def num_slots(self) -> int:
        return self.data.shape[0] * self.page_size

    @staticmethod
    def allocate(
        num_pages: int,
        page_size: int,
        *,
        nope_dim: int = 448,
        rope_dim: int = 64,
        tile: int = 64,
        device: torch.device | str = "cpu",
    ) -> "PagedKVCache":
        pb = page_bytes_model1(page_size, nope_dim, rope_dim, tile)
        return PagedKVCache(
            data=torch.zeros((num_pages, pb), dtype=torch.uint8, device=device),
            page_size=page_size,
            nope_dim=nope_dim,
            rope_dim=rope_dim,
            tile=tile,
        )

    def as_flashmla(self) -> Tensor:
        """FlashMLA's `k_cache` view `[n_pages, page_size, 1, token_bytes]` (uint8, padded page stride)."""
        return self.data.as_strided(
            (self.num_pages, self.page_size, 1, self.token_bytes),
            (self.data.stride(0), self.token_bytes, self.token_bytes, 1),
        )

    def _invariants(self) -> list[str]:
        if self.data.shape[1] != self.page_bytes:
            return [f"page_bytes={self.data.shape[1]}, layout needs {self.page_bytes}"]
        return []


def page_bytes_model1(page_size: int, nope_dim: int, rope_dim: int, tile: int) -> int:
    record = nope_dim + 2 * rope_dim
    token = record + _round_up(nope_dim // tile + 1, 8)
    return _round_up(page_size * token, record)


@pytree_dataclass
class IndexerKeyCache:
    """DeepGEMM's paged FP8 indexer key cache: per page `page_size × dim` e4m3 bytes, then
    `page_size` fp32 scales (132 bytes per key for dim 128). Slot `loc = page * page_size + offset`."""

    data: UInt8[Tensor, "n_pages page_bytes"]
    page_size: int = static()
    dim: int = static()

    @property
    def num_pages(self) -> int:
        return self.data.shape[0]

    @property
    def num_slots(self) -> int:
        return self.data.shape[0] * self.page_size

    @staticmethod
    def allocate(
        num_pages: int, page_size: int = 64, *, dim: int = 128, device: torch.device | str = "cpu"
    ) -> "IndexerKeyCache":
        return IndexerKeyCache(
            data=torch.zeros((num_pages, page_size * (dim + 4)), dtype=torch.uint8, device=device),
            page_size=page_size,
            dim=dim,
        )

    def as_deepgemm(self) -> Tensor:
        """DeepGEMM's `kv_cache` view `[n_pages, page_size, 1, dim + 4]` (uint8)."""
        return self.data.view(self.num_pages, self.page_size, 1, self.dim + 4)

    def _invariants(self) -> list[str]:
        if self.data.shape[1] != self.page_size * (self.dim + 4):
            return [f"page_bytes={self.data.shape[1]}, layout needs {self.page_size * (self.dim + 4)}"]
        return []


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


@pytree_dataclass
class CompressedStreamMeta:
    """Per-token facts about one compressed stream (ratio `ratio`) for a batch.

    `write_loc[t]`: cache slot of the entry completed by token t (its `L = p+1` is a multiple of
    r), else -1. `visible[t] = L // r`. `lens[t]`: entries attention reads (`min(visible, topk)` for
    the indexed CSA stream, `visible` for HCA). `indices`: for HCA, the cache slots of all visible
    entries (−1 padded to `width`); None for CSA, whose indices come from `index_topk`.
    """

    write_loc: Int32[Tensor, " t"]
    visible: Int32[Tensor, " t"]
    lens: Int32[Tensor, " t"]
    indices: Int32[Tensor, "t w_c"] | None
    ratio: int = static()
    page_size: int = static()
    indexed: bool = static()
    width: int = static()

    @property
    def lens_min1(self) -> Tensor:
        """Lengths clamped to >= 1 (what FlashMLA wants; dsv4fn accepts 0)."""
        return self.lens.clamp_min(1)


@pytree_dataclass
class DSV4AttnMetadata:
    """Everything a step needs for one batch, made by `plan(...)`; shared by all layers."""

    # per request
    prefix_lens: Int32[Tensor, " b"]  # tokens processed before this step
    extend_lens: Int32[Tensor, " b"]  # new tokens of this step
    query_start: Int32[Tensor, " b1"]  # offsets of each request's tokens in the flattened batch
    page_table: Int32[Tensor, "b max_blocks"]  # block_size tokens of address space per entry
    swa_page_table: Int32[Tensor, "b max_swa"]  # window-cache pages (swa_page_size tokens each)
    state_slots: Int32[Tensor, " b"]  # compressor-state slot of each request
    # per token
    token_request: Int32[Tensor, " t"]
    positions: Int32[Tensor, " t"]
    swa_write_loc: Int32[Tensor, " t"]
    window_indices: Int32[Tensor, "t w_win"]  # newest first: positions p, p-1, ...; -1 padded
    window_lens: Int32[Tensor, " t"]  # min(p + 1, window)
    csa: CompressedStreamMeta | None
    hca: CompressedStreamMeta | None
    # static sizes
    block_size: int = static()
    swa_page_size: int = static()
    window: int = static()
    topk: int = static()
    max_seq_len: int = static()
    is_decode: bool = static()  # every request adds exactly one token

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def batch_size(self) -> int:
        return self.prefix_lens.shape[0]

    def stream(self, ratio: int) -> CompressedStreamMeta:
        for s in (self.csa, self.hca):
            if s is not None and s.ratio == ratio:
                return s
        raise ValueError(f"metadata has no compressed stream of ratio {ratio}")

    def _invariants(self) -> list[str]:
        e = []
        if self.query_start.shape[0] != self.prefix_lens.shape[0] + 1:
            e.append("query_start must have b + 1 entries")
        return e
