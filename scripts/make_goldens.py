"""Regenerate tests/goldens/*.safetensors: reference outputs of the tiny config on fixed seeds.

    python scripts/make_goldens.py

Each file stores the outputs of one case (layer outputs, compressed entries, cache bytes, top-k
indices) with metadata: seed, case, torch version, git SHA, date. Inputs are re-created from the
seed by tests/test_goldens.py, so the files stay a few kilobytes.
"""

import datetime
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4fn import DSV4Config, attention_layer, init_layer_params, init_layer_state, plan

OUT = Path(__file__).resolve().parent.parent / "tests" / "goldens"
CASES = {"window": 0, "csa": 1, "hca": 2}


def run_case(layer: int, seed: int = 1234) -> dict[str, torch.Tensor]:
    cfg = DSV4Config.tiny()
    gen = torch.Generator().manual_seed(seed)
    lens, steps = [40, 23], [[24, 23], [16, 0]]
    seqs = [torch.randn(n, cfg.hidden_size, generator=gen).bfloat16() for n in lens]
    pt = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    sw = torch.tensor([[5, 0, 2], [1, 4, 3]], dtype=torch.int32)
    params = init_layer_params(cfg, layer, seed=seed)
    state = init_layer_state(cfg, layer, num_blocks=4, num_swa_pages=6, num_slots=2)
    done, outs, idx = [0, 0], [], []
    for step in steps:
        live = [b for b in range(2) if step[b]]
        meta = plan(
            cfg,
            [done[b] for b in live],
            [step[b] for b in live],
            pt[live],
            sw[live],
            torch.tensor(live, dtype=torch.int32),
            max_seq_len=max(lens),
        )
        x = torch.cat([seqs[b][done[b] : done[b] + step[b]] for b in live])
        out, state, aux = attention_layer(cfg, params, state, x, meta, backend="torch")
        outs.append(out)
        if aux.csa_indices is not None:
            idx.append(aux.csa_indices)
        for b in live:
            done[b] += step[b]
    res = {"out": torch.cat(outs), "swa_bytes": state.swa.data.clone()}
    if state.compressed is not None:
        res["compressed_bytes"] = state.compressed.data.clone()
    if state.comp_state is not None:
        res["comp_state_kv"] = state.comp_state.kv.clone()
    if idx:
        res["csa_indices"] = torch.cat(idx)
    return res


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    for name, layer in CASES.items():
        meta = {
            "case": name,
            "layer": str(layer),
            "seed": "1234",
            "torch": torch.__version__,
            "git": sha,
            "date": datetime.date.today().isoformat(),
            "config": "tiny",
        }
        save_file(run_case(layer), str(OUT / f"layer_{name}.safetensors"), metadata=meta)
        print("wrote", OUT / f"layer_{name}.safetensors")


if __name__ == "__main__":
    main()
