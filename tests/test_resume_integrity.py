"""Data integrity of ``explain`` runs: a random init reproducible from run.seed, ``--resume`` refusing another
model, batch size or data set, bad inputs refused before any row, two runs on one output, SIGTERM, threads and
the progress messages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main
from lrpcli.errors import DataError
from lrpcli.explainer.build import load_config
from lrpcli.store import ResultWriter, open_results

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "share" / "demo" / "images"
BASE = DEMO_CONFIG.read_text().replace("../share", str(ROOT / "share"))
RANDOM_INIT = BASE.replace(f"  weights: {ROOT / 'share'}/demo/model.pt\n", "")


def _config(tmp_path: Path, text: str = BASE, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def explain(out: Path, *extra: str, config: Path = DEMO_CONFIG, data: Path = DEMO_DATA) -> tuple[int, str, str]:
    return run("explain", str(config), str(data), "-o", str(out), "--num-workers", "0", "-q", *extra)


def _one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrpcli: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------ reproducible random init
_REPEAT = """
import json, sys
from lrpcli.explainer.build import load_config
from lrpcli.runner.local import run as explain
from lrpcli.store import open_results
config, out = sys.argv[1], sys.argv[2]
rows = []
for i in range(3):
    path = f"{out}.{i}.h5"
    explain(load_config(config, {"output.path": path, "run.max_samples": 8, "run.batch_size": 4,
                                 "run.num_workers": 0}), sys.argv[3], progress=False)
    with open_results(path) as r:
        rows.append([r.attrs["model_fingerprint"], r.prediction.tolist()])
print(json.dumps(rows))
"""



def wait_for_rows(proc: subprocess.Popen, out: Path, rows: int, timeout: float = 120) -> None:
    """Until the run writing ``out`` has committed ``rows`` rows (or ended, or the timeout passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        try:
            with h5py.File(out, "r", locking=False) as f:
                if int(f.attrs["rows_written"]) >= rows:
                    return
        except (OSError, KeyError):
            continue

def test_random_init_is_the_same_model_in_six_runs_with_one_and_two_threads(tmp_path):
    """Three runs in each of two processes (OMP_NUM_THREADS 1 and 2): one model, the same predictions."""
    config = _config(tmp_path, RANDOM_INIT)
    procs = {}
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
        procs[threads] = subprocess.Popen([sys.executable, "-c", _REPEAT, str(config), str(tmp_path / threads),
                                           str(DEMO_DATA)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for threads, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        results[threads] = json.loads(out)
    fingerprints = {fp for rows in results.values() for fp, _ in rows}
    assert len(fingerprints) == 1, fingerprints
    for threads, rows in results.items():
        assert all(pred == rows[0][1] for _, pred in rows), f"OMP_NUM_THREADS={threads}"
    np.testing.assert_allclose(results["1"][0][1], results["2"][0][1], rtol=1e-5, atol=1e-6)


def test_model_is_built_before_any_loader_and_the_global_generator_is_untouched(tmp_path, monkeypatch):
    """The cause of the mixed models: no reader thread may exist while the model is seeded and built, and the
    loader draws its seeds from its own generator."""
    import lrpcli.explainer.models

    seen = []
    original = lrpcli.explainer.models.load_model

    def load_model(*args, **kwargs):
        seen.append(sorted(t.name for t in threading.enumerate()))
        return original(*args, **kwargs)

    monkeypatch.setattr(lrpcli.explainer.models, "load_model", load_model)
    import lrpcli.runner.local

    monkeypatch.setattr(lrpcli.runner.local, "background_threads_help", lambda device: True)  # the reader thread
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    config = load_config(_config(tmp_path, RANDOM_INIT), {"output.path": str(tmp_path / "o.h5"),
                                                          "run.max_samples": 8, "run.num_workers": 0})
    lrpcli.runner.local.run(config, DEMO_DATA, progress=False)
    assert len(seen) == 1 and "lrpcli-reader" not in seen[0]
    assert torch.equal(torch.get_rng_state(), state)


def test_sigkill_at_a_random_row_then_resume_gives_rows_from_one_model(tmp_path):
    config = _config(tmp_path, RANDOM_INIT)
    reference = tmp_path / "ref.h5"
    assert explain(reference, "--batch-size", "4", "--max-samples", "32", config=config)[0] == 0
    out = tmp_path / "killed.h5"
    kill_at = random.Random().randrange(4, 29)
    cmd = [sys.executable, "-m", "lrpcli.cli", "explain", str(config), str(DEMO_DATA), "-o", str(out),
           "--batch-size", "4", "--max-samples", "32", "--num-workers", "0", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_for_rows(proc, out, kill_at)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    code, _, err = explain(out, "--resume", "--batch-size", "4", "--max-samples", "32", config=config)
    assert code == 0, err
    with open_results(out) as a, open_results(reference) as b:
        assert a.complete and len(a) == 32 and a.filename == b.filename
        assert a.attrs["model_fingerprint"] == b.attrs["model_fingerprint"]
        np.testing.assert_array_equal(a.prediction, b.prediction, err_msg=f"killed at row {kill_at}")


# ------------------------------------------------------------------------------------------ resume refusals
@pytest.fixture
def partial(tmp_path) -> Path:
    """An unfinished file: 8 of 16 rows of the demo, batch size 4, written by a copy of the demo weights."""
    weights = tmp_path / "w.pt"
    weights.write_bytes((ROOT / "share" / "demo" / "model.pt").read_bytes())
    config = _config(tmp_path, BASE.replace(str(ROOT / "share" / "demo" / "model.pt"), str(weights)))
    out = tmp_path / "p.h5"
    assert explain(out, "--batch-size", "4", "--max-samples", "8", config=config)[0] == 0
    with h5py.File(out, "r+") as f:  # as if killed before closing
        f.attrs["complete"] = np.bool_(False)
    text = config.read_text().replace("batch_size: 16", "batch_size: 4")
    config.write_text(text.replace("  device: auto", "  device: auto\n  max_samples: 8"))
    return out


def test_resume_refuses_another_model(partial, tmp_path):
    state = torch.load(tmp_path / "w.pt")
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, tmp_path / "w.pt")
    code, _, err = explain(partial, "--resume", config=tmp_path / "c.yaml")
    assert code == 2
    _one_error_line(err, f"cannot resume {partial}: the model is not the one that wrote its rows")


def test_resume_refuses_another_batch_size_and_accepts_other_threads(partial, tmp_path):
    code, _, err = explain(partial, "--resume", "--batch-size", "8", config=tmp_path / "c.yaml")
    assert code == 2
    _one_error_line(err, "run.batch_size: 4 in the file, 8 now")
    code, _, err = explain(partial, "--resume", "--threads", "1", config=tmp_path / "c.yaml")
    assert code == 0, err


def test_resume_refuses_another_data_folder_of_the_same_size(tmp_path):
    data = {}
    for name in ("one", "two"):
        data[name] = tmp_path / name
        for cls in ("a", "b"):
            (data[name] / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((70, 70, 3), 30 * i, np.uint8)).save(data[name] / cls / f"{name}{i}.png")
    out = tmp_path / "o.h5"
    assert explain(out, "--batch-size", "4", data=data["one"])[0] == 0
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = np.bool_(False)
        f.attrs["rows_written"] = np.int64(4)
    code, _, err = explain(out, "--resume", "--batch-size", "4", data=data["two"])
    assert code == 2
    _one_error_line(err, "row 0 is 'a/one0.png' (sample 0 of DATA), but", "lists 'a/two0.png' there")
    code, _, err = explain(out, "--resume", "--batch-size", "4", data=data["one"])
    assert code == 0, err


def test_resume_and_overwrite_together_are_refused(partial, tmp_path):
    before = partial.read_bytes()
    code, _, err = explain(partial, "--resume", "--overwrite", config=tmp_path / "c.yaml")
    assert code == 2
    _one_error_line(err, "--resume and --overwrite exclude each other")
    assert partial.read_bytes() == before


def test_resume_of_a_complete_file_says_so(tmp_path):
    out = tmp_path / "o.h5"
    assert explain(out, "--max-samples", "4")[0] == 0
    result = CliRunner().invoke(main, ["explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(out), "--resume",
                                       "--max-samples", "4", "--num-workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"already complete: 4 rows in {out}"


# ------------------------------------------------------------------------- bad input: one line, no row written
def _classes(tmp_path: Path, n: int) -> Path:
    data = tmp_path / "data"
    for c in range(n):
        (data / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((70, 70, 3), 40 * c, np.uint8)).save(data / f"c{c}" / "x.png")
    return data


@pytest.mark.parametrize("case", ["five classes", "target 7", "target 99", "mode L", "huge batch"])
def test_bad_input_is_one_line_before_any_row(case, tmp_path):
    config, data, extra = DEMO_CONFIG, DEMO_DATA, ["--max-samples", "4"]
    if case == "five classes":
        data, needle = _classes(tmp_path, 5), "has 5 class folders but the model has 4 outputs"
    elif case.startswith("target"):
        index = case.split()[1]
        config = _config(tmp_path, BASE.replace("target: label", f"target: {index}"))
        needle = f"attribution.target: {index} is out of range for a model with 4 outputs"
    elif case == "mode L":
        config = _config(tmp_path, BASE.replace("mode: RGB", "mode: L").replace("[0.5, 0.5, 0.5]", "[0.5]")
                         .replace("[0.25, 0.25, 0.25]", "[0.25]"))
        needle = "input.mode: L, 1 channels"
    else:
        extra, needle = ["--batch-size", str(10**30)], "--batch-size"
    out = tmp_path / "o.h5"
    code, stdout, err = explain(out, *extra, config=config, data=data)
    assert code == 2, err
    assert "Traceback" not in stdout + err
    assert needle in err.splitlines()[-1] and err.splitlines()[-1].startswith(("lrpcli: error:", "Error:"))
    assert not out.exists()


def test_missing_weights_path_is_named_in_full(tmp_path):
    far = tmp_path / ("a-rather-long-folder-name-" * 4) / "weights-that-are-not-there.pt"
    config = _config(tmp_path, BASE.replace(str(ROOT / "share" / "demo" / "model.pt"), str(far)))
    code, _, err = explain(tmp_path / "o.h5", config=config)
    assert code == 2
    _one_error_line(err, repr(str(far)))


# ------------------------------------------------------------------------------ two runs, SIGTERM, threads
def test_creation_lock_refuses_a_second_writer(tmp_path):
    import fcntl

    out = tmp_path / "o.h5"
    fd = os.open(str(out) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(DataError, match="is being written by another process"):
            ResultWriter.create(out, config={}, config_yaml="{}", n_rows=1, num_outputs=2, sample_shape=(1, 2, 2),
                                layers=[], rules=[])
    finally:
        os.close(fd)
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    ResultWriter.create(out, config={}, config_yaml="{}", n_rows=1, num_outputs=2, sample_shape=(1, 2, 2),
                        layers=[], rules=[]).close(complete=False)
    assert out.exists() and not Path(str(out) + ".lock").exists()


def test_two_runs_started_together_on_one_output_one_wins(tmp_path):
    out = tmp_path / "o.h5"
    cmd = [sys.executable, "-m", "lrpcli.cli", "explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(out),
           "--max-samples", "4", "--batch-size", "4", "--num-workers", "0", "-q"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "being written by another process" in loser or "exists; pass --resume" in loser, loser
    assert len(loser.strip().splitlines()) == 1
    with open_results(out) as r:
        assert r.complete and len(r) == 4


def test_sigterm_says_what_ctrl_c_says(tmp_path):
    out = tmp_path / "o.h5"
    cmd = [sys.executable, "-m", "lrpcli.cli", "explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(out),
           "--batch-size", "2", "--num-workers", "0", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_for_rows(proc, out, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.decode().strip() == (f"lrpcli: error: interrupted; the rows written so far are kept in {out}: run "
                                    "again with --resume to continue")
    with open_results(out) as r:
        assert not r.complete and len(r) >= 4


def test_threads_apply_to_the_run_and_the_sigterm_handler_is_restored(tmp_path, monkeypatch):
    import lrpcli.runner.local

    seen = []
    original = lrpcli.runner.local._attribute_batch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(lrpcli.runner.local, "_attribute_batch", spy)
    before_threads, before_handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    want = 1 if before_threads != 1 else 2
    config = load_config(DEMO_CONFIG, {"output.path": str(tmp_path / "o.h5"), "run.max_samples": 4,
                                       "run.threads": want, "run.num_workers": 0})
    lrpcli.runner.local.run(config, DEMO_DATA, progress=False)
    assert seen == [want]
    assert torch.get_num_threads() == before_threads and signal.getsignal(signal.SIGTERM) is before_handler
    code, _, err = explain(tmp_path / "x.h5", "--threads", "0")
    assert code == 2 and "--threads" in err


def test_progress_shows_loading_and_one_rate_and_the_time_includes_start_up(tmp_path, monkeypatch, capsys):
    import lrpcli.explainer.models
    import lrpcli.runner.local

    original = lrpcli.explainer.models.load_model

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(lrpcli.explainer.models, "load_model", slow)
    config = load_config(DEMO_CONFIG, {"output.path": str(tmp_path / "o.h5"), "run.max_samples": 4,
                                       "run.num_workers": 0})
    summary = lrpcli.runner.local.run(config, DEMO_DATA, progress=True)
    err = capsys.readouterr().err
    assert "lrpcli: loading model ../share/demo/model.py:build ..." in err
    assert "img/s" in err and "images/s" not in err
    assert summary.seconds >= 0.5
