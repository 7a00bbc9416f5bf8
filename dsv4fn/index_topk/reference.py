"""Reference lightning indexer (spec §4): FP8 query prep, paged FP8 logits, top-k with -1 padding."""

import torch
from torch import Tensor

from ..formats import indexer_fp8
from ..norm_rope.reference import apply_rope, hadamard
from ..state import IndexerKeyCache


def prepare_query(
    qi: Tensor, head_weights: Tensor, cos: Tensor, sin: Tensor, weight_scale: float
) -> tuple[Tensor, Tensor]:
    """qi `[t, hi, di]` (bf16), raw head weights fp32 `[t, hi]`, cos/sin `[t, rope/2]`.

    RoPE of the last dims and the Hadamard rotation in fp32 without intermediate rounding, then FP8
    per (token, head) with scale `max(amax, 1e-4)/448`, folded into the weights:
    returns (q8 e4m3 `[t, hi, di]`, w' fp32 `[t, hi]` = head_weights * weight_scale * s_q).
    """
    q = apply_rope(qi.float(), cos.unsqueeze(1), sin.unsqueeze(1))
    q = hadamard(q)
    q8, sq = indexer_fp8.quantize_rows(q)
    return q8, head_weights.float() * weight_scale * sq


def key_slots(page_table: Tensor, token_request: Tensor, n: int, page_size: int) -> Tensor:
    """Cache slots `[t, n]` of logical entries 0..n-1 of each token's request."""
    j = torch.arange(n, device=page_table.device)
    pages = page_table[token_request.long()][:, (j // page_size).clamp_max(page_table.shape[1] - 1)]
    return (pages * page_size + j % page_size).to(torch.int32)


def paged_logits(
    q8: Tensor,
    weights: Tensor,
    cache: IndexerKeyCache,
    page_table: Tensor,
    token_request: Tensor,
    visible: Tensor,
    width: int,
) -> Tensor:
    """fp32 `[t, width]`: `s_k * sum_h w'_h * relu(q8_h . k8_j)` for `j < visible[t]`, -inf elsewhere."""
    t = q8.shape[0]
    slots = key_slots(page_table, token_request, width, cache.page_size)
    col = torch.arange(width, device=q8.device)
    valid = col < visible.view(t, 1)
    k8, sk = indexer_fp8.gather(cache, torch.where(valid, slots, -1))
    dots = torch.einsum("thd,tjd->thj", q8.double(), k8.double())
    logits = (torch.relu(dots) * weights.double().unsqueeze(-1)).sum(dim=1) * sk.double()
    return logits.masked_fill(~valid, float("-inf")).float()


def select_topk(
    logits: Tensor, visible: Tensor, topk: int, width: int, page_table: Tensor, token_request: Tensor, page_size: int
) -> tuple[Tensor, Tensor]:
    """Top-`topk` logical entries per row (all of them, in order, when `visible <= topk`), as cache
    slots int32 `[t, width]` padded with -1, and lengths `min(visible, topk)`. Ties go to the lower
    index (kernels may break ties either way; tests compare sets modulo ties)."""
    t, n = logits.shape
    k = min(topk, n)
    if k > 0:
        # stable sort: among equal logits the lower index wins, so the selection is reproducible
        top = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    else:
        top = torch.zeros(t, 0, dtype=torch.long, device=logits.device)
    col = torch.arange(k, device=logits.device)
    trivial = (visible <= topk).view(t, 1)
    logical = torch.where(trivial, col.view(1, k).expand(t, k), top)
    lens = visible.clamp(max=topk).to(torch.int32)
    logical = torch.where(col.view(1, k) < lens.view(t, 1), logical, -1)
    out = torch.full((t, width), -1, dtype=torch.int32, device=logits.device)
    if k > 0:
        pages = page_table[token_request.long().view(t, 1), (logical.clamp_min(0) // page_size)]
        slots = pages * page_size + logical.clamp_min(0) % page_size
        out[:, :k] = torch.where(logical >= 0, slots, -1).to(torch.int32)
    return out, lens
