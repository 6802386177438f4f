"""Runtime policy: which device a run uses and how many loader processes decode its images."""

from __future__ import annotations

import os
from typing import Any

import torch

from lrpcli.errors import ConfigError

__all__ = ["resolve_device", "available_cpus", "resolve_num_workers", "MAX_AUTO_WORKERS"]


def resolve_device(device: str) -> Any:
    """``run.device`` as a ``torch.device``: auto picks cuda when available; no GPU is a ConfigError."""
    device = device.strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"run.device: {device!r} requested but CUDA is not available here; use auto or cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"run.device: {device!r} does not exist; this machine has cuda:0..cuda:{count - 1}"
            )
    return torch.device(device)


#: ``run.num_workers: auto`` never starts more loader processes than this (on a GPU machine).
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(num_workers: int | str, *, samples: int, batch_size: int, device: Any,
                        cpus: int | None = None) -> int:
    """``run.num_workers`` as a number of DataLoader processes (0: decode in a thread of the main process).

    An integer is used as is. ``auto`` gives 0 on the CPU: the attribution's intra-op threads already occupy
    every core, so decoding competes with them whether it runs in processes or in a thread, and a thread needs
    no process start-up and no copy of each batch between processes. With a GPU it gives one process per core
    left to the main process (``cpus - 1``), at most one per two batches of the run (a process costs more to
    start than decoding a batch or two) and at most ``MAX_AUTO_WORKERS``. ``samples`` is the number of images
    the run will decode, ``device`` a ``torch.device`` or a ``run.device`` value, ``cpus`` defaults to the
    cores this process may use.
    """
    if num_workers != "auto":
        return int(num_workers)
    name = str(device).strip().lower()
    cuda = torch.cuda.is_available() if name == "auto" else torch.device(name).type == "cuda"
    if not cuda:
        return 0
    cpus = available_cpus() if cpus is None else cpus
    batches = -(-max(0, samples) // max(1, batch_size))
    return max(0, min(cpus - 1, batches // 2, MAX_AUTO_WORKERS))
