"""Backend selection for the step functions: `"torch"`, `"triton"`, `"tilelang"`, `"auto"`, `"compare"`.

Each step (`"attend"`, `"index_logits"`, `"topk"`, `"compress"`, `"store_model1"`, ...) has a torch
reference and optional kernel implementations that register themselves when their module imports
(`dsv4fn/<step>/triton.py`, `.../tilelang.py`). Every implementation of a step takes the reference's
arguments and returns the reference's outputs.

* `backend=None` means the default: `DSV4FN_BACKEND` if set, else `"auto"`.
* `"auto"`: the first available of the step's preference list (`AUTO_ORDER` unless the step set its
  own) on CUDA tensors — the fastest measured on the H100, see bench/results —, the reference on CPU.
* `"compare"` (or `"compare:<backend>"`): runs the reference beside the chosen backend and raises
  `BackendMismatch` with a worst-element report when they disagree beyond the step's tolerance.
"""

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("torch", "triton", "tilelang")
_impls: dict[str, dict[str, Callable[..., Any]]] = {}
_comparators: dict[str, Callable[[Any, Any], str | None]] = {}
# steps whose fastest backend differs from AUTO_ORDER (bench/results/h200/results.csv, CUDA-graph replay, V4-Flash
# decode at 64k: TileLang attention 13.2/24.4/35.1/45.1/89.1 us at b = 1/32/64/128/256, Triton
# 13.9/27.9/47.0/67.4/130.8 us; the steps fall back along the list where a backend cannot take a call)
_auto_order: dict[str, tuple[str, ...]] = {"attend": ("tilelang", "triton"), "index_logits": ("tilelang", "triton")}
_loaded: set[tuple[str, str]] = set()
# GPU preference when a step sets none: the fastest measured on the H100 (bench/results/h100). The
# Triton kernels beat the TileLang ones at every measured size so far (attention 3-12x, logits 1.7x).
AUTO_ORDER: tuple[str, ...] = ("triton", "tilelang")
# where each step's kernel modules live
_MODULES: dict[str, str] = {
    "attend": "attend",
    "index_logits": "index_topk",
    "topk": "index_topk",
    "index_topk_fused": "index_topk",
    "compress": "compress",
    "store_model1": "formats",
    "store_indexer": "formats",
    "rms_normalize": "norm_rope",
    "norm_rope": "norm_rope",
    "apply_rope": "norm_rope",
}


# H100 / H200 SXM: the SM count the TileLang grid plans (attention splits, fused top-k chunk tiling) assume where no
# GPU is given (CPU, host-side tests); calls follow the running GPU's `sm_count`
PLAN_SMS = 132


def _at_trace_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Dynamo calls `fn` while tracing and uses its result as a constant (for host logic it cannot or need not
    trace). What torch.compiler.assume_constant_result sets - without importing Dynamo, and with it triton.language,
    when dsv4fn is imported (a Triton interpreter run sets TRITON_INTERPRET after that; and it costs ~1 s)."""
    fn._dynamo_marked_constant = True  # pyright: ignore[reportFunctionMemberAccess]
    return fn


@_at_trace_time  # (not on _sm_count: Dynamo traces through an lru_cache wrapper, with a warning, whatever it is marked)
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached per device; host-only, no sync), 0 for other devices: the kernels'
    grid plans follow the GPU they run on (each falls back to its own default at 0)."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class BackendMismatch(AssertionError):
    """`backend="compare"` found a kernel that disagrees with the reference."""


def register(step: str, backend: str, *, auto_rank: int | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: `fn` implements `step` on `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _impls.setdefault(step, {})[backend] = fn
        return fn

    return deco


def register_comparator(step: str, fn: Callable[[Any, Any], str | None]) -> None:
    """`fn(reference_out, kernel_out)` returns None when they agree, else a report."""
    _comparators[step] = fn


def set_auto_order(step: str, order: tuple[str, ...]) -> None:
    _auto_order[step] = order


@_at_trace_time  # (an import cannot be traced: a step's first call under torch.compile)
def _load(step: str, backend: str) -> None:
    key = (step, backend)
    if key in _loaded or backend == "torch":
        return
    _loaded.add(key)
    pkg = _MODULES.get(step)
    if pkg is None:
        return
    try:
        importlib.import_module(f"dsv4fn.{pkg}.{backend}")
    except ImportError:
        pass  # kernel library missing: the backend is simply unavailable


def available(step: str) -> tuple[str, ...]:
    for b in BACKENDS:
        _load(step, b)
    return tuple(b for b in BACKENDS if b in _impls.get(step, {}))


def default_backend() -> str:
    return os.environ.get("DSV4FN_BACKEND", "auto").strip() or "auto"


def _kernel_usable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if device.type == "cuda":
        return True
    # kernels run on CPU tensors only under the Triton interpreter
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(
    step: str, backend: str | None, device: torch.device, accepts: Callable[[str], bool] | None = None
) -> tuple[str, Callable[..., Any]]:
    """(name, implementation) of `backend` for `step`. `accepts(name)`: whether that backend can take this
    call's shapes; "auto" skips the ones that cannot (an explicit backend raises in its own checks)."""
    name = backend or default_backend()
    if name.startswith("compare"):
        _, _, inner = name.partition(":")
        inner_name, inner_fn = resolve(step, inner or "auto", device, accepts)
        ref = resolve(step, "torch", device)[1]
        return f"compare:{inner_name}", _comparing(step, ref, inner_fn, inner_name)
    if name == "auto":
        if device.type == "cuda":
            for b in _auto_order.get(step, AUTO_ORDER):
                _load(step, b)
                if b in _impls.get(step, {}) and (accepts is None or accepts(b)):
                    return b, _impls[step][b]
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {(*BACKENDS, 'auto', 'compare')}")
    _load(step, name)
    impls = _impls.get(step, {})
    if name not in impls:
        raise ValueError(f"step {step!r} has no {name!r} implementation here (available: {available(step)})")
    if not _kernel_usable(name, device):
        raise ValueError(
            f"step {step!r}: backend {name!r} needs CUDA tensors (got {device}); on CPU use 'torch', or "
            "'triton' under TRITON_INTERPRET=1"
        )
    return name, impls[name]


def _comparing(step: str, ref: Callable[..., Any], fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        # the reference runs first on copies of any state it would donate
        ref_args = [_clone_state(a) for a in args]
        ref_kwargs = {k: _clone_state(v) for k, v in kwargs.items()}
        expect = ref(*ref_args, **ref_kwargs)
        got = fn(*args, **kwargs)
        cmp = _comparators.get(step, default_compare)
        report = cmp(expect, got)
        if report is not None:
            raise BackendMismatch(f"step {step!r}: backend {name!r} disagrees with the reference: {report}")
        return got

    return run


def _clone_state(a: Any) -> Any:
    import torch.utils._pytree as pytree

    if isinstance(a, torch.Tensor) or hasattr(type(a), "__dataclass_fields__"):
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, a)
    return a


def compare_tensors(name: str, expect: torch.Tensor, got: torch.Tensor) -> str | None:
    """Tolerance by dtype (conventions.md): bf16 relative RMS <= 5e-3, fp32 allclose(1e-5, 1e-5),
    integers / fp8 / uint8 exact; inf/NaN must sit at the same places. Returns a report or None."""
    if expect.shape != got.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    if expect.dtype != got.dtype:
        return f"{name}: dtype {got.dtype} != {expect.dtype}"
    if not expect.is_floating_point() or expect.element_size() == 1:
        e, g = expect.view(torch.uint8) if expect.element_size() == 1 else expect, got
        g = g.view(torch.uint8) if got.element_size() == 1 else g
        bad = (e != g).nonzero()
        if bad.numel():
            i = tuple(bad[0].tolist())
            return f"{name}: {bad.shape[0]} elements differ, first at {list(i)}: {g[i].item()} != {e[i].item()}"
        return None
    e, g = expect.double(), got.double()
    fin_e, fin_g = torch.isfinite(e), torch.isfinite(g)
    if not torch.equal(fin_e, fin_g) or not torch.equal(e[~fin_e].nan_to_num(0.5), g[~fin_g].nan_to_num(0.5)):
        return f"{name}: inf/NaN positions differ"
    e, g = e[fin_e], g[fin_g]
    if e.numel() == 0:
        return None
    err = (e - g).abs()
    worst = int(err.argmax())
    if expect.dtype == torch.bfloat16:
        rel_rms = (err.square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-30)).item()
        if rel_rms > 5e-3:
            return f"{name}: relative RMS {rel_rms:.3e} > 5e-3; worst element {g[worst].item()} vs {e[worst].item()}"
        return None
    tol = 1e-5 + 1e-5 * e.abs()
    if bool((err > tol).any()):
        return f"{name}: max error {err.max().item():.3e}; worst element {g[worst].item()} vs {e[worst].item()}"
    return None


def default_compare(expect: Any, got: Any) -> str | None:
    import torch.utils._pytree as pytree

    le, lg = pytree.tree_leaves(expect), pytree.tree_leaves(got)
    if len(le) != len(lg):
        return f"{len(lg)} outputs != {len(le)}"
    for i, (e, g) in enumerate(zip(le, lg, strict=True)):
        if isinstance(e, torch.Tensor):
            r = compare_tensors(f"output {i}", e, g)
            if r is not None:
                return r
    return None
