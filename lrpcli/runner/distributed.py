"""Many processes, many GPUs, many nodes: ``torchrun ... -m lrpcli explain`` and the shard merge.

PyTorch's own launcher does the scheduling. Under ``torchrun`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) every process is one rank:

* **The split** is deterministic and contiguous: the run's batches (as a single process would form them,
  ``run.batch_size`` samples each) are cut into ``WORLD_SIZE`` blocks, rank ``r`` getting batches
  ``[ceil(r * B / W), ceil((r + 1) * B / W))`` of the ``B`` batches. Every sample lands in exactly one shard,
  each shard's rows are in data set order, and the merge is a concatenation. Cutting at batch boundaries (not
  at ``r * N / W`` samples) keeps every batch's composition what it is in a one-process run; that matters
  because CPU convolutions do not give bitwise equal per-sample results for different batch compositions
  (measured on the demo model: batch size 3 vs 4 differ in the last bits), so only this makes the merged file
  equal a one-process run bit for bit. The shares differ by at most one batch; with fewer batches than ranks,
  the last ranks get nothing and write no file.
* **The device** is ``cuda:LOCAL_RANK`` when ``run.device`` is ``auto`` or ``cuda`` and CUDA exists, else
  the CPU; an explicit ``cuda:N`` or ``cpu`` is kept.
* **The shard file** of rank 3 for ``-o out.h5`` is ``out.rank00003.h5``: an ordinary result file (same
  layout, same crash safety, same ``--resume``) with root attributes ``shard_rank``, ``shard_world_size``,
  ``shard_start``, ``shard_stop``, ``shard_total`` and ``shard_batch_size`` saying which samples it holds.
* **The end**: the ranks meet at a barrier (a gather of their summaries over the process group, which
  carries nothing else), then rank 0 merges the shards into ``out.h5`` in data set order, checks that every
  sample is there exactly once, and removes the shards; with ``--no-merge`` it writes ``out.h5`` as an HDF5
  virtual dataset over the shards instead and keeps them.

A rank started with ``RANK`` and ``WORLD_SIZE`` but without ``MASTER_ADDR`` runs alone: it computes (or,
with ``--resume``, finishes) its own shard and stops; ``lrpcli merge out.rank*.h5 -o out.h5`` then joins the
shards. That is how one rank that died is re-run without the others.

The shard files, their split and their merge live in ``lrpcli.runner.shards`` (no torch: ``lrpcli merge`` runs
anywhere h5py does); this module is the rank: its place, its device, its run and the barrier.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpcli.errors import DataError, LrpcliError, RunError
from lrpcli.runner.shards import SHARD_ATTRS, MergeSummary, default_output, merge, shard_bounds, shard_path
from lrpcli.store import open_results

__all__ = [
    "Shard",
    "from_env",
    "shard_bounds",
    "shard_path",
    "run_rank",
    "merge",
    "MergeSummary",
    "default_output",
]

#: How long a finished rank waits at the final barrier for the slowest one (a resumed run may have one rank
#: with hours left while the others are done at once). A rank that dies ends the job sooner: torchrun stops
#: the others.
BARRIER_TIMEOUT = _dt.timedelta(days=7)


# ------------------------------------------------------------------------------------------- the ranks
@dataclass(frozen=True)
class Shard:
    """One rank of a distributed run: which block of samples it explains, on which device, into which file."""

    rank: int
    world_size: int
    local_rank: int
    path: Path
    grouped: bool = True  # started by torchrun with a process group (False: a rank re-run alone)

    def bounds(self, total: int, batch_size: int) -> tuple[int, int]:
        return shard_bounds(total, self.world_size, self.rank, batch_size)

    def attrs(self, total: int, batch_size: int) -> dict[str, int]:
        """The root attributes that say which samples the shard file holds."""
        start, stop = self.bounds(total, batch_size)
        values = (self.rank, self.world_size, start, stop, total, batch_size)
        return {name: int(v) for name, v in zip(SHARD_ATTRS, values)}

    def device(self, run_device: str) -> Any:
        """``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA exists, else the CPU; ``cuda:N``/``cpu`` as given."""
        import torch

        from lrpcli.explainer.runtime import resolve_device  # lazy: keeps torch out of lrpcli merge

        wanted = run_device.strip().lower()
        if wanted in ("auto", "cuda"):
            resolve_device(wanted)  # a clear error for ``cuda`` without a GPU
            if torch.cuda.is_available():
                count = torch.cuda.device_count()
                if self.local_rank >= count:
                    raise DataError(f"LOCAL_RANK {self.local_rank} has no GPU: this machine has {count}; start "
                                    f"at most {count} processes per node (torchrun --nproc-per-node {count})")
                return torch.device(f"cuda:{self.local_rank}")
            return torch.device("cpu")
        return resolve_device(wanted)

    def check_file(self, path: Path, total: int, batch_size: int) -> None:
        """Before resuming: the shard file must hold the samples this rank has now (same split)."""
        with open_results(path) as r:
            attrs = r.attrs
        if not all(name in attrs for name in SHARD_ATTRS):
            raise DataError(f"cannot resume {path}: it is not a shard of a distributed run (no shard_rank "
                            "attribute); use --overwrite to start it again")
        mine = self.attrs(total, batch_size)
        theirs = {name: int(attrs[name]) for name in SHARD_ATTRS}
        if theirs != mine:
            raise DataError(
                f"cannot resume {path}: it holds samples [{theirs['shard_start']}, {theirs['shard_stop']}) of "
                f"{theirs['shard_total']} as rank {theirs['shard_rank']} of {theirs['shard_world_size']} with "
                f"batch size {theirs['shard_batch_size']}, but this run gives rank {self.rank} of "
                f"{self.world_size} samples [{mine['shard_start']}, {mine['shard_stop']}) of {total} with batch "
                f"size {batch_size}; resume with the same number of processes, --batch-size and --max-samples, "
                "or use --overwrite")


def from_env(output: str | os.PathLike, environ: Any = None) -> Shard | None:
    """The rank of this process from torchrun's environment, or None for an ordinary one-process run."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise DataError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                        f"LOCAL_RANK={env.get('LOCAL_RANK')!r}: expected integers") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DataError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if world == 1:
        return None
    return Shard(rank, world, local_rank, shard_path(output, rank), grouped="MASTER_ADDR" in env)


# ------------------------------------------------------------------------------------------- explain
@dataclass
class DistributedSummary:
    """What one rank did, and on rank 0 what the whole run did."""

    shard: Shard
    output: Path
    run: Any = None  # this rank's RunSummary (None when the output was already complete)
    ranks: list[dict] = field(default_factory=list)
    merged: MergeSummary | None = None
    already_complete: bool = False

    def lines(self) -> list[str]:
        s = self.shard
        if self.already_complete:
            return [f"rank {s.rank}/{s.world_size}: {self.output} is already complete; nothing to do"]
        out = [f"rank {s.rank}/{s.world_size}: " + (self.run.line() if self.run.rows or self.run.path.exists()
                                                    else "no samples in this rank's share")]
        if self.ranks:
            rows = sum(r["rows"] - r["resumed_from"] for r in self.ranks)
            seconds = max(r["seconds"] for r in self.ranks)
            rate = rows / seconds if seconds > 0 else 0.0
            out.append(f"all {len(self.ranks)} ranks: explained {rows} samples in {seconds:.1f} s "
                       f"({rate:.1f} images/s)")
        if self.merged is not None:
            out.append(self.merged.line())
        elif not s.grouped:
            out.append(f"rank {s.rank} ran alone; when every shard is complete, join them with: "
                       f"lrpcli merge {str(shard_path(self.output, 0)).replace('.rank00000', '.rank*')} "
                       f"-o {self.output}")
        return out


def run_rank(config: Any, data: str | Path, shard: Shard, *, resume: bool = False, overwrite: bool = False,
             merge_shards: bool = True, progress: bool | None = None) -> DistributedSummary:
    """One rank's part of a distributed ``lrpcli explain``: its shard, the barrier, and on rank 0 the merge."""
    from lrpcli.runner.local import run as run_shard  # lazy: keeps torch out of lrpcli merge

    output = Path(config.output.path)
    if resume and overwrite:
        raise LrpcliError("--resume and --overwrite exclude each other")
    if os.path.lexists(output):
        if resume:
            try:
                with open_results(output) as r:
                    complete = r.complete
            except DataError:
                complete = False
            if complete:
                return DistributedSummary(shard, output, already_complete=True)
            raise DataError(f"{output} exists but is not a complete result; --resume continues the shards "
                            f"({shard_path(output, 0).name} ...), so move it away or use --overwrite")
        if not overwrite:
            raise DataError(f"{output} exists; pass --resume to continue it or --overwrite to replace it")
    if progress is None and shard.rank != 0:
        progress = False  # one progress bar (rank 0's) on a shared terminal

    device = shard.device(config.run.device)
    group = _init_group(device) if shard.grouped else None
    try:
        summary = run_shard(config, data, resume=resume, overwrite=overwrite, progress=progress, shard=shard)
        result = DistributedSummary(shard, output, run=summary)
        if group is None:
            return result
        mine = {"rank": shard.rank, "path": str(summary.path), "written": summary.path.exists(),
                "rows": summary.rows, "resumed_from": summary.resumed_from, "seconds": summary.seconds}
        ranks = _gather(mine, shard)
        if shard.rank != 0:
            return result
        result.ranks = ranks
        shards = [Path(r["path"]) for r in ranks if r["written"]]
        if not shards:
            raise DataError(f"no rank wrote a shard for {output}; nothing to merge")
        result.merged = merge(shards, output, overwrite=True, virtual=not merge_shards)
        return result
    finally:
        if group is not None:
            _destroy_group()


def _init_group(device: Any) -> Any:
    """The default process group from torchrun's environment: nccl for CUDA ranks, gloo for CPU ones."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RunError("this torch build has no torch.distributed; run the ranks alone (RANK/WORLD_SIZE "
                       "without MASTER_ADDR) and join them with lrpcli merge")
    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=BARRIER_TIMEOUT)
    except (RuntimeError, ValueError) as err:
        raise RunError(f"cannot join the process group ({backend}): {' '.join(str(err).split())[:300]}") from None
    return dist.group.WORLD


def _gather(mine: dict, shard: Shard) -> list[dict]:
    """The barrier: every rank's summary, once all are done."""
    import torch.distributed as dist

    ranks: list[Any] = [None] * shard.world_size
    try:
        dist.all_gather_object(ranks, mine)
    except Exception as err:  # noqa: BLE001 - any collective failure means a peer is gone
        raise RunError(f"rank {shard.rank}: another rank failed before the end ({' '.join(str(err).split())[:200]})"
                       f"; {shard.path.name} is kept: run the same command again with --resume") from None
    return sorted(ranks, key=lambda r: r["rank"])


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
