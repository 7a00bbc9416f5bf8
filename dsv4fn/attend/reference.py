"""Reference sparse attention over FP8 paged caches (FlashMLA's sparse-decode semantics, spec §6).

For each row b, query s and head h, over the valid gathered keys U (index >= 0 and column < its
length, main and extra lists together):
    S = scale * q . K        lse = log sum_U exp(S)  (natural log, sink not included)
    o = sum_U softmax(S) K,  then  o *= 1 / (1 + exp(sink_h - lse))
An empty U gives o = 0, lse = +inf. K = V = the dequantized record (all d dims).
Math in fp64 so the result does not depend on index widths, order or batch composition.
"""

import torch
from torch import Tensor

from ..formats import model1
from ..state import PagedKVCache


def _gather_valid(cache: PagedKVCache, indices: Tensor, lens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(K fp64 `[b, s_q, k, d]` with invalid rows zeroed, valid mask `[b, s_q, k]`)."""
    k = indices.shape[-1]
    valid = indices >= 0
    if lens is not None:
        col = torch.arange(k, device=indices.device)
        lens_b = lens.view(lens.shape[0], *([1] * (indices.dim() - 2)), 1) if lens.dim() == 1 else lens.unsqueeze(-1)
        valid = valid & (col < lens_b)
    kv = model1.gather(cache, torch.where(valid, indices, -1)).double()
    kv = torch.where(valid.unsqueeze(-1), kv, 0.0)  # NaN in unselected slots never leaks
    return kv, valid


def sparse_attention(
    q: Tensor,
    cache: PagedKVCache,
    indices: Tensor,
    lens: Tensor | None = None,
    *,
    extra_cache: PagedKVCache | None = None,
    extra_indices: Tensor | None = None,
    extra_lens: Tensor | None = None,
    sink: Tensor | None = None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """q bf16 `[b, s_q, h, d]`; indices int32 `[b, s_q, k]`; lens int32 `[b]`.
    Returns (o bf16 `[b, s_q, h, d]`, lse fp32 `[b, h, s_q]`)."""
    kv, valid = _gather_valid(cache, indices, lens)
    if extra_cache is not None and extra_indices is not None:
        kv2, valid2 = _gather_valid(extra_cache, extra_indices, extra_lens)
        kv, valid = torch.cat([kv, kv2], dim=2), torch.cat([valid, valid2], dim=2)
    qd = q.double()
    s = torch.einsum("bshd,bskd->bshk", qd, kv) * scale
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, s_q, h]; -inf when empty
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    o = torch.einsum("bshk,bskd->bshd", p, kv)
    if sink is not None:
        o = o / (1.0 + torch.exp(sink.double().view(1, 1, -1, 1) - lse.unsqueeze(-1)))
    o = torch.where(empty.unsqueeze(-1), 0.0, o)
    lse = torch.where(empty, float("inf"), lse)
    return o.to(torch.bfloat16), lse.permute(0, 2, 1).float().contiguous()
