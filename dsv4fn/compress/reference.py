"""Reference compressor (spec §3): softmax-gated pooling of ratio-r windows with carried state.

One pooling routine serves prefill chunks and decode steps alike, and it reduces over candidates in
a fixed sequential order, so any split of a sequence into steps gives bit-identical entries and
state (the chunking invariant).
"""

import torch
from torch import Tensor

from .._linear import linear
from ..norm_rope.reference import norm_rope, rope_cos_sin
from ..state import DSV4AttnMetadata, KVAndScore


def pool(kv: Tensor, score: Tensor) -> Tensor:
    """Per-channel softmax over candidates: kv, score fp32 `[n, C, dc]` -> fp32 `[n, dc]`.

    Sequential over C (elementwise ops only) so the result of a window never depends on n."""
    m = score[:, 0]
    for c in range(1, score.shape[1]):
        m = torch.maximum(m, score[:, c])
    den = torch.zeros_like(m)
    num = torch.zeros_like(m)
    for c in range(score.shape[1]):
        e = torch.exp(score[:, c] - m)
        den = den + e
        num = num + e * kv[:, c]
    return num / den


def window_candidates(kv: Tensor, score: Tensor, ratio: int, dim: int, overlap: bool) -> tuple[Tensor, Tensor]:
    """Rows of consecutive windows `[n_rows, coff*dc]` (n_rows a multiple of r; with overlap the first
    window is only the overlap source) -> candidates `[n_entries, coff*r, dc]` in the order
    (prev window `a` halves, this window `b` halves)."""
    w = kv.shape[0] // ratio
    kv, score = kv.view(w, ratio, -1), score.view(w, ratio, -1)
    if not overlap:
        return kv, score
    ckv = torch.cat([kv[:-1, :, :dim], kv[1:, :, dim:]], dim=1)
    csc = torch.cat([score[:-1, :, :dim], score[1:, :, dim:]], dim=1)
    return ckv, csc


def compress_reference(
    wkv: Tensor,
    wgate: Tensor,
    ape: Tensor,
    norm_weight: Tensor,
    state: KVAndScore,
    x: Tensor,
    meta: DSV4AttnMetadata,
    freqs: Tensor,
    eps: float,
) -> tuple[KVAndScore, Tensor, Tensor]:
    """Returns (new state, entries bf16 `[t, dc]` aligned with tokens, has_entry bool `[t]`).

    Row t of `entries` holds the entry completed by token t (zeros where it completes none). The
    entries are pooled, RMS-normalized with `norm_weight` and rotated at position `j·r` (fp32, one
    rounding to bf16). The state is updated in place (donated) and returned.
    """
    r, dc, overlap = state.ratio, state.dim, state.overlap
    coff = state.coff
    t_total = x.shape[0]
    entries = torch.zeros(t_total, dc, dtype=torch.float32, device=x.device)
    has_entry = torch.zeros(t_total, dtype=torch.bool, device=x.device)
    entry_pos = torch.zeros(t_total, dtype=torch.int32, device=x.device)
    kv_all = linear(x, wkv)  # [t, coff*dc]
    sc_all = linear(x, wgate)
    prefix = meta.prefix_lens.tolist()
    extend = meta.extend_lens.tolist()
    starts = meta.query_start.tolist()
    slots = meta.state_slots.tolist()
    fill_kv = torch.zeros(1, coff * dc, dtype=torch.float32, device=x.device)
    fill_sc = torch.full((1, coff * dc), float("-inf"), dtype=torch.float32, device=x.device)
    for b in range(len(prefix)):
        p0, e, q0, s = prefix[b], extend[b], starts[b], slots[b]
        if e == 0:
            continue
        pos = torch.arange(p0, p0 + e, device=x.device)
        kv_new = kv_all[q0 : q0 + e]
        sc_new = sc_all[q0 : q0 + e] + ape[pos % r]
        # rows of positions [base, p0) from the state; fresh requests start from the fill rows
        part = p0 % r
        base_rows = (r if overlap else 0) + part
        if p0 == 0:
            pre_kv, pre_sc = fill_kv.expand(base_rows, -1), fill_sc.expand(base_rows, -1)
        else:
            pre_kv, pre_sc = state.kv[s, :base_rows], state.score[s, :base_rows]
        end = p0 + e
        tail = (-end) % r
        buf_kv = torch.cat([pre_kv, kv_new, fill_kv.expand(tail, -1)])
        buf_sc = torch.cat([pre_sc, sc_new, fill_sc.expand(tail, -1)])
        first_w = p0 // r  # absolute window index of the first row after the overlap window
        n_complete = end // r - first_w
        if n_complete > 0:
            lead = r if overlap else 0
            rows = lead + n_complete * r
            ckv, csc = window_candidates(buf_kv[:rows], buf_sc[:rows], r, dc, overlap)
            pooled = pool(ckv, csc)  # [n_complete, dc]
            j = torch.arange(first_w, first_w + n_complete, device=x.device)
            tok = q0 + (j * r + r - 1 - p0)
            entries[tok] = pooled
            has_entry[tok] = True
            entry_pos[tok] = (j * r).to(torch.int32)
        # new state: [previous complete window (overlap)] + [rows of the unfinished window]
        cur0 = (end // r) * r  # first position of the unfinished window
        lead = r if overlap else 0
        buf_base = first_w * r - lead  # position of buffer row 0
        new_kv = torch.cat([fill_kv.expand(lead, -1), fill_kv.expand(r, -1)]).clone()
        new_sc = torch.cat([fill_sc.expand(lead, -1), fill_sc.expand(r, -1)]).clone()
        if overlap and cur0 - r >= 0:
            a = cur0 - r - buf_base
            new_kv[:r], new_sc[:r] = buf_kv[a : a + r], buf_sc[a : a + r]
        n_part = end - cur0
        if n_part:
            a = cur0 - buf_base
            new_kv[lead : lead + n_part] = buf_kv[a : a + n_part]
            new_sc[lead : lead + n_part] = buf_sc[a : a + n_part]
        state.kv[s] = new_kv
        state.score[s] = new_sc
    cos, sin = rope_cos_sin(freqs, entry_pos)
    out = norm_rope(entries, norm_weight, eps, cos, sin, out_dtype=torch.bfloat16)
    out = torch.where(has_entry.unsqueeze(-1), out, torch.zeros_like(out))
    new_state = KVAndScore(kv=state.kv, score=state.score, ratio=r, dim=dc, overlap=overlap)
    return new_state, out, has_entry
