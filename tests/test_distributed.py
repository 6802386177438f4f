"""``torchrun ... -m lrpcli explain``: 2 CPU processes with gloo equal one process bit for bit, also after one
rank is SIGKILLed and re-run alone with --resume; ``--no-merge`` virtual files; ``lrpcli merge`` and its errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from lrpcli.cli import main
from lrpcli.runner.distributed import shard_bounds, shard_path
from lrpcli.store import open_results

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "share" / "demo" / "images"
COMMON = ("--num-workers", "0", "--batch-size", "4")
ALONE = {"MASTER_ADDR": None, "MASTER_PORT": None, "LOCAL_RANK": "0", "WORLD_SIZE": "2"}


def cli(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


def explain_alone(rank: int, out: Path, *extra: str, data: Path = DEMO_DATA) -> tuple[int, str]:
    """One rank without a process group (RANK/WORLD_SIZE set, MASTER_ADDR not): its shard only."""
    return cli("explain", str(DEMO_CONFIG), str(data), "-o", str(out), *COMMON, *extra,
               env={**ALONE, "RANK": str(rank)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cwd: Path, *extra: str, data: Path = DEMO_DATA, marker: str = "", env: dict | None = None
             ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "lrpcli", "explain", str(DEMO_CONFIG), str(data), "-o", "out.h5", *COMMON, "-q", *extra]
    env = {**os.environ, "LRPCLI_TEST_MARKER": marker, **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return out.decode(errors="replace")


def assert_same_file(a: Path, b: Path) -> None:
    """Every dataset bitwise equal (values, dtype, shape, chunks, filter) and every attribute but ``created``
    equal (the config up to output.path)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names = []
        fa.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        other = []
        fb.visititems(lambda name, obj: other.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert names == other
        for name in names:
            x, y = fa[name], fb[name]
            assert (x.dtype, x.shape, x.chunks, x.compression) == (y.dtype, y.shape, y.chunks, y.compression), name
            if x.dtype.kind == "O":
                assert x[()].tolist() == y[()].tolist(), name
            else:
                assert x[()].tobytes() == y[()].tobytes(), name
        assert set(fa.attrs) == set(fb.attrs)
        for key in fa.attrs:
            if key == "config":
                ca, cb = (yaml.safe_load(str(f.attrs[key])) for f in (fa, fb))
                ca["output"].pop("path"), cb["output"].pop("path")
                assert ca == cb
            elif key != "created":
                assert str(fa.attrs[key]) == str(fb.attrs[key]), key


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs with one intra-op thread, as torchrun gives each rank (OMP_NUM_THREADS=1): on a shared
    2-core machine two OpenMP threads can be ten times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, the same batch size."""
    out = tmp_path_factory.mktemp("single") / "out.h5"
    code, text = cli("explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(out), *COMMON)
    assert code == 0, text
    return out


def test_split_covers_every_sample_once_in_whole_batches():
    for total in (1, 3, 4, 5, 63, 64, 65, 1000):
        for world in (1, 2, 3, 8):
            for batch in (1, 4, 7):
                bounds = [shard_bounds(total, world, r, batch) for r in range(world)]
                assert bounds[0][0] == 0 and bounds[-1][1] == total
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(lo <= hi and (lo % batch == 0 or lo == total) for lo, hi in bounds)
                batches = [-(-(hi - lo) // batch) for lo, hi in bounds]
                assert max(batches) - min(batches) <= 1
    assert shard_path("dir/out.h5", 3) == Path("dir/out.rank00003.h5")


def test_torchrun_two_ranks_equal_one_process(reference, tmp_path):
    out = finish(torchrun(tmp_path))
    assert (tmp_path / "out.h5").exists(), out[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]  # shards merged and removed
    assert_same_file(tmp_path / "out.h5", reference)


_BLOCKING_LOAD = """
import os
if os.environ.get("LRPCLI_TEST_BLOCK") and "RANK" in os.environ:  # a torchrun worker of the test
    import time

    import lrpcli.explainer.data

    _load = lrpcli.explainer.data.ImageDataset.load

    def load(self, path):
        while os.path.samefile(path, os.environ["LRPCLI_TEST_BLOCK"]):
            time.sleep(0.1)  # until the test kills this process
        return _load(self, path)

    lrpcli.explainer.data.ImageDataset.load = load
"""


def _blocked_data(tmp_path: Path, index: int) -> tuple[Path, dict]:
    """The demo images as symlinks, and the environment under which torchrun's workers block on reading image
    ``index`` (a sitecustomize hook; a FIFO in DATA no longer blocks, the scan leaves it out)."""
    data = tmp_path / "data"
    files = sorted(p.relative_to(DEMO_DATA) for p in DEMO_DATA.rglob("*.png"))
    for rel in files:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).symlink_to(DEMO_DATA / rel)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_BLOCKING_LOAD)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return data, {"PYTHONPATH": path, "LRPCLI_TEST_BLOCK": str(data / files[index])}


def _rows(path: Path) -> tuple[int, bool]:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["rows_written"]), bool(f.attrs["complete"])
    except (OSError, KeyError):
        return -1, False


def _pid_of_rank(marker: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LRPCLI_TEST_MARKER={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_sigkill_one_rank_resume_it_alone_and_merge_by_hand(reference, tmp_path):
    # rank 1 explains samples [48, 96); sample 58 blocks it after two committed batches of 4
    data, blocking = _blocked_data(tmp_path, 58)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = uuid.uuid4().hex
    proc = torchrun(run_dir, data=data, marker=marker, env=blocking)
    shard0, shard1 = run_dir / "out.rank00000.h5", run_dir / "out.rank00001.h5"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if _rows(shard1)[0] >= 8 and _rows(shard0)[1]:
                break
            time.sleep(0.2)
        pid = _pid_of_rank(marker, 1)
        assert pid is not None and proc.poll() is None, finish(proc, 5)[-3000:]
        os.kill(pid, signal.SIGKILL)  # a real kill of the rank, in the middle of its shard
        text = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, text[-3000:]
    assert not (run_dir / "out.h5").exists()
    assert _rows(shard0) == (48, True) and _rows(shard1) == (8, False)

    code, text = cli("merge", str(shard0), str(shard1), "-o", str(run_dir / "out.h5"))
    assert code == 2 and "incomplete" in text and "RANK=1" in text and not (run_dir / "out.h5").exists(), text

    out = run_dir / "out.h5"
    code, text = explain_alone(1, out, "--resume", data=data)
    assert code == 0, text
    code, text = explain_alone(0, out, "--resume", data=data)  # a complete shard: nothing to do
    assert code == 0 and "merge" in text, text
    assert _rows(shard1) == (48, True)

    code, text = cli("merge", str(shard0), str(shard1), "-o", str(out))
    assert code == 0 and "merged 2 shards: 96 rows" in text, text
    assert not shard0.exists() and not shard1.exists()
    assert_same_file(out, reference)


def test_no_merge_virtual_file_then_merge_by_hand_and_merge_errors(reference, tmp_path):
    text = finish(torchrun(tmp_path, "--no-merge"))
    out, shard0, shard1 = tmp_path / "out.h5", tmp_path / "out.rank00000.h5", tmp_path / "out.rank00001.h5"
    assert out.exists() and shard0.exists() and shard1.exists(), text[-3000:]
    with h5py.File(out, "r") as f:
        assert f["attribution"].is_virtual and f["filename"].is_virtual
    moved = tmp_path / "moved"  # sources are named relative to the virtual file: the set can move
    moved.mkdir()
    for p in (out, shard0, shard1):
        shutil.copy(p, moved / p.name)
    with open_results(moved / "out.h5") as v, open_results(reference) as r:
        assert v.complete and len(v) == 96
        assert v.filename == r.filename and np.array_equal(v.index, r.index)
        for name in ("attribution", "prediction", "label", "target", "input", "conservation/relevance_in"):
            assert v.read(name).tobytes() == r.read(name).tobytes(), name
        assert v.conservation["layer"] == r.conservation["layer"]
        assert v.classes == r.classes == ["circle", "cross", "square", "triangle"]
        assert v.config_dir == r.config_dir == str(DEMO_CONFIG.parent)

    merged = tmp_path / "merged.h5"
    other = tmp_path / "other.rank00001.h5"
    shutil.copy(shard1, other)
    with h5py.File(other, "r+") as f:
        f.attrs["config"] = str(f.attrs["config"]).replace("gamma: 0.25", "gamma: 0.5")
    renamed = tmp_path / "renamed.rank00001.h5"
    shutil.copy(shard1, renamed)
    with h5py.File(renamed, "r+") as f:
        f.attrs["classes"] = np.array(["circle", "cross", "square", "star"], dtype=object)
    duplicate = tmp_path / "copy.rank00001.h5"
    shutil.copy(shard1, duplicate)
    for shards, needle in (((shard0,), "missing shard: rank 1"), ((shard0, shard1, duplicate), "duplicate shard"),
                           ((shard0, other), "composite.gamma"), ((shard0, renamed), "different classes"),
                           ((shard0, tmp_path / "nope.h5"), "nope.h5"),
                           ((reference, shard1), "not a shard")):
        code, text = cli("merge", *map(str, shards), "-o", str(merged))
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("lrpcli: error:") and needle in lines[0], text
        assert not merged.exists() and shard0.exists() and shard1.exists()

    code, text = cli("merge", str(shard1), str(shard0), "-o", str(merged))  # any order: merged by rank
    assert code == 0, text
    assert not shard0.exists() and not shard1.exists()
    assert_same_file(merged, reference)


def test_more_ranks_than_batches_and_resume_of_a_complete_run(tmp_path):
    out = tmp_path / "out.h5"
    code, text = explain_alone(1, out, "--max-samples", "3")  # one batch: rank 1 has nothing to do
    assert code == 0 and "no samples" in text and not shard_path(out, 1).exists(), text
    code, text = explain_alone(0, out, "--max-samples", "3")
    assert code == 0, text
    code, text = cli("merge", str(shard_path(out, 0)))  # the output name comes from the shard's
    assert code == 0 and out.exists(), text
    with open_results(out) as r:
        assert list(r.index) == [0, 1, 2] and r.complete
    code, text = explain_alone(0, out, "--max-samples", "3", "--resume")
    assert code == 0 and "already complete" in text, text
    code, text = explain_alone(0, out, "--max-samples", "3")
    assert code == 2 and "--overwrite" in text, text
    # a shard resumed with another split is refused, naming what changed
    code, text = explain_alone(0, tmp_path / "b.h5", "--max-samples", "4")
    assert code == 0, text
    code, text = explain_alone(0, tmp_path / "b.h5", "--max-samples", "4", "--resume", "--batch-size", "2")
    assert code == 2 and "batch size" in text, text


def test_skipped_images_merge_like_one_process(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((70, 70, 3), 40 * i + 60 * (cls == "b"), np.uint8)).save(data / cls / f"{i}.png")
    (data / "a" / "broken.png").write_bytes(b"not a png")  # index 2, in rank 0's share [0, 4)
    single, out = tmp_path / "single.h5", tmp_path / "out.h5"
    code, text = cli("explain", str(DEMO_CONFIG), str(data), "-o", str(single), "--num-workers", "0",
                     "--batch-size", "2")
    assert code == 0, text
    for rank in (1, 0):
        code, text = explain_alone(rank, out, "--batch-size", "2", data=data)
        assert code == 0, text
    code, text = cli("merge", str(shard_path(out, 0)), str(shard_path(out, 1)), "-o", str(out))
    assert code == 0 and "1 skipped" in text, text
    assert_same_file(out, single)
    with open_results(out) as r:
        assert r.skipped[0][0] == "a/broken.png"
