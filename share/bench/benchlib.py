"""Helpers shared by the benchmark scripts: timing, peak memory, machine description."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CUDA work included (synchronised before and after).

    Wall time is the figure; CPU time (all threads of this process) is a check on a shared machine: other
    processes stretch the wall time of a run much more than its CPU time.
    """
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    del result
    return took, cpu


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by tensors during one call of ``fn``, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak.

    CPU: PyTorch has no allocator statistics for the CPU, and the process RSS is not a usable measure: glibc
    keeps freed heap pages resident, so the RSS high-water mark of a run depends on the runs before it (we saw
    63 MB for a resnet50 gradient that allocates 663 MB). Instead we record the run under ``torch.profiler``
    with ``profile_memory=True``: every allocation and free of PyTorch's CPU allocator becomes a ``[memory]``
    event with a signed byte count, and the running sum of those events, in time order, is the live tensor
    memory; its maximum is the peak. This is exact and deterministic (the same figure on every repeat, with
    or without other load), counts every tensor (autograd's saved tensors, the rules' temporaries), and agrees
    with the RSS high-water mark measured with ``MALLOC_MMAP_THRESHOLD_=65536`` (which makes glibc return all
    large blocks at once) to within 1%; it excludes oneDNN's internal scratch buffers, which the gradient and
    the rules share alike. The profiler slows the run down, so this run is never one of the timed ones.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: kineto writes a line to it at every profiler start and stop (and a GPU
    probe error on CPU-only machines), which no environment variable turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} load {load()}] {message}", file=sys.stderr, flush=True)
