"""Golden values: the reference's outputs on fixed seeds, pinned so changes that move numbers are caught."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_goldens import CASES, run_case  # noqa: E402

GOLD = Path(__file__).resolve().parent / "goldens"


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_golden(name):
    path = GOLD / f"layer_{name}.safetensors"
    got = run_case(CASES[name])
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["case"] == name
        keys = set(f.keys())
        assert keys == set(got), f"golden has {sorted(keys)}, run produced {sorted(got)}"
        for k in keys:
            want = f.get_tensor(k)
            g = got[k]
            assert g.dtype == want.dtype and g.shape == want.shape, k
            if g.dtype == torch.bfloat16:
                # at most one bf16 ulp anywhere (platform libm differences), almost all exact
                diff = (g.float() - want.float()).abs()
                ulp = want.float().abs().clamp_min(1e-30) * 2**-7
                assert bool((diff <= ulp).all()), f"{k}: moved by more than one bf16 ulp"
                assert (diff > 0).float().mean() < 1e-3, f"{k}: {(diff > 0).sum()} elements moved"
            elif g.dtype == torch.float32:
                assert torch.allclose(g, want, rtol=1e-6, atol=0, equal_nan=True), k
            else:
                assert torch.equal(g, want), f"{k}: bytes/indices differ"
