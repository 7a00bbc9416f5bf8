"""What each debug tier costs on the host, per public step call (the README's tier table).

On CPU with the tiny config (decode, 4 requests): each step is timed with its implementation replaced by a
stub that returns a recorded output, so what remains is the step's own Python — tier 1 (argument checks and
backend choice, always on) — and then the extra cost of tier 2 (`DSV4FN_DEBUG=1`, jaxtyping contracts: read
at import, so measured in a child process) and tier 3 (`DSV4FN_VALIDATE=1`: value checks, donation and
position records; each call clears those records, as a loop that re-runs one step on one state must). On a
GPU, tier 3 also synchronises the device once per check. Best of 5 loops.
Usage: python -m bench.tier_cost
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.configs import Case
from bench.run import SETUPS
from dsv4fn import _backend, _contracts

CASES = (("attend", "attend"), ("index_topk", "index_topk"), ("store_kv", "store_kv/model1"),
         ("compress", "compress/c4"))  # fmt: skip


def _case(op: str) -> Case:
    name, _, variant = op.partition("/")
    return Case(name, "tiny", "decode", 4, 256, variant=variant)


N, LOOPS = 300, 5


def _best_us(fn: Callable[[], Any]) -> float:
    n, loops = N, LOOPS
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def _stubbed_calls() -> dict[str, Callable[[], Any]]:
    """Each step's public call, with every implementation it dispatches to replaced by its recorded output."""
    resolve = _backend.resolve
    recorded: dict[str, Any] = {}

    def recording(step: str, backend: Any, device: Any, accepts: Any = None) -> tuple[str, Callable[..., Any]]:
        name, fn = resolve(step, backend, device, accepts)

        def run(*a: Any, **k: Any) -> Any:
            recorded[step] = out = fn(*a, **k)
            return out

        return name, run

    calls = {}
    dev = torch.device("cpu")
    for label, op in CASES:
        bench = SETUPS[_case(op).op](_case(op), dev)
        fn = bench.make("torch", True)
        _backend.resolve = recording  # type: ignore[assignment]
        try:
            fn()
        finally:
            _backend.resolve = resolve  # type: ignore[assignment]
        calls[label] = fn

    def stub(step: str, backend: Any, device: Any, accepts: Any = None) -> tuple[str, Callable[..., Any]]:
        name, _ = resolve(step, backend, device, accepts)  # the backend choice is part of the step's cost
        return name, lambda *a, **k: recorded[step]

    _backend.resolve = stub  # type: ignore[assignment]  # until measure() puts the real one back
    return calls


def _clear_records() -> None:
    _contracts._donated.clear()
    _contracts._positions.clear()


def measure() -> dict[str, float]:
    """step:plain / step:validate host microseconds per call (and the record clearing's own cost)."""
    resolve, validate = _backend.resolve, _contracts.VALIDATE
    try:
        calls = _stubbed_calls()
        out = {f"{k}:plain": _best_us(fn) for k, fn in calls.items()}
        _contracts.VALIDATE = True
        for k, fn in calls.items():

            def run(fn: Callable[[], Any] = fn) -> Any:
                _clear_records()
                return fn()

            out[f"{k}:validate"] = _best_us(run)
    finally:
        _backend.resolve, _contracts.VALIDATE = resolve, validate  # type: ignore[assignment]
        _clear_records()
    out["clear_records"] = _best_us(_clear_records)
    return out


def main() -> None:
    if "--child" in sys.argv:
        print(json.dumps(measure()))
        return
    base = measure()
    env = dict(os.environ, DSV4FN_DEBUG="1")
    child = subprocess.run([sys.executable, "-m", "bench.tier_cost", "--child"], env=env, capture_output=True,
                           text=True, check=True)  # fmt: skip
    debug = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"host time per call, CPU ({os.cpu_count()} cores), tiny config, implementations stubbed; torch "
          f"{torch.__version__}")  # fmt: skip
    print(f"{'step':12s} {'tier 1 (always)':>16s} {'+ tier 2 (DEBUG)':>17s} {'+ tier 3 (VALIDATE)':>20s}")
    clear = base["clear_records"]
    for label, _ in CASES:
        t1 = base[f"{label}:plain"]
        t2 = debug[f"{label}:plain"] - t1
        t3 = base[f"{label}:validate"] - clear - t1
        print(f"{label:12s} {t1:13.1f} us {t2:14.1f} us {t3:17.1f} us")


if __name__ == "__main__":
    main()
