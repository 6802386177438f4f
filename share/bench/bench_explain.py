"""The ``explain`` pipeline end to end against attribution alone.

End to end is ``lrpcli.runner.local.run`` (what ``lrpcli explain`` runs): DataLoader workers (with
``run.num_workers`` 0, which ``auto`` gives on the CPU: a reader thread, or the main process between batches
where no core is free for a thread) decode and preprocess, the model and composite attribute each batch with the
per-layer conservation recorder, and the batch is appended to the HDF5 file (by a writer thread where a core is
free for it); ``RunSummary.seconds`` covers all of it (the model load only is outside). Attribution alone is the
same model, composite, canonizers, batches and targets on tensors decoded beforehand, in a fresh context per
pass (as ``explain`` makes one per run), with no recorder and no writing. End-to-end and attribution-only
passes alternate, so both see the same machine load.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from benchlib import log, median, timed

import lrpcli
from lrpcli.engine.recorder import Recorder
from lrpcli.explainer.build import composite_kwargs, load_config
from lrpcli.explainer.data import ImageDataset, make_loader
from lrpcli.explainer.models import load_model
from lrpcli.explainer.runtime import resolve_num_workers
from lrpcli.runner.local import run as explain

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "share" / "demo" / "images"


@dataclass
class PipelineResult:
    name: str
    images: int
    batch: int
    workers: str  # run.num_workers as resolved for the run, e.g. "2" or "auto: 0"
    end_to_end: list[float]  # seconds per pass
    attribution: list[float]
    stats_images: int = 0  # diagnostic: attribution + conservation recorder on the first batches
    stats_seconds: float = 0.0
    stats_base: float = 0.0  # attribution alone on the same batches, right before

    @property
    def e2e_rate(self) -> float:
        return self.images / median(self.end_to_end)

    @property
    def attr_rate(self) -> float:
        return self.images / median(self.attribution)

    @property
    def share(self) -> float:
        return self.e2e_rate / self.attr_rate

    @property
    def stats_cost(self) -> float:
        """Extra time of the conservation recorder, relative to attribution alone."""
        return self.stats_seconds / self.stats_base - 1.0


def make_image_folder(root: Path, n: int, size: int = 256, classes: int = 4, seed: int = 0) -> Path:
    """``n`` JPEG images of ``size`` x ``size`` in ``classes`` class folders: smooth shapes plus noise, so
    they decode and compress like photographs rather than like pure noise or flat colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.random(3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.1 + 0.3 * r) ** 2).astype(np.float32)
        base = rng.integers(0, 256, 3) * (1 - blob[..., None]) + rng.integers(0, 256, 3) * blob[..., None]
        shade = (yy * 60 + xx * 40)[..., None]
        img = np.clip(base + shade + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:04d}.jpg", quality=90)
    return root


def synthetic_config(path: Path, batch: int) -> Path:
    """torchvision resnet50 with a seeded random init, epsilon_gamma_box, ImageNet preprocessing."""
    config = {
        "model": {"name": "resnet50"},
        "input": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "mode": "RGB"},
        "canonizers": ["resnet"],
        "composite": {"name": "epsilon_gamma_box", "epsilon": 1.0e-6, "gamma": 0.25, "low": "auto", "high": "auto"},
        "attribution": {"method": "lrp", "target": "label"},
        "run": {"batch_size": batch, "num_workers": "auto", "device": "auto"},
        "output": {"path": "synthetic.h5", "dtype": "float32", "store_input": True},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _preload(config, data: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    inp = config.input
    dataset = ImageDataset(data, resize=inp.resize, crop=inp.crop, mean=list(inp.mean), std=list(inp.std),
                           mode=inp.mode)
    stop = len(dataset) if config.run.max_samples is None else min(len(dataset), config.run.max_samples)
    loader = make_loader(dataset, batch_size=config.run.batch_size, num_workers=0, stop=stop)
    return [(c.batch.inputs, c.batch.labels) for c in loader if len(c.batch)]


def _attribution_pass(config, model, batches, device: torch.device, stats: bool = False) -> float:
    """Seconds for one pass over preloaded batches, in a fresh context, moving each batch to the device.

    ``stats``: with the conservation recorder ``explain`` uses (per-layer relevance sums), as a diagnostic.
    """
    if config.attribution.target != "label":
        raise ValueError("the benchmark configs explain the label")
    comp = lrpcli.composites.get(config.composite.name, **composite_kwargs(config))

    def work() -> None:
        recorder = Recorder([]) if stats else None
        with comp.context(model, recorder=recorder) as m:
            for inputs, labels in batches:
                x = inputs.to(device, non_blocking=True).requires_grad_(True)
                out = m(x)
                seed = lrpcli.initial_relevance(out, labels.to(device), comp.seed)
                (r,) = torch.autograd.grad(out, x, seed)
                if recorder is not None:
                    recorder.table()
                del r, out

    return timed(work, device)[0]


def bench_pipeline(name: str, config_path: Path, data: Path, device: torch.device, repeats: int,
                   overrides: dict | None = None, warmup_samples: int = 16, stats_images: int = 64) -> PipelineResult:
    with tempfile.TemporaryDirectory() as tmp:
        over = {"output.path": str(Path(tmp) / "bench.h5"), "run.device": device.type, **(overrides or {})}
        config = load_config(config_path, over)
        warm = load_config(config_path, {**over, "run.max_samples": warmup_samples})
        log(f"explain {name}: warm-up on {warmup_samples} samples")
        explain(warm, data, overwrite=True, progress=False)
        batches = _preload(config, data)
        images = sum(len(labels) for _, labels in batches)
        model = load_model(config).to(device)
        e2e, attr = [], []
        for i in range(repeats):
            summary = explain(config, data, overwrite=True, progress=False)
            if summary.rows != images:
                raise RuntimeError(f"explain wrote {summary.rows} rows, expected {images}")
            e2e.append(summary.seconds)
            attr.append(_attribution_pass(config, model, batches, device))
            log(f"explain {name} pass {i + 1}/{repeats}: end to end {images / e2e[-1]:.1f} img/s, "
                f"attribution alone {images / attr[-1]:.1f} img/s")
        workers = resolve_num_workers(config.run.num_workers, samples=images, batch_size=config.run.batch_size,
                                      device=device)
        shown = f"{config.run.num_workers}: {workers}" if config.run.num_workers == "auto" else str(workers)
        result = PipelineResult(name, images, config.run.batch_size, shown, e2e, attr)
        # diagnostic, not a target: what the conservation recorder alone costs (on at most stats_images images)
        subset = batches[: max(1, -(-stats_images // config.run.batch_size))]
        result.stats_images = sum(len(labels) for _, labels in subset)
        result.stats_base = _attribution_pass(config, model, subset, device)
        result.stats_seconds = _attribution_pass(config, model, subset, device, stats=True)
        log(f"explain {name}: conservation recorder costs {result.stats_cost:+.0%} on {result.stats_images} images")
        return result


def bench_demo(device: torch.device, repeats: int, batch: int | None = None) -> PipelineResult:
    over = {"run.batch_size": batch} if batch else {}
    return bench_pipeline("demo", DEMO_CONFIG, DEMO_DATA, device, repeats, over)


def bench_synthetic(device: torch.device, repeats: int, images: int, batch: int, stats_images: int = 64
                    ) -> PipelineResult:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log(f"explain synthetic: writing {images} JPEGs 256x256 in 4 class folders")
        data = make_image_folder(root / "images", images)
        config = synthetic_config(root / "synthetic.yaml", batch)
        return bench_pipeline(f"synthetic ImageFolder ({images} img)", config, data, device, repeats,
                              warmup_samples=2 * batch, stats_images=stats_images)
