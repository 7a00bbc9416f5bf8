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

import operator
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Int32, Integer
from torch import Tensor

from ._contracts import check_same_device, check_tensor, contract, require, validate_range, validating
from .config import DSV4Config
from .state import CompressedStreamMeta, DSV4AttnMetadata

_INT32_MAX = 2**31 - 1


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _as_int_list(name: str, v: object) -> list[int]:
    """Host lengths: a 1-D integer tensor (read back: a device sync for CUDA tensors), numpy array or a
    sequence of ints (bools and floats are refused: `int(2.7)` would silently plan 2 tokens)."""
    if isinstance(v, Tensor | np.ndarray):
        if v.ndim != 1:
            raise ValueError(f"{name}: expected rank 1, got rank {v.ndim} (shape {tuple(v.shape)})")
        if isinstance(v, Tensor):
            not_int = v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool
        else:
            not_int = v.dtype.kind not in "iu"
        if not_int:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {str(v.dtype).replace('torch.', '')}")
        return [int(a) for a in v.tolist()]
    if isinstance(v, str | bytes) or not isinstance(v, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints or a 1-D integer tensor, got {type(v).__name__}")
    out = []
    for i, a in enumerate(v):
        if isinstance(a, bool | np.bool_):
            raise TypeError(f"{name}[{i}]: expected an int, got bool")
        try:
            out.append(operator.index(a))
        except TypeError:
            raise TypeError(f"{name}[{i}]: expected an int, got {type(a).__name__} {a!r}") from None
    return out


def _check_config(config: object) -> DSV4Config:
    """The config's sizes plan divides by or pads with: ints >= 1 (`DSV4Config` checks the rest)."""
    require(isinstance(config, DSV4Config), f"config: expected a DSV4Config, got {type(config).__name__}", TypeError)
    assert isinstance(config, DSV4Config)
    for field in ("block_size", "swa_page_size", "window", "index_topk", "index_pad", "csa_ratio", "hca_ratio"):
        v = getattr(config, field)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"config.{field}: expected an int, got {type(v).__name__} {v!r}")
        if v < 1:
            raise ValueError(f"config.{field}: expected a value >= 1, got {v}")
    return config


def _slots(table: Tensor, req: Tensor, idx: Tensor, page: int) -> Tensor:
    """Slot of logical position/entry `idx` (any shape, broadcast with `req`), -1 where idx < 0."""
    safe = idx.clamp_min(0)
    col = (safe // page).clamp_max(table.shape[1] - 1)
    slot = table[req, col] * page + safe % page
    return torch.where(idx >= 0, slot, -1).to(torch.int32)


def _validate_table(name: str, table: Tensor, page: int, span: int, lo: list[int], hi: list[int], what: str) -> None:
    """Tier 3: entries are −1 or page ids whose slots (`id · page + offset`) fit in int32, and the columns
    `[lo[b], hi[b])` that request b's step reads or writes are mapped (not −1: a −1 entry there would
    silently turn into a negative slot, or into −1 and skip the store). A column covers `span` positions."""
    try:
        validate_range(name, table, 0, (_INT32_MAX + 1) // page, allow=-1)
    except ValueError as e:
        raise ValueError(f"{e}: a slot (page id · {page} + offset) must fit in int32") from None
    if table.numel() == 0:
        return
    cols = torch.arange(table.shape[1], device=table.device)
    lo_t = torch.tensor(lo, dtype=torch.long, device=table.device).unsqueeze(1)
    hi_t = torch.tensor(hi, dtype=torch.long, device=table.device).unsqueeze(1)
    unmapped = (cols >= lo_t) & (cols < hi_t) & (table < 0)
    if bool(unmapped.any()):
        b, c = unmapped.nonzero()[0].tolist()
        raise ValueError(
            f"{name}: entry [{b}, {c}] is -1, but request {b}'s step {what} on that page (positions "
            f"{c * span}..{(c + 1) * span - 1}): map every page a step uses"
        )


def _validate_distinct_writes(name: str, loc: Tensor, req: Tensor, pos: Tensor, cache: str) -> None:
    """Tier 3: no two tokens of a step store into the same cache slot (two requests sharing a page they
    write, or two entries of one request's table mapping the same page): one store would silently lose."""
    written = loc[loc >= 0]
    if written.numel() < 2:
        return
    srt, order = written.sort(stable=True)
    dup = srt[1:] == srt[:-1]
    if bool(dup.any()):
        i = int(dup.nonzero()[0, 0])
        tokens = (loc >= 0).nonzero().squeeze(1)[order[i : i + 2]].tolist()
        (r0, r1), (p0, p1) = req[tokens].tolist(), pos[tokens].tolist()
        raise ValueError(
            f"{name}: tokens {tokens[0]} and {tokens[1]} (request {r0} position {p0}, request {r1} position {p1}) "
            f"both store into {cache} slot {int(srt[i])}: the pages a step writes must be distinct"
        )


@contract
def plan(
    config: DSV4Config,
    prefix_lens: Sequence[int] | Integer[Tensor, " b"] | Integer[np.ndarray, " b"],
    extend_lens: Sequence[int] | Integer[Tensor, " b"] | Integer[np.ndarray, " b"],
    page_table: Int32[Tensor, "b max_blocks"],
    swa_page_table: Int32[Tensor, "b max_swa"],
    state_slots: Int32[Tensor, " b"] | None = None,
    *,
    max_seq_len: int | None = None,
) -> DSV4AttnMetadata:
    """Plan one step. `prefix_lens[b]` tokens of request b are already processed, `extend_lens[b]` new
    ones arrive now. `page_table` int32 `[b, max_blocks]`, `swa_page_table` int32 `[b, max_swa]`,
    `state_slots` int32 `[b]` (default `arange(b)`). `max_seq_len` fixes the HCA index width (for
    CUDA graphs); by default the batch's longest sequence decides it. Lengths are host values.

    Checks: tier 1 (always) every argument's type, dtype, rank, shape and device, the config's sizes,
    lengths (prefix >= 0, extend >= 1, positions within int32), `max_seq_len` and the page tables' widths;
    tier 3 (`DSV4FN_VALIDATE=1`) the page tables' entries (−1 or a page id whose slots fit in int32; every
    page a step reads or writes mapped), state slots (>= 0, distinct) and that no two tokens store into
    one cache slot. `plan` does not know the pools' sizes: `store_kv`, `attend`, `index_topk` and
    `compress` check the derived slots against their caches."""
    config = _check_config(config)
    prefix = _as_int_list("prefix_lens", prefix_lens)
    extend = _as_int_list("extend_lens", extend_lens)
    nb = len(prefix)
    require(len(extend) == nb, f"extend_lens: expected {nb} entries (one per request), got {len(extend)}")
    require(all(p >= 0 for p in prefix), f"prefix_lens: expected values >= 0, got {prefix}")
    require(all(e >= 1 for e in extend), f"extend_lens: expected values >= 1, got {extend}")
    seq = [p + e for p, e in zip(prefix, extend, strict=True)]
    longest = max(seq, default=0)
    require(
        longest <= _INT32_MAX,
        f"prefix_lens + extend_lens: request {seq.index(longest) if seq else 0} ends at {longest} tokens, "
        f"past the int32 positions (at most {_INT32_MAX})",
    )
    check_tensor("page_table", page_table, dtype=torch.int32, ndim=2, shape=(nb, None))
    check_tensor("swa_page_table", swa_page_table, dtype=torch.int32, ndim=2, shape=(nb, None))
    dev = page_table.device
    if state_slots is None:
        state_slots = torch.arange(nb, dtype=torch.int32, device=dev)
    check_tensor("state_slots", state_slots, dtype=torch.int32, shape=(nb,))
    check_same_device(page_table=page_table, swa_page_table=swa_page_table, state_slots=state_slots)
    if max_seq_len is None:
        max_seq_len = longest
    elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int | np.integer):
        raise TypeError(f"max_seq_len: expected an int or None, got {type(max_seq_len).__name__} {max_seq_len!r}")
    max_seq_len = int(max_seq_len)
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
    checking = validating()
    if checking:
        active = sorted({r for r in config.compress_ratios if r in (config.csa_ratio, config.hca_ratio)})
        swa_p = config.swa_page_size
        lo = [max(0, p - config.window + 1) // swa_p for p in prefix]
        hi = [-(-n // swa_p) for n in seq]
        _validate_table("swa_page_table", swa_page_table, swa_p, swa_p, lo, hi, "reads or writes the window")
        # entries visible after the step (all read by HCA attention / the CSA indexer) and the ones it writes
        c_hi = [max((-(-(n // r) // config.compressed_page_size(r)) for r in active), default=0) for n in seq]
        c_page = max((config.compressed_page_size(r) for r in active), default=1)
        _validate_table(
            "page_table", page_table, c_page, config.block_size, [0] * nb, c_hi, "reads or writes compressed entries"
        )
        validate_range("state_slots", state_slots, 0, _INT32_MAX)
        if nb > 1 and state_slots.unique().numel() != nb:
            s = state_slots.tolist()
            dup = next(x for x in s if s.count(x) > 1)
            raise ValueError(f"state_slots: slot {dup} is given to more than one request (requests share no slot)")

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
    meta = DSV4AttnMetadata(
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
    if checking:
        _validate_distinct_writes("swa_page_table", swa_write, req, pos, "window-cache")
        for st in (meta.csa, meta.hca):
            if st is not None:
                _validate_distinct_writes("page_table", st.write_loc, req, pos, f"ratio-{st.ratio} cache")
    return meta
