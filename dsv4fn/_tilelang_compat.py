# pyright: reportInvalidTypeForm=false, reportGeneralTypeIssues=false, reportOperatorIssue=false
# (TileLang kernels are a DSL: `T.Tensor[(M, N), dtype]` annotations are not Python types.)
"""The one place for TileLang (0.1.15) imports and workarounds.

Import this module only from TileLang kernel files: importing it raises ImportError when tilelang is
missing, which `dsv4fn._backend` takes to mean "backend unavailable".

Workarounds (each has a test in tests/test_tilelang_lower.py or tests/test_tilelang_gpu.py):

* `jit(out_idx=...)`: TileLang's kernel adapters normalise `out_idx` *in place*
  (`BaseKernelAdapter._legalize_result_idx` turns `-1` into `len(params) - 1` inside the list it was
  given), and `@tilelang.jit` hands the same list object to every compile of the factory. The second
  function compiled by one factory then sees the first one's resolved indices (wrong outputs or an
  IndexError when the two have different parameter counts). Our `jit` gives each compile a fresh
  copy. dsv4fn's own kernels allocate their outputs in torch (caller-allocated, CUDA-graph friendly)
  and pass no `out_idx`, but the wrapper keeps any future use safe.
* `launch(kernel, *args)`: TVM-FFI reads the launch stream from its own per-device "current stream",
  filled from torch through the DLPack exchange extension when that is present; without it (or with a
  stale entry) launches once went to the legacy default stream, which breaks stream ordering and makes
  CUDA-graph capture fail. `launch` pins the FFI stream to `torch.cuda.current_stream()` for the call.
* `barrier_wait(bars, idx, parity)`: TileLang's `tl::mbarrier_wait` is an `asm volatile` spin loop *without*
  a "memory" clobber, so nvcc may move ordinary shared-memory loads (flags, softmax scales written by
  another warpgroup) above the wait. Hand-written warp-specialised kernels use this macro: the wait,
  then an empty `asm volatile("" ::: "memory")` compiler fence (no instruction is emitted).
* `named_sync(id, count)` + pass config `tl.disable_thread_storage_sync`: TileLang's automatic
  shared-memory sync treats every `T.call_extern` as a possible shared-memory access. In a
  warp-specialised kernel it then puts named barriers between an extern call and the next shared
  store (inside the producer's unrolled loops), or fails to lower with "[ThreadSync] Cannot lower a
  required shared-memory sync inside a divergent region". Such kernels turn the automatic pass off and
  place every sync themselves: mbarriers between warpgroups, `named_sync` inside one.
* `DEVICE_SRC` / `T.import_source`: TileLang pastes imported CUDA *before* its own `#include`s, so
  helper device code may use only built-in types and inline PTX (no `__nv_bfloat162`, no cuda_fp8.h).
  A kernel gets one `T.import_source` call: concatenate `DEVICE_SRC` with the kernel's own helpers.
"""

import contextlib
from collections.abc import Callable
from typing import Any

try:
    import tilelang
    import tilelang.language as T
    import tvm_ffi
    from tilelang.jit import JITImpl
except Exception as exc:  # pragma: no cover - exercised only without tilelang
    raise ImportError(f"tilelang is not usable: {exc}") from exc

import torch

__all__ = [
    "DEVICE_SRC",
    "SM90A",
    "T",
    "barrier_wait",
    "jit",
    "launch",
    "lower_source",
    "named_sync",
    "precompile",
    "sm90a_target",
    "tilelang",
]

SM90A = {"kind": "cuda", "arch": "sm_90a"}

DEVICE_SRC = r"""
// dsv4fn/_tilelang_compat.py: compiler-only fence (orders memory accesses for nvcc, emits nothing)
__device__ __forceinline__ void dsv4fn_compiler_fence() { asm volatile("" ::: "memory"); }
// named barrier over `count` threads (a multiple of 32); ids 1..15 (0 is __syncthreads)
__device__ __forceinline__ void dsv4fn_named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" : : "r"(id), "r"(count) : "memory");
}
"""


class _FreshOutIdxJIT(JITImpl):
    """A `JITImpl` whose every compile gets its own copy of `out_idx` (see module docstring)."""

    _dsv4fn_out_idx: Any = None

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        src = self._dsv4fn_out_idx
        self.out_idx = list(src) if isinstance(src, list | tuple) else src
        return super().compile(*args, **kwargs)


def jit(func: Callable[..., Any] | None = None, *, out_idx: list[int] | int | None = None, **kwargs: Any) -> Any:
    """`tilelang.jit` with per-compile copies of `out_idx` (usable bare or with keyword arguments)."""

    def deco(fn: Callable[..., Any]) -> Any:
        impl = tilelang.jit(out_idx=None if out_idx is None else _copy(out_idx), **kwargs)(fn)
        impl.__class__ = _FreshOutIdxJIT
        impl._dsv4fn_out_idx = _copy(out_idx)
        return impl

    return deco(func) if func is not None else deco


def _copy(out_idx: list[int] | int | None) -> list[int] | int | None:
    return list(out_idx) if isinstance(out_idx, list | tuple) else out_idx


@T.macro
def named_sync(barrier_id, count):
    """`bar.sync barrier_id, count` (with a compiler fence); see module docstring."""
    T.call_extern("handle", "dsv4fn_named_sync", barrier_id, count)


@T.macro
def barrier_wait(bars, idx, parity):
    """`T.barrier_wait(bars[idx], parity)` followed by a compiler fence (see module docstring)."""
    T.barrier_wait(bars[idx], parity)
    T.call_extern("handle", "dsv4fn_compiler_fence")


def precompile(thunks: list[Callable[[], Any]], workers: int = 8) -> list[Any]:
    """Run kernel-building thunks (e.g. `lambda: _kernels(...)`) on a thread pool and return their results
    in order. TileLang's lowering releases the GIL and nvcc runs as a subprocess, so a process that needs
    several kernels (the GPU tests, the benchmark) compiles them side by side instead of one after another
    (TileLang's own `par_compile` does the same)."""
    import concurrent.futures

    if not thunks:
        return []

    def attempt(f: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, f()
        except Exception as exc:  # retried serially below (a thread-safety problem must not fail a run)
            return False, exc

    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(thunks)))) as pool:
        done = list(pool.map(attempt, thunks))
    return [value if ok else thunk() for (ok, value), thunk in zip(done, thunks, strict=True)]


def sm90a_target() -> Any:
    from tvm.target import Target  # pyright: ignore[reportMissingImports]

    return Target(SM90A)


def lower_source(prim_func: Any, target: Any = None, pass_configs: dict[str, Any] | None = None) -> str:
    """Lower a TileLang PrimFunc for sm_90a (no GPU needed) and return the generated CUDA source."""
    from tvm import transform  # pyright: ignore[reportMissingImports]

    tgt = sm90a_target() if target is None else target
    with tgt, transform.PassContext(config=pass_configs or {}):
        artifact = tilelang.lower(prim_func, target=tgt)
    return artifact.kernel_source


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


@contextlib.contextmanager
def torch_stream(device: torch.device):
    """Make TVM-FFI launch on torch's current stream of `device` (see module docstring)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    stream = _raw_stream(idx) if _raw_stream is not None else torch.cuda.current_stream(idx).cuda_stream
    with tvm_ffi.use_raw_stream(tvm_ffi.device("cuda", idx), stream):
        yield


def launch(kernel: Callable[..., Any], *args: Any) -> Any:
    """Run a compiled TileLang kernel on torch's current CUDA stream of its first tensor's device."""
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch_stream(dev):
        return kernel(*args)
