"""`plan(...)`: per-request lengths and page tables -> `DSV4AttnMetadata` (a pure function).

Address spaces (spec §6):
* the shared page table maps a request's block `i` (positions `[i·B, (i+1)·B)`, `B = block_size`) to
  a physical page id `n`; the ratio-r cache page `n` holds that block's `B/r` entries, so entry `j`
  lives at slot `page_table[b, j // (B/r)] · (B/r) + j % (B/r)` (CSA, indexer and HCA caches);
* the window cache has its own page table of `swa_page_size`-token pages: the raw token at position
  `p` lives at `swa_page_table[b, p // P] · P + p % P`. Pages wholly older than the window are never
  read, so a caller may recycle them.

A batch mixes prefill chunks (any `extend_lens[b] >= 1`, starting at any `prefix_lens[b]`) and
decode steps (`extend_lens[b] == 1`). Tokens are flattened request-major.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ._contracts import check_tensor, require, validate_range, validating
from .config import DSV4Config
from .state import CompressedStreamMeta, DSV4AttnMetadata


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _as_int_list(name: str, v: Sequence[int] | Tensor) -> list[int]:
    if isinstance(v, Tensor):
        check_tensor(name, v, ndim=1)
        require(not v.is_floating_point(), f"{name}: expected an integer tensor, got {v.dtype}", TypeError)
        return [int(a) for a in v.tolist()]
    return [int(a) for a in v]


def _slots(table: Tensor, req: Tensor, idx: Tensor, page: int) -> Tensor:
    """Slot of logical position/entry `idx` (any shape, broadcast with `req`), -1 where idx < 0."""
    safe = idx.clamp_min(0)
    col = (safe // page).clamp_max(table.shape[1] - 1)
    slot = table[req, col] * page + safe % page
    return torch.where(idx >= 0, slot, -1).to(torch.int32)


def plan(
    config: DSV4Config,
    prefix_lens: Sequence[int] | Tensor,
    extend_lens: Sequence[int] | Tensor,
    page_table: Tensor,
    swa_page_table: Tensor,
    state_slots: Tensor | None = None,
    *,
    max_seq_len: int | None = None,
) -> DSV4AttnMetadata:
    """Plan one step. `prefix_lens[b]` tokens of request b are already processed, `extend_lens[b]` new
    ones arrive now. `page_table` int32 `[b, max_blocks]`, `swa_page_table` int32 `[b, max_swa]`,
    `state_slots` int32 `[b]` (default `arange(b)`). `max_seq_len` fixes the HCA index width (for
    CUDA graphs); by default the batch's longest sequence decides it. Lengths are host values."""
    prefix = _as_int_list("prefix_lens", prefix_lens)
    extend = _as_int_list("extend_lens", extend_lens)
    nb = len(prefix)
    require(len(extend) == nb, f"extend_lens: expected {nb} entries (one per request), got {len(extend)}")
    require(all(p >= 0 for p in prefix), f"prefix_lens: expected values >= 0, got {prefix}")
    require(all(e >= 1 for e in extend), f"extend_lens: expected values >= 1, got {extend}")
    check_tensor("page_table", page_table, dtype=torch.int32, ndim=2, shape=(nb, None))
    check_tensor("swa_page_table", swa_page_table, dtype=torch.int32, ndim=2, shape=(nb, None))
    dev = page_table.device
    if state_slots is None:
        state_slots = torch.arange(nb, dtype=torch.int32, device=dev)
    check_tensor("state_slots", state_slots, dtype=torch.int32, shape=(nb,))
    seq = [p + e for p, e in zip(prefix, extend, strict=True)]
    longest = max(seq, default=0)
    if max_seq_len is None:
        max_seq_len = longest
    require(longest <= max_seq_len, f"max_seq_len: {max_seq_len} is shorter than the longest sequence {longest}")
    need_blocks = -(-longest // config.block_size)
    require(
        page_table.shape[1] >= need_blocks,
        f"page_table: expected at least {need_blocks} columns for {longest} tokens, got {page_table.shape[1]}",
    )
    need_swa = -(-longest // config.swa_page_size)
    require(
        swa_page_table.shape[1] >= need_swa,
        f"swa_page_table: expected at least {need_swa} columns for {longest} tokens, got {swa_page_table.shape[1]}",
    )
    if validating():
        validate_range("page_table", page_table, 0, 2**31 - 1, allow=-1)
        validate_range("swa_page_table", swa_page_table, 0, 2**31 - 1, allow=-1)

    prefix_t = torch.tensor(prefix, dtype=torch.int32, device=dev)
    extend_t = torch.tensor(extend, dtype=torch.int32, device=dev)
    query_start = torch.tensor([0, *list(torch.tensor(extend).cumsum(0).tolist())], dtype=torch.int32, device=dev)
    req = torch.repeat_interleave(torch.arange(nb, device=dev), extend_t.long())
    positions = (prefix_t.long()[req] + torch.arange(int(sum(extend)), device=dev) - query_start.long()[req]).to(
        torch.int32
    )
    pos = positions.long()
    seq_len = pos + 1

    swa_p = config.swa_page_size
    swa_write = _slots(swa_page_table, req, pos, swa_p)
    ww = config.window_width()
    back = torch.arange(ww, device=dev)
    win_pos = pos.unsqueeze(1) - back.unsqueeze(0)
    win_pos = torch.where(back.unsqueeze(0) < config.window, win_pos, -1)
    window_indices = _slots(swa_page_table, req.unsqueeze(1), win_pos, swa_p)
    window_lens = seq_len.clamp_max(config.window).to(torch.int32)

    def stream(ratio: int, indexed: bool) -> CompressedStreamMeta:
        page = config.compressed_page_size(ratio)
        visible = (seq_len // ratio).to(torch.int32)
        completes = seq_len % ratio == 0
        write = _slots(page_table, req, torch.where(completes, seq_len // ratio - 1, -1), page)
        if indexed:
            return CompressedStreamMeta(
                write_loc=write,
                visible=visible,
                lens=visible.clamp_max(config.index_topk),
                indices=None,
                ratio=ratio,
                page_size=page,
                indexed=True,
                width=config.topk_width(),
            )
        width = max(config.index_pad, _round_up(max_seq_len // ratio, config.index_pad))
        j = torch.arange(width, device=dev).unsqueeze(0)
        idx = _slots(page_table, req.unsqueeze(1), torch.where(j < visible.unsqueeze(1), j, -1), page)
        return CompressedStreamMeta(
            write_loc=write,
            visible=visible,
            lens=visible,
            indices=idx,
            ratio=ratio,
            page_size=page,
            indexed=False,
            width=width,
        )

    ratios = set(config.compress_ratios)
    return DSV4AttnMetadata(
        prefix_lens=prefix_t,
        extend_lens=extend_t,
        query_start=query_start,
        page_table=page_table,
        swa_page_table=swa_page_table,
        state_slots=state_slots,
        token_request=req.to(torch.int32),
        positions=positions,
        swa_write_loc=swa_write,
        window_indices=window_indices,
        window_lens=window_lens,
        csa=stream(config.csa_ratio, True) if config.csa_ratio in ratios else None,
        hca=stream(config.hca_ratio, False) if config.hca_ratio in ratios else None,
        block_size=config.block_size,
        swa_page_size=config.swa_page_size,
        window=config.window,
        topk=config.index_topk,
        max_seq_len=max_seq_len,
        is_decode=all(e == 1 for e in extend),
    )
