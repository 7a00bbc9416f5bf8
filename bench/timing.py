"""Timers. Each returns the median time of one call in microseconds.

* `l2flush` — `triton.testing.do_bench(fn, return_mode="median")`: the L2 cache is overwritten before
  every call (a 256 MB buffer is zeroed), each call timed alone with CUDA events; launch overhead
  included. The number to compare with the HBM roofline.
* `cudagraph` — `triton.testing.do_bench_cudagraph(fn, return_mode="median")`: many calls captured in
  one CUDA graph and replayed; no launch overhead, and no L2 flush (inputs smaller than L2, 50 MB on
  the H100, may be served from it: this can exceed the HBM roofline).
* `graphflush` — one call captured in a CUDA graph, the replay timed by `do_bench` with the L2 flush
  before each replay: the kernels' own time from a cold L2, without Python launch overhead. Peers with
  C++ launchers hide their host time behind the flush in `l2flush`; a Python library's eager host time
  (~100 us a step) does not hide, so `l2flush` then measures the host. This timer compares kernels.
* `cpu` — without CUDA: `time.perf_counter` around single calls, median.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

TIMERS = ("l2flush", "graphflush", "cudagraph")


def cpu_time_us(fn: Callable[[], Any], *, min_runs: int = 3, budget_s: float = 0.3) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def l2flush_us(fn: Callable[[], Any], *, warmup_ms: float = 10, rep_ms: float = 40) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


def cudagraph_us(fn: Callable[[], Any], *, rep_ms: float = 40) -> float:
    import triton.testing

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # graphs cannot be captured on the legacy default stream
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")) * 1e3


def graphflush_us(fn: Callable[[], Any], *, warmup_ms: float = 10, rep_ms: float = 40) -> float:
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, lazy inits) off the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return float(triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3
    finally:
        del graph


def measure(timer: str, fn: Callable[[], Any], *, rep_ms: float = 40) -> float:
    if timer == "cpu":
        return cpu_time_us(fn)
    if timer == "l2flush":
        return l2flush_us(fn, warmup_ms=max(5.0, rep_ms / 4), rep_ms=rep_ms)
    if timer == "graphflush":
        return graphflush_us(fn, warmup_ms=max(5.0, rep_ms / 4), rep_ms=rep_ms)
    if timer == "cudagraph":
        return cudagraph_us(fn, rep_ms=rep_ms)
    raise ValueError(f"unknown timer {timer!r}")
