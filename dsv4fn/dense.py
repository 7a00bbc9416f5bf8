"""Dense evaluation of one DSV4 attention layer over whole sequences: no caches, no state, no plan.

Every key a query may see is computed from the full sequence and masked by the position rules of
spec §2-§4; FP8 storage is simulated by a quantize/dequantize round trip at the points where the
paged pipeline stores FP8. Used by the demo as the final check and by users to check a pipeline.
"""

import torch
from torch import Tensor

from ._linear import linear
from .compress.reference import pool, window_candidates
from .config import DSV4Config
from .formats import indexer_fp8, model1
from .index_topk.reference import prepare_query
from .layer import LayerParams
from .norm_rope.reference import apply_rope, hadamard, norm_rope, rms_normalize, rope_cos_sin


def _fp8_roundtrip(x: Tensor, cfg: DSV4Config) -> Tensor:
    nope, rope, sb = model1.quantize_tokens(x.to(torch.bfloat16), cfg.nope_dim, cfg.quant_tile)
    return model1.dequantize_tokens(nope, rope, sb, cfg.quant_tile)


def _entries(cfg: DSV4Config, x: Tensor, comp, freqs: Tensor) -> Tensor:
    """All compressed entries `[L // r, dc]` of a sequence (bf16, normed and rotated)."""
    r, dc = comp.ratio, comp.dim
    n = x.shape[0] // r
    if n == 0:
        return torch.zeros(0, dc, dtype=torch.bfloat16)
    kv = linear(x[: n * r], comp.wkv)
    sc = linear(x[: n * r], comp.wgate) + comp.ape[torch.arange(n * r) % r]
    if comp.overlap:  # window -1 does not exist: kv 0, score -inf
        kv = torch.cat([torch.zeros(r, kv.shape[1]), kv])
        sc = torch.cat([torch.full((r, sc.shape[1]), float("-inf")), sc])
    ckv, csc = window_candidates(kv, sc, r, dc, comp.overlap)
    cos, sin = rope_cos_sin(freqs, torch.arange(n) * r)
    return norm_rope(pool(ckv, csc), comp.norm, cfg.norm_eps, cos, sin, out_dtype=torch.bfloat16)


def dense_layer(cfg: DSV4Config, params: LayerParams, x: Tensor) -> Tensor:
    """One request's whole sequence x bf16 `[L, hidden]` (positions 0..L-1) -> out bf16 `[L, hidden]`."""
    length, h, d, eps = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.norm_eps
    pos = torch.arange(length)
    cos, sin = rope_cos_sin(params.freqs, pos)
    qr = rms_normalize(linear(x, params.wq_a), params.q_norm, eps).to(torch.bfloat16)
    q = norm_rope(
        linear(qr, params.wq_b).view(length, h, d), None, eps, cos[:, None], sin[:, None], out_dtype=torch.bfloat16
    )
    kv = _fp8_roundtrip(norm_rope(linear(x, params.wkv), params.kv_norm, eps, cos, sin, out_dtype=torch.bfloat16), cfg)
    # keys: raw tokens, then compressed entries; mask[p, k] says whether query p sees key k
    keys = [kv.double()]
    mask = [(pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - cfg.window)]
    r = params.ratio
    if params.compressor is not None:
        ent = _entries(cfg, x, params.compressor, params.freqs)
        n = ent.shape[0]
        j = torch.arange(n)
        visible = j[None, :] < ((pos + 1) // r)[:, None]
        if params.indexer is not None:
            ip = params.indexer
            k_idx = hadamard(_entries(cfg, x, ip.compressor, params.freqs).float())
            k8, sk = indexer_fp8.quantize_rows(k_idx)
            qi = linear(qr, ip.wq_b).view(length, cfg.index_heads, cfg.index_head_dim).to(torch.bfloat16)
            q8, w = prepare_query(qi, linear(x, ip.weights_proj), cos, sin, cfg.index_weight_scale)
            dots = torch.einsum("thd,jd->thj", q8.double(), k8.double())
            logits = (dots.relu() * w.double()[:, :, None]).sum(1) * sk.double()[None, :]
            logits = logits.float().masked_fill(~visible, float("-inf"))
            k = min(cfg.index_topk, n)
            chosen = torch.zeros(length, n, dtype=torch.bool)
            if k > 0:
                top = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]  # ties: lower j
                chosen.scatter_(1, top, True)
            visible = visible & chosen
        keys.append(_fp8_roundtrip(ent, cfg).double())
        mask.append(visible)
    kk, mm = torch.cat(keys), torch.cat(mask, dim=1)
    s = torch.einsum("phd,kd->phk", q.double(), kk) * cfg.softmax_scale
    s = s.masked_fill(~mm[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    o = torch.einsum("phk,kd->phd", torch.exp(s - lse), kk)
    o = (o / (1 + torch.exp(params.sink.double()[None, :, None] - lse))).to(torch.bfloat16)
    o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
    g = cfg.o_groups
    u = torch.einsum("tgk,gok->tgo", o.view(length, g, -1).double(), params.wo_a.double()).float().to(torch.bfloat16)
    return linear(u.flatten(1), params.wo_b).to(torch.bfloat16)
