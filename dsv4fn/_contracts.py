"""Debug tiers: cheap host checks, shape contracts, device value checks.

Tier 1 (always on): O(1) host checks of dtype, rank, device, contiguity — `check_tensor` and friends.
  They read only tensor metadata: no device synchronisation, safe inside CUDA-graph capture.
Tier 2 (`DSV4FN_DEBUG=1`, read once at import): `@contract` checks every annotated argument, every
  annotated field of dataclass arguments, and the return value inside one jaxtyping memo, so a named
  dim (`b`, `h`, `n_slots` ...) must agree across `q`, the state and the metadata. Dataclasses may
  define `_invariants(self) -> list[str]` for relations jaxtyping cannot express. When off the
  decorator returns the function itself; it also steps aside while `torch.compile` traces.
Tier 3 (`DSV4FN_VALIDATE=1`): `validating()` guards device-synchronising value checks (indices in
  range, lengths consistent) and the host-side donation record (`check_not_donated` / `mark_donated`: a
  state object passed to a step that donates it must not be passed again); refused during CUDA-graph
  capture, skipped while `torch.compile` traces. Off, each step pays one flag test.
"""

import contextlib
import functools
import inspect
import os
import typing
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


DEBUG: bool = _env_flag("DSV4FN_DEBUG")
VALIDATE: bool = _env_flag("DSV4FN_VALIDATE")


class ContractError(TypeError):
    """A shape/dtype contract (tier 2) was violated."""


# ---------------------------------------------------------------------------------------------
# Tier 1: cheap host checks
# ---------------------------------------------------------------------------------------------


def _fmt_dtype(d: Any) -> str:
    return str(d).replace("torch.", "")


def check_tensor(
    name: str,
    t: Any,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Raise `TypeError`/`ValueError` naming `name`, the expected and the actual value. Runs on every step call:
    written for the common case (plain loops, no tuples built, `type(t) is torch.Tensor` before `isinstance`,
    whose metaclass hook is slow)."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        if t.dtype != dtype if isinstance(dtype, torch.dtype) else t.dtype not in dtype:
            allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
            want = " or ".join(_fmt_dtype(d) for d in allowed)
            raise TypeError(f"{name}: expected dtype {want}, got {_fmt_dtype(t.dtype)}")
    nd = t.dim()
    if ndim is not None and nd != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got rank {nd} (shape {tuple(t.shape)})")
    if shape is not None:
        bad = nd != len(shape)
        if not bad:
            for s, a in zip(shape, t.shape, strict=True):
                if s is not None and s != a:
                    bad = True
                    break
        if bad:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        if not (t.device.type == device.type and (device.index is None or t.device.index is None)):
            raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    if last_dim_contiguous and nd > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dim, got strides {t.stride()}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            devs = {n: t.device for n, t in tensors.items() if t is not None}
            raise ValueError("tensors on different devices: " + ", ".join(f"{n}={d}" for n, d in devs.items()))


def require(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(msg)


# ---------------------------------------------------------------------------------------------
# Tier 2: jaxtyping contracts over arguments and dataclass fields
# ---------------------------------------------------------------------------------------------


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # pragma: no cover - unresolvable forward refs: check nothing
        return {}


def _check_value(where: str, value: Any, hint: Any) -> None:
    from beartype.door import is_bearable
    from jaxtyping._storage import get_shape_memo

    if hint is Any or hint is inspect.Parameter.empty:
        return
    if not is_bearable(value, hint):
        got = (
            f"{_fmt_dtype(value.dtype)}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        memo = get_shape_memo()
        dims = memo[0] if memo else {}
        want = getattr(hint, "__name__", None) if isinstance(hint, type) else None
        raise ContractError(f"{where}: expected {want or hint}, got {got}; dims bound so far: {dims}")
    if hasattr(type(value), "__dataclass_fields__") and not isinstance(value, type):
        _check_dataclass(where, value)


# dataclasses whose annotated dims are their own (a call may pass two caches of different sizes, e.g. attend's
# window and compressed caches): their fields are checked in a fresh dim memo, not the call's
_LOCAL_DIMS = frozenset({"PagedKVCache", "IndexerKeyCache"})


def _check_dataclass(where: str, obj: Any) -> None:
    import jaxtyping

    hints = _hints(type(obj))
    local = type(obj).__name__ in _LOCAL_DIMS
    with jaxtyping.jaxtyped("context") if local else contextlib.nullcontext():
        for name in type(obj).__dataclass_fields__:
            if name in hints:
                _check_value(f"{where}.{name}", getattr(obj, name), hints[name])
    inv = getattr(obj, "_invariants", None)
    if inv is not None:
        errors = inv()
        if errors:
            raise ContractError(f"{where}: " + "; ".join(errors))


def contract(fn: F) -> F:
    """Tier-2 contract: identity unless `DSV4FN_DEBUG=1`."""
    if not DEBUG:
        return fn
    import jaxtyping

    sig = inspect.signature(fn)
    hints = _hints(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        with jaxtyping.jaxtyped("context"):
            for name, value in bound.arguments.items():
                _check_value(f"{fn.__qualname__}({name})", value, hints.get(name, Any))
            out = fn(*args, **kwargs)
            if "return" in hints:
                _check_value(f"{fn.__qualname__} -> return", out, hints["return"])
        return out

    return typing.cast(F, wrapper)


def check_contracts(where: str, **values: Any) -> None:
    """Explicit tier-2 check (annotation taken from dataclasses only); no-op unless DEBUG."""
    if not DEBUG or torch.compiler.is_compiling():
        return
    import jaxtyping

    with jaxtyping.jaxtyped("context"):
        for name, value in values.items():
            _check_dataclass(f"{where}({name})", value)


# ---------------------------------------------------------------------------------------------
# Tier 3: device-synchronising value checks
# ---------------------------------------------------------------------------------------------


def validating() -> bool:
    """True when tier-3 checks should run; raises if asked for during CUDA-graph capture."""
    if not VALIDATE or torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("DSV4FN_VALIDATE=1 checks synchronise the device and cannot run during CUDA-graph capture")
    return True


def validate_range(name: str, t: torch.Tensor, lo: int, hi: int, *, allow: int | None = None) -> None:
    """Every element in [lo, hi) (or equal to `allow`, e.g. -1 padding)."""
    if t.numel() == 0:
        return
    ok = (t >= lo) & (t < hi)
    if allow is not None:
        ok |= t == allow
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(
            f"{name}: value {t[tuple(bad)].item()} at {bad} outside [{lo}, {hi})"
            + (f" (and not {allow})" if allow is not None else "")
        )


# donated state object -> the step it was donated to. Keyed by object identity: the state types are
# `@pytree_dataclass`es (frozen, eq=False: hashed by identity, with a weakref slot), and an entry goes away with
# its object, so a new object at a recycled address is never taken for an old one. A step returns *new*
# objects that share storage with the donated ones: those are fresh states, the donated objects are spent.
_donated: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def check_not_donated(step: str, states: dict[str, Any]) -> None:
    """Tier 3 (call only when `validating()`): raise if one of `states` (argument name -> state, None skipped)
    was donated to an earlier step, or if one object is passed as two donated arguments. Marks nothing: the
    step calls `mark_donated` once it has succeeded, so a call refused by a later check can be retried."""
    seen: dict[int, str] = {}
    for arg, s in states.items():
        if s is None:
            continue
        try:
            earlier = _donated.get(s)
        except TypeError:  # not weakly referenceable / hashable: not a state type, nothing to track
            continue
        if earlier is not None:
            raise ValueError(
                f"{step}({arg}): this state was donated to an earlier step ({earlier}); use the state that step "
                "returned"
            )
        other = seen.setdefault(id(s), arg)
        if other != arg:
            raise ValueError(
                f"{step}({arg}): the same object as {other}; each donated argument must be a state of its own"
            )


def mark_donated(step: str, donated: Sequence[Any], returned: Sequence[Any] = ()) -> None:
    """Tier 3 (call only when `validating()`): the step succeeded. `donated` are spent; `returned` (the
    step's new states) are live, also where a backend handed back the very object it was given."""
    for s in donated:
        if s is not None:
            with contextlib.suppress(TypeError):
                _donated[s] = step
    for s in returned:
        if s is not None:
            with contextlib.suppress(TypeError):
                _donated.pop(s, None)


# ---------------------------------------------------------------------------------------------
# Checks the issue asks for that the steps do not call yet (helpers; the call sites are listed in each
# docstring — wiring them in is a one-line change per step)
# ---------------------------------------------------------------------------------------------


def check_page_layout(name: str, data: Any, *, page_bytes: int, align: int) -> torch.Tensor:
    """Tier 1: a paged cache's byte tensor `data` is uint8 `[n_pages, page_bytes]` whose pages start on
    `align`-byte boundaries (storage offset and page stride multiples of `align`), with unit stride inside
    a page and pages that do not overlap. `align`: 8 for MODEL1 pages (the Triton attention reads 8-byte
    words; the TileLang kernels and the Triton store need 2), 4 for indexer pages (fp32 scales).

    Call sites: `attend._check_cache` (cache, extra_cache; align 8), `formats.store_kv` (align 8),
    `formats.store_index_keys` and `index_topk._check` (align 4)."""
    check_tensor(name, data, dtype=torch.uint8, ndim=2, shape=(None, page_bytes))
    if data.shape[1] > 1 and data.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride inside a page, got strides {data.stride()}")
    if data.shape[0] > 1 and data.stride(0) < page_bytes:
        raise ValueError(f"{name}: pages overlap: page stride {data.stride(0)} < page_bytes {page_bytes}")
    if data.shape[0] > 1 and data.stride(0) % align:
        raise ValueError(f"{name}: expected a page stride that is a multiple of {align} bytes, got {data.stride(0)}")
    off = 0 if torch.compiler.is_compiling() else data.storage_offset()  # Dynamo cannot trace it
    if off % align:
        raise ValueError(f"{name}: expected the first page at a multiple of {align} bytes, got storage offset {off}")
    return data


def validate_capacity(name: str, lens: torch.Tensor, page_table: torch.Tensor, page_size: int) -> None:
    """Tier 3: every length fits in the pages a row of `page_table` can address
    (`page_table.shape[1] * page_size` entries); the kernels would clamp to the last page instead.

    Call sites: `index_topk._check` (`meta.csa.visible` against `meta.page_table`), `compat.deep_gemm.
    fp8_paged_mqa_logits` (`context_lens` against `block_table`)."""
    if not validating() or lens.numel() == 0:
        return
    cap = page_table.shape[1] * page_size
    over = lens > cap
    if bool(over.any()):
        i = over.nonzero()[0].tolist()
        raise ValueError(
            f"{name}: value {lens[tuple(i)].item()} at {i} exceeds the page table's capacity {cap} "
            f"({page_table.shape[1]} pages of {page_size})"
        )
    validate_range(name, lens, 0, cap + 1)


# compressor-state tensor id -> {state slot: position where the slot's last step ended}
_positions: dict[int, dict[int, int]] = {}


def validate_positions(
    name: str, state_key: torch.Tensor, slots: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor
) -> None:
    """Tier 3: positions never go backwards (nor skip ahead) on a compressor-state slot.

    A step for request b on state slot `slots[b]` must start (`prefix_lens[b]`) where the previous step
    on that slot ended (`prefix_lens + extend_lens` of that step); `prefix_lens[b] == 0` starts a new
    request on the slot. Slots must be distinct within a step. The record is kept per state tensor
    (`state_key`, e.g. `state.kv`, which the compress step hands on from step to step) and dropped with it.
    A rolled-back step (speculative decoding) must restore the state and start the slot again from 0.

    Call site: `compress.compress`, before the backend runs:
    `validate_positions("meta.prefix_lens", state.kv, meta.state_slots, meta.prefix_lens, meta.extend_lens)`."""
    if not validating():
        return
    s, p, e = slots.tolist(), prefix_lens.tolist(), extend_lens.tolist()
    if len(set(s)) != len(s):
        dup = next(x for x in s if s.count(x) > 1)
        raise ValueError(f"{name}: state slot {dup} is used by more than one request of the step")
    key = id(state_key)
    ends = _positions.get(key)
    if ends is None:
        ends = _positions[key] = {}
        weakref.finalize(state_key, _positions.pop, key, None)
    for b, (slot, start) in enumerate(zip(s, p, strict=True)):
        last = ends.get(slot)
        if start != 0 and last is not None and start != last:
            how = "goes backwards" if start < last else "skips ahead"
            raise ValueError(
                f"{name}: request {b} (state slot {slot}) starts at position {start} but the slot's last step "
                f"ended at {last}: the position {how} (prefix_lens 0 starts a new request on the slot)"
            )
    for slot, start, n in zip(s, p, e, strict=True):
        ends[slot] = start + n
