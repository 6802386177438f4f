"""Region perturbation speed: ``lrpcli evaluate``'s batched forwards against a naive per-sample loop.

Both compute the same MoRF and LeRF curves (checked to agree) on the same inputs, in the same process:
- batched: ``lrpcli.commands.evaluate.perturb.perturbation_curves``, perturbed copies of many samples per forward, batch
  size from the memory budget (``auto_batch_size``) unless ``--batch-size``;
- naive: per sample and order, patches replaced one by one by slicing, one image per forward (the loop a
  metrics library runs).

Cases: the demo (share/demo model and images, 64 x 64, patch 8: 65 steps) and torchvision resnet50 with random
weights (224 x 224, patch 16, 100 steps; few samples, the naive loop is slow). Relevance maps are seeded
random: the work does not depend on them.

    .venv/bin/python share/bench/bench_evaluate.py [--device cpu|cuda] [--demo-n 16] [--resnet-n 2]
                                                   [--only demo,resnet50] [--batch-size N] [--naive-n N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lrpcli.commands.evaluate import metrics as M  # noqa: E402
from lrpcli.commands.evaluate.perturb import auto_batch_size, perturbation_curves  # noqa: E402
from lrpcli.commands.evaluate.run import _budget, pixel_ranks  # noqa: E402

TARGET = 10.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_curves(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, rel: np.ndarray, patch: int,
                 steps: int) -> np.ndarray:
    """``N x 2 x (steps + 1)``: one forward per perturbed image, replacement 0 (the mean after normalisation)."""
    n, _, h, w = x.shape
    boxes = [(i, j) for i in range(0, h, patch) for j in range(0, w, patch)]
    out = np.zeros((n, 2, steps + 1))
    with torch.no_grad():
        for s in range(n):
            sums = [rel[s, i:i + patch, j:j + patch].sum() for i, j in boxes]
            for o, most_first in enumerate((True, False)):
                order = sorted(range(len(boxes)), key=lambda p: (-sums[p] if most_first else sums[p], p))
                img = x[s:s + 1].clone()
                for k in range(steps + 1):
                    if k:
                        i, j = boxes[order[k - 1]]
                        img[:, :, i:i + patch, j:j + patch] = 0.0
                    out[s, o, k] = float(model(img)[0, targets[s]])
    return out


def batched_curves(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, rel: np.ndarray, patch: int,
                   steps: int, batch_size: int) -> np.ndarray:
    ids = M.patch_ids(x.shape[2], x.shape[3], patch)
    ranks = torch.from_numpy(pixel_ranks(rel, ids)).to(x.device)
    morf, lerf = perturbation_curves(model, x, torch.zeros_like(x), targets, ranks, steps, batch_size=batch_size)
    return torch.stack([morf, lerf], 1).double().cpu().numpy()


def case(name: str, model: torch.nn.Module, x: torch.Tensor, patch: int, steps: int, device: torch.device,
         batch_size: int | None, naive_n: int | None = None) -> dict:
    """Time both ways (one warm-up forward each); returns the figures and the largest disagreement.

    The naive loop runs on the first ``naive_n`` samples only (default all): its time per sample is what is
    compared, and on a large model it is slow."""
    n = len(x)
    rel = np.random.default_rng(0).normal(size=(n, x.shape[2], x.shape[3]))
    with torch.no_grad():
        targets = model(x[:1]).argmax(1).repeat(n)
    bs = batch_size or auto_batch_size(model, x[:1], _budget(device))
    batched_curves(model, x[:1], targets[:1], rel[:1], patch, 1, bs)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    fast = batched_curves(model, x, targets, rel, patch, steps, bs)
    sync(device)
    t_fast = time.perf_counter() - t0
    naive_curves(model, x[:1], targets[:1], rel[:1], patch, 1)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    m = n if naive_n is None else max(1, min(n, naive_n))
    slow = naive_curves(model, x[:m], targets[:m], rel[:m], patch, steps)
    sync(device)
    t_slow = time.perf_counter() - t0
    scale = max(1.0, float(np.abs(slow).max()))
    return {"case": name, "n": n, "naive_n": m, "forwards": n * 2 * (steps + 1), "batch": bs,
            "fast_rate": n / t_fast, "slow_rate": m / t_slow, "diff": float(np.abs(fast[:m] - slow).max()) / scale}


def demo_case(n: int, device: torch.device, batch_size: int | None, naive_n: int | None) -> dict:
    from lrpcli.explainer.build import load_config
    from lrpcli.explainer.data import open_image_folder
    from lrpcli.explainer.models import load_model

    config = load_config(ROOT / "configs" / "demo.yaml")
    model = load_model(config).to(device)
    data = open_image_folder(ROOT / "share" / "demo" / "images", config.input)
    x = torch.stack([data[i].input for i in range(0, len(data), max(1, len(data) // n))][:n]).to(device)
    return case("demo (64x64, patch 8)", model, x, 8, 64, device, batch_size, naive_n)


def resnet_case(n: int, device: torch.device, batch_size: int | None, naive_n: int | None) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    return case("resnet50 (224x224, patch 16)", model, x, 16, 100, device, batch_size, naive_n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--demo-n", type=int, default=16)
    p.add_argument("--resnet-n", type=int, default=2)
    p.add_argument("--only", default="demo,resnet50")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--naive-n", type=int, default=None,
                   help="samples for the naive loop (default: all); the ratio compares samples per second")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    from lrpcli.explainer.allocator import keep_freed_memory

    keep_freed_memory()
    only = args.only.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"region perturbation (MoRF + LeRF), {name}")
    print(f"{'case':30s} {'samples':>7s} {'forwards':>8s} {'batch':>5s} {'batched/s':>10s} {'naive/s':>9s} "
          f"{'ratio':>6s} {'target':>7s} {'max rel diff':>12s}", flush=True)
    cases = {"demo": (demo_case, args.demo_n), "resnet50": (resnet_case, args.resnet_n)}
    for key in ("demo", "resnet50"):
        if key in only:
            fn, n = cases[key]
            row(fn(n, device, args.batch_size, args.naive_n))


def row(r: dict) -> None:
    """One line of the table, printed as soon as its case is done."""
    ratio = r["fast_rate"] / r["slow_rate"]
    verdict = "ok" if ratio >= TARGET else "MISS"
    print(f"{r['case']:30s} {r['n']:7d} {r['forwards']:8d} {r['batch']:5d} {r['fast_rate']:10.2f} "
          f"{r['slow_rate']:9.2f} {ratio:5.1f}x {verdict:>7s} {r['diff']:12.1e}", flush=True)


if __name__ == "__main__":
    main()
