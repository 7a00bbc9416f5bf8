"""The demo: a few tiny DSV4 attention layers on CPU, chunked prefill then decode, checked densely.

    python -m dsv4fn demo [--backend torch] [--seed 0]

Requests of different lengths arrive together; each step gives every unfinished request a prefill
chunk (up to `--chunk` tokens) or one decode token, so steps mix prefill and decode. The layers are
chained with residuals. At the end the final hidden state of every token is compared with a dense
evaluation of the same layers over whole sequences (no caches, no plan, no state).
"""

import argparse
import time

import torch

from .config import DSV4Config
from .dense import dense_layer
from .layer import attention_layer, init_layer_params, init_layer_state
from .norm_rope import rms_normalize
from .plan import plan


def _pages(n_req: int, per_req: int, gen: torch.Generator) -> torch.Tensor:
    """A random page table: request b gets `per_req` distinct pages of a shuffled pool."""
    return torch.randperm(n_req * per_req, generator=gen).to(torch.int32).view(n_req, per_req)


def run_demo(
    prompts: tuple[int, ...] = (37, 80, 150, 9),
    decode_steps: int = 6,
    chunk: int = 32,
    seed: int = 0,
    backend: str | None = None,
    config: DSV4Config | None = None,
    verbose: bool = True,
) -> float:
    """Runs the demo; returns the worst relative RMS error against the dense evaluation."""
    cfg = config or DSV4Config.tiny()
    say = print if verbose else (lambda *a, **k: None)
    gen = torch.Generator().manual_seed(seed)
    n_req = len(prompts)
    total = [p + decode_steps for p in prompts]
    max_len = max(total)
    blocks = -(-max_len // cfg.block_size)
    swa_pages = -(-max_len // cfg.swa_page_size)
    page_table = _pages(n_req, blocks, gen)
    swa_table = _pages(n_req, swa_pages, gen)
    params = [init_layer_params(cfg, i, seed=seed) for i in range(cfg.num_layers)]
    states = [
        init_layer_state(cfg, i, num_blocks=n_req * blocks, num_swa_pages=n_req * swa_pages, num_slots=n_req)
        for i in range(cfg.num_layers)
    ]
    seqs = [torch.randn(n, cfg.hidden_size, generator=gen).to(torch.bfloat16) for n in total]
    outs = [torch.full((n, cfg.hidden_size), float("nan"), dtype=torch.bfloat16) for n in total]
    say(
        f"dsv4fn demo: config {cfg.name}, layers ratios {cfg.compress_ratios}, {n_req} requests, prompts {prompts}, "
        f"{decode_steps} decode steps, prefill chunk {chunk}, backend {backend or 'default'}"
    )
    done = [0] * n_req
    step = 0
    while any(d < t for d, t in zip(done, total, strict=True)):
        live = [b for b in range(n_req) if done[b] < total[b]]
        ext = [min(chunk, prompts[b] - done[b]) if done[b] < prompts[b] else 1 for b in live]
        meta = plan(
            cfg, [done[b] for b in live], ext, page_table[live], swa_table[live], torch.tensor(live, dtype=torch.int32)
        )
        x = torch.cat([seqs[b][done[b] : done[b] + e] for b, e in zip(live, ext, strict=True)])
        t0 = time.perf_counter()
        kept, vis = 0, 0
        for i in range(cfg.num_layers):
            out, states[i], aux = attention_layer(cfg, params[i], states[i], rms_normalize(x), meta, backend=backend)
            x = (x.float() + out.float()).to(torch.bfloat16)
            if aux.csa_lens is not None and meta.csa is not None:
                kept += int(aux.csa_lens.sum())
                vis += int(meta.csa.visible.sum())
        dt = (time.perf_counter() - t0) * 1e3
        start = 0
        for b, e in zip(live, ext, strict=True):
            outs[b][done[b] : done[b] + e] = x[start : start + e]
            start += e
            done[b] += e
        n_c4 = int((meta.csa.write_loc >= 0).sum()) if meta.csa is not None else 0
        n_c128 = int((meta.hca.write_loc >= 0).sum()) if meta.hca is not None else 0
        kind = "decode" if meta.is_decode else "prefill+decode" if any(e == 1 for e in ext) else "prefill"
        topk = f"{100 * kept / vis:5.1f}%" if vis else "   - "
        say(
            f"step {step:2d} {kind:>14}: {meta.num_tokens:4d} tokens of {len(live)} requests, entries "
            f"c{cfg.csa_ratio}+{n_c4:<3d} c{cfg.hca_ratio}+{n_c128:<2d} top-k kept {topk} of visible, {dt:7.1f} ms"
        )
        step += 1
    # dense check: the same layers over whole sequences
    worst = 0.0
    for b in range(n_req):
        x = seqs[b]
        for i in range(cfg.num_layers):
            x = (x.float() + dense_layer(cfg, params[i], rms_normalize(x)).float()).to(torch.bfloat16)
        err = ((outs[b].float() - x.float()).square().mean().sqrt() / x.float().square().mean().sqrt()).item()
        worst = max(worst, err)
        say(f"request {b}: {total[b]} tokens, relative RMS error vs dense evaluation {err:.2e}")
    ok = worst <= 1e-2
    say(f"dense check {'PASSED' if ok else 'FAILED'}: worst relative RMS {worst:.2e} (bound 1e-2, bf16 pipeline)")
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dsv4fn demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", default=None, help="torch | triton | tilelang | auto | compare (default: env)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-steps", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=32)
    args = ap.parse_args(argv)
    worst = run_demo(decode_steps=args.decode_steps, chunk=args.chunk, seed=args.seed, backend=args.backend)
    return 0 if worst <= 1e-2 else 1
