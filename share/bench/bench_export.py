"""The exported attribution (``lrpcli.export``) and ``torch.compile`` of it against eager ``lrpcli.attribute``.

All three run the same batch in the same process, interleaved (eager, exported, compiled per repeat), so each
repeat gives a paired ratio; the figure is the median of those ratios. Cases: the demo model (share/demo, 64 x 64,
its config's composite) and torchvision resnet18 with random weights (224 x 224, epsilon_gamma_box). Capture,
export and compile are timed once each (seconds, not per batch).

    .venv/bin/python share/bench/bench_export.py [--device cpu|cuda] [--only demo,resnet18] [--batch N]
                                                 [--repeats N] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from benchlib import log, median, timed  # noqa: E402

import lrpcli  # noqa: E402

CASES = ("demo", "resnet18")


def _case(name: str) -> tuple[torch.nn.Module, Any, tuple[int, ...], int]:
    """(model, attribute keywords, image shape, classes)."""
    if name == "demo":
        from lrpcli.explainer.build import load_config
        from lrpcli.explainer.explainer import composite_from_config
        from lrpcli.explainer.models import load_model

        config = load_config(ROOT / "configs" / "demo.yaml")
        return load_model(config), {"composite": composite_from_config(config)}, (3, 64, 64), 4
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    return model, {"composite": "epsilon_gamma_box", "canonizers": ["resnet"]}, (3, 224, 224), 1000


def _compile(program: Any, x: torch.Tensor, target: torch.Tensor) -> tuple[Any, float | None, str | None]:
    """torch.compile of the program's module, first call included in the seconds; where inductor refuses the
    program as exported (views of in-place results), of the program after ``run_decompositions`` (functional)."""
    errors = []
    for make in (program.module, lambda: program.run_decompositions().module()):
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(make())
            with torch.no_grad():
                compiled(x, target)
            return compiled, time.perf_counter() - t0, "; ".join(errors) or None
        except Exception as err:  # reported in the table, the other figures still stand
            errors.append(str(err).strip().split("\n")[0][:160])
    return None, None, "; ".join(errors)


def bench_case(name: str, device: torch.device, batch: int, repeats: int, compile_: bool = True) -> dict[str, Any]:
    """Seconds per batch of eager, exported and compiled attribution, and the paired ratios to eager."""
    model, kwargs, shape, classes = _case(name)
    model = model.to(device)
    torch.manual_seed(0)
    x = torch.randn((batch,) + shape, device=device)
    target = torch.arange(batch, device=device) % classes
    t0 = time.perf_counter()
    program = lrpcli.export(model, example=x[:2], **kwargs)
    export_s = time.perf_counter() - t0
    exported = program.module()
    runs: dict[str, Any] = {"eager": lambda: lrpcli.attribute(model, x, target, **kwargs),
                            "exported": lambda: exported(x, target)}
    compile_s, compile_error = None, None
    if compile_:
        compiled, compile_s, compile_error = _compile(program, x, target)
        if compiled is not None:
            runs["compiled"] = lambda: compiled(x, target)
    ref = lrpcli.attribute(model, x, target, **kwargs)
    with torch.no_grad():
        for key in ("exported", "compiled"):
            if key in runs:
                rel = runs[key]()[1]
                err = float((rel - ref).abs().max() / ref.abs().max())
                log(f"export {name}: {key} vs eager, largest difference {err:.1e} of the largest relevance")
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 1):  # the first round warms up
        for key, run in runs.items():
            with torch.no_grad() if key != "eager" else torch.enable_grad():
                took, _ = timed(run, device)
            if i:
                seconds[key].append(took)
        if i:
            log(f"export {name} b{batch}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()))
    ratios = {k: [a / b for a, b in zip(v, seconds["eager"])] for k, v in seconds.items() if k != "eager"}
    return {"case": name, "batch": batch, "seconds": {k: median(v) for k, v in seconds.items()},
            "ratios": {k: median(v) for k, v in ratios.items()}, "spread": ratios, "export_s": export_s,
            "compile_s": compile_s, "compile_error": compile_error}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=",".join(CASES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    for name in args.only.split(","):
        r = bench_case(name.strip(), torch.device(args.device), args.batch, args.repeats, not args.no_compile)
        s = r["seconds"]
        print(f"{r['case']} b{r['batch']}: eager {s['eager']:.3f} s/batch; "
              + "; ".join(f"{k} {s[k]:.3f} s ({r['ratios'][k]:.2f}x eager)" for k in r["ratios"])
              + f"; export {r['export_s']:.1f} s"
              + (f", compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else "")
              + (f"; compile errors (then retried functional): {r['compile_error']}" if r["compile_error"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
