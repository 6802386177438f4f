"""``make bench``: one table of lrpcli's performance, all figures from one run.

    .venv/bin/python share/bench/run.py [--device cpu|cuda] [--quick] [--composites a,b] [--repeats N] [--write]
                                        [--only vgg16,resnet50,demo,synthetic,render,evaluate,analyze,export]

Sections (see the scripts next to this one for what exactly each times):
- models: every built-in composite on torchvision vgg16 and resnet50 (random weights, 224x224, batch 8 on CPU,
  64 on CUDA): seconds per batch, images/s, time and peak memory relative to the plain input gradient;
- explain: the ``lrpcli explain`` pipeline on the demo data and on a synthetic ImageFolder (resnet50), images/s
  end to end against attribution alone;
- render: ``lrpcli render`` of 1,000 heatmaps (share/bench/bench_render.py), seconds.
- evaluate: ``lrpcli evaluate``'s batched region perturbation against a per-sample loop, on the demo model and
  resnet50 (share/bench/bench_evaluate.py), samples/s and their ratio (target >= 10x).
- analyze: ``lrpcli analyze`` (SpRAy) of ``--analyze-n`` 224x224 maps in ``--analyze-classes`` classes
  (share/bench/bench_analyze.py, its own process): seconds per stage, wall and CPU, and peak RSS.
- zoo (not in the default run; ``--zoo`` or ``--only zoo``): every torchvision classification model through
  ``composite: auto`` and ``canonizers: auto``, one row per model (share/bench/bench_zoo.py): coverage left,
  finiteness, float64 conservation, time against the plain gradient. ``--zoo-models`` picks models (globs),
  ``--zoo-max-params`` skips the largest, ``--zoo-time-size`` and ``--zoo-time-batch`` set the timing's input
  (default: each model's smallest accepted size, batch 2).
- export: the attribution exported by ``lrpcli.export`` and ``torch.compile`` of it against eager
  ``lrpcli.attribute``, same batch, paired runs (share/bench/bench_export.py): s/batch and the median ratio.

Each figure is the median of several repeats after a warm-up. Ratios are the targets (README, "Benchmarks"):
they compare runs of the same process minutes apart, so they hold on a loaded machine where absolute
seconds do not; the load average is printed with the results. ``--write`` appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import describe_device, load, log, median

import lrpcli

HERE = Path(__file__).resolve().parent
SECTIONS = ("vgg16", "resnet50", "demo", "synthetic", "render", "evaluate", "analyze", "export")
OPTIONAL = ("zoo",)  # chosen by name only: the zoo sweep takes an hour or more on a CPU
TIME_TARGET = {"cpu": 2.0, "cuda": 1.6}
EPSILON_TARGET = 1.3
MEMORY_TARGET = 1.5
PIPELINE_TARGET = 0.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smaller run: 1 timed repeat, 64 synthetic images (recorder diagnostic: 2 batches), "
                   "200 heatmaps")
    p.add_argument("--only", help=f"comma-separated sections among {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--composites", help="comma-separated composites (default: all built-ins)")
    p.add_argument("--no-reference", action="store_true", help="skip the Epsilon-everywhere reference row")
    p.add_argument("--repeats", type=int, help="timed repeats per figure (default 5, --quick 1)")
    p.add_argument("--batch", type=int, help="model batch size (default 8 on CPU, 64 on CUDA)")
    p.add_argument("--images", type=int, help="synthetic ImageFolder size (default 256, --quick 64)")
    p.add_argument("--explain-batch", type=int, help="batch size of the synthetic explain run (default 8 on CPU, "
                   "64 on CUDA)")
    p.add_argument("--explain-repeats", type=int,
                   help="passes over the synthetic ImageFolder, each way (default 1: a pass is already 32 batches)")
    p.add_argument("--render-n", type=int, help="heatmaps to render (default 1000, --quick 200)")
    p.add_argument("--analyze-n", type=int, help="maps for the analyze section (default 20000, --quick 5000)")
    p.add_argument("--analyze-classes", type=int, default=1, help="classes the analyze maps form (default 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc as it is (by default the run tunes it as the lrpcli command does: "
                   "lrpcli.keep_freed_memory, for the gradient and the composites alike)")
    p.add_argument("--write", action="store_true", help=f"append the table to {HERE / 'RESULTS.md'}")
    p.add_argument("--zoo", action="store_true",
                   help="the zoo sweep, on the CPU (alone, or with the sections of --only)")
    p.add_argument("--zoo-models", help="zoo: comma-separated model names or globs (default: every torchvision model)")
    p.add_argument("--zoo-max-params", type=float, default=350.0,
                   help="zoo: skip models above this many million parameters (default 350)")
    p.add_argument("--zoo-time-size", type=zoo_positive, metavar="N",
                   help="zoo: image size of the timing (default: each model's smallest accepted size; a model that "
                   "does not run at N is timed at the accepted size nearest to it)")
    p.add_argument("--zoo-time-batch", type=zoo_positive, default=2, metavar="N",
                   help="zoo: batch of the timing (default 2)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.device.type not in TIME_TARGET:
        p.error(f"--device: expected cpu or cuda, got {args.device}")
    args.sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    if args.zoo:
        args.sections = (args.sections if args.only else ()) + ("zoo",)
    unknown = sorted(set(args.sections) - set(SECTIONS + OPTIONAL))
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS + OPTIONAL)}")
    names = lrpcli.composites.names()
    args.composite_list = names if not args.composites else [c.strip() for c in args.composites.split(",")]
    bad = sorted(set(args.composite_list) - set(names))
    if bad:
        p.error(f"--composites: unknown {', '.join(bad)}; built-ins: {', '.join(names)}")
    cuda = args.device.type == "cuda"
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.batch = args.batch or (64 if cuda else 8)
    args.images = args.images or (64 if args.quick else 256)
    args.explain_batch = args.explain_batch or (64 if cuda else 8)
    args.explain_repeats = args.explain_repeats or 1
    args.render_n = args.render_n or (200 if args.quick else 1000)
    args.analyze_n = args.analyze_n or (5000 if args.quick else 20000)
    return args


# ---------------------------------------------------------------------------------------------- table rows
class Table:
    HEADER = ("benchmark", "case", "s/batch", "images/s", "time vs gradient", "peak mem vs gradient", "target", "ok")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.notes: list[str] = []
        self.misses: list[str] = []

    def add(self, *cells: str) -> None:
        self.rows.append(tuple(cells))

    def markdown(self) -> str:
        widths = [max(len(r[i]) for r in (self.HEADER, *self.rows)) for i in range(len(self.HEADER))]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out = [line(self.HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def model_rows(table: Table, result, device: str) -> None:
    from bench_models import EPSILON_REFERENCE

    g = result.gradient
    label = f"{result.model} b{result.batch}"
    table.add(label, "plain gradient", f"{g.time:.3f}", f"{g.batch / g.time:.1f}", "1.00x (baseline)",
              f"1.00x ({_mib(g.peak)})", "", "")
    for c in result.cases:
        limit = EPSILON_TARGET if c.epsilon_only else TIME_TARGET[device]
        ratio, mem = c.ratio, c.peak / g.peak
        pairs = c.pair_ratios
        spread = f"pairs {min(pairs):.2f}-{max(pairs):.2f}" if len(pairs) > 1 else ""
        extra = "; ".join(part for part in (spread, f"cpu {c.cpu_ratio:.2f}x" if device == "cpu" else "") if part)
        shown = f"{ratio:.2f}x" + (f" ({extra})" if extra else "")
        misses = [m for m, bad in (("time", ratio > limit), ("memory", mem > MEMORY_TARGET)) if bad]
        name = c.name + (" (epsilon-only)" if c.epsilon_only and c.name != EPSILON_REFERENCE else "")
        table.add(label, name, f"{c.time:.3f}", f"{c.batch / c.time:.1f}", shown, f"{mem:.2f}x",
                  f"<= {limit:.1f}x, <= {MEMORY_TARGET:.1f}x", "MISS " + "+".join(misses) if misses else "ok")
        if misses:
            table.misses.append(f"{label} {c.name}: " + ", ".join(misses))
    table.notes.append(f"{label}: each composite run paired with a gradient run just before it; ratio = median "
                       f"of {len(result.cases[0].seconds) if result.cases else 0} composite runs (after a warm-up) "
                       "over the median of its paired gradient runs (pairs: the range of the runs' own ratios); "
                       "gradient row: median of all "
                       f"{len(g.seconds)} ({min(g.seconds, default=float('nan')):.3f}.."
                       f"{max(g.seconds, default=float('nan')):.3f} s)"
                       + ("; time: wall-time ratio (the target), with the ratio of process CPU time, which other "
                          "load moves less" if device == "cpu" else ""))


def pipeline_row(table: Table, r) -> None:
    ok = r.share >= PIPELINE_TARGET
    per_batch = median(r.end_to_end) * r.batch / r.images
    table.add(f"explain {r.name}", f"end to end, batch {r.batch}, {r.workers} workers", f"{per_batch:.3f}",
              f"{r.e2e_rate:.1f}", f"{r.share:.0%} of attribution alone ({r.attr_rate:.1f} img/s)", "",
              f">= {PIPELINE_TARGET:.0%}", "ok" if ok else "MISS")
    if r.stats_images:
        table.add(f"explain {r.name}", f"of which conservation stats ({r.stats_images} img)", "",
                  f"{r.stats_images / r.stats_seconds:.1f}", f"attribution + recorder: {r.stats_cost:+.0%} time",
                  "", "(diagnostic)", "")
    if not ok:
        table.misses.append(f"explain {r.name}: end to end {r.share:.0%} of attribution alone")
    table.notes.append(f"explain {r.name}: {len(r.end_to_end)} pass(es) of {r.images} images each way, alternating")


def evaluate_rows(table: Table, device: torch.device, quick: bool) -> None:
    """Region perturbation (MoRF + LeRF): evaluate's batched forwards against a per-sample loop, same samples."""
    from bench_evaluate import TARGET, demo_case, resnet_case

    for result in (demo_case(8 if quick else 16, device, None, None),
                   resnet_case(1 if quick else 2, device, None, None)):
        ratio = result["fast_rate"] / result["slow_rate"]
        table.add("evaluate", result["case"], "", f"{result['fast_rate']:.1f}",
                  f"{ratio:.1f}x the per-sample loop ({result['slow_rate']:.2f}/s)", "", f">= {TARGET:.0f}x",
                  "ok" if ratio >= TARGET else "MISS")
    table.notes.append("evaluate: samples/s of region perturbation, batched vs a per-sample loop (bench_evaluate.py)")


def export_rows(table: Table, device: torch.device, batch: int, repeats: int, quick: bool) -> None:
    """The exported program and torch.compile of it against eager attribution (paired, same batch)."""
    from bench_export import CASES, bench_case

    for name in CASES[:1] if quick else CASES:
        r = bench_case(name, device, batch, repeats)
        eager = r["seconds"]["eager"]
        label = f"export {name} b{batch}"
        table.add(label, "eager attribute", f"{eager:.3f}", f"{batch / eager:.1f}", "1.00x (baseline)", "", "", "")
        for key, ratio in r["ratios"].items():
            pairs = r["spread"][key]
            sec = r["seconds"][key]
            table.add(label, key, f"{sec:.3f}", f"{batch / sec:.1f}",
                      f"{ratio:.2f}x eager (pairs {min(pairs):.2f}-{max(pairs):.2f})", "", "(diagnostic)", "")
        table.notes.append(f"{label}: export {r['export_s']:.0f} s once"
                           + (f", compile {r['compile_s']:.0f} s once" if r["compile_s"] is not None else "")
                           + (f"; compile errors: {r['compile_error']}" if r["compile_error"] else "")
                           + f"; ratio = median of {len(r['spread'].get('exported', []))} paired runs")


def bench_render(n: int, repeats: int) -> list[float]:
    """Runs share/bench/bench_render.py (its own setup untimed): one warm-up that writes the file, then repeats."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        keep = str(Path(tmp) / "render.h5")
        for i in range(repeats + 1):
            cmd = [sys.executable, str(HERE / "bench_render.py"), "--n", str(n), "--keep", keep]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            match = re.search(r"render: (\d+) heatmaps .* in ([0-9.]+) s", done.stdout)
            if not match or int(match.group(1)) != n:
                raise RuntimeError(f"unexpected bench_render.py output:\n{done.stdout}\n{done.stderr}")
            if i:
                times.append(float(match.group(2)))
            log(f"render {n}: {'warm-up ' if not i else ''}{float(match.group(2)):.1f} s")
    return times


def analyze_row(table: Table, n: int, classes: int) -> None:
    """Runs share/bench/bench_analyze.py in its own process (its peak RSS is the analysis alone)."""
    import json

    cmd = [sys.executable, str(HERE / "bench_analyze.py"), "--n", str(n), "--classes", str(classes), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next((row for row in done.stdout.splitlines() if row.startswith("json: ")), None)
    if line is None:
        raise RuntimeError(f"unexpected bench_analyze.py output:\n{done.stdout}\n{done.stderr}")
    r = json.loads(line[len("json: "):])
    wall, cpu = r["total"]
    table.add("analyze", f"{n:,} maps 224x224, {classes} class(es)", "", f"{n / wall:.0f}",
              f"{wall:.0f} s wall ({cpu:.0f} s CPU)", f"peak RSS {_mib(r['peak_rss'])}", "(diagnostic)", "")
    stages = ", ".join(f"{k} {w:.0f} s ({c:.0f} s CPU)" for k, (w, c) in r["stages"].items())
    table.notes.append(f"analyze: {stages}; preprocess scaled from 1,000 rows read (bench_analyze.py)")
    log(f"analyze {n} maps: {wall:.0f} s wall, {cpu:.0f} s CPU")


def git_state() -> str:
    """The commit the engine was measured at, and whether lrpcli/ had uncommitted changes."""
    root = HERE.parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lrpcli"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git n/a"
    return f"git {head}" + (" + uncommitted changes under lrpcli/" if dirty else "")


def zoo_positive(text: str) -> int:
    """argparse type of the --zoo-time-* options: bench_zoo's, imported only when they are given."""
    from bench_zoo import positive

    return positive(text)


def zoo_section(args: argparse.Namespace) -> str:
    """The zoo sweep (bench_zoo.py): its table, one row per model, and a summary line."""
    from bench_zoo import markdown, run, select, summary

    rows = run(select(args.zoo_models), args.zoo_max_params, 1 if args.quick else 3, conserve=True,
               time_size=args.zoo_time_size, time_batch=args.zoo_time_batch)
    return markdown(rows) + "\n\n" + summary(rows)


RESULTS_TITLE = """# lrpcli benchmark results

Appended by `make bench BENCH_ARGS=--write` (share/bench/run.py). Ratios compare runs of one process; absolute
seconds depend on the machine and on what else ran on it (see the load average of each run).
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the process as the lrpcli command runs it, from the first gradient on (see lrpcli/explainer/allocator.py)
    malloc = "glibc defaults" if args.system_malloc else (
        "kept freed memory (lrpcli.keep_freed_memory)" if lrpcli.keep_freed_memory()
        else "left as it was (not glibc, or LRPCLI_KEEP_FREED_MEMORY=0)")
    from bench_explain import bench_demo, bench_synthetic
    from bench_models import MODELS, bench_model

    started, load_start = time.time(), load()
    table = Table()
    device = args.device.type
    for name in MODELS:
        if name in args.sections:
            result = bench_model(name, args.device, args.batch, args.repeats, args.composite_list,
                                 with_reference=not args.no_reference)
            model_rows(table, result, device)
    if "demo" in args.sections:
        pipeline_row(table, bench_demo(args.device, max(args.repeats, 3)))  # seconds per pass: repeat it
    if "synthetic" in args.sections:
        pipeline_row(table, bench_synthetic(args.device, args.explain_repeats, args.images, args.explain_batch,
                                            stats_images=2 * args.explain_batch if args.quick else 64))
    if "render" in args.sections:
        times = bench_render(args.render_n, args.repeats)
        table.add("render", f"{args.render_n} heatmaps 224x224 png", "", f"{args.render_n / median(times):.0f}",
                  f"{median(times):.1f} s", "", "", "")
        table.notes.append(f"render: median of {len(times)} after a warm-up (bench_render.py, lzf input, jobs auto)")
    if "evaluate" in args.sections:
        evaluate_rows(table, args.device, args.quick)
    if "analyze" in args.sections:
        analyze_row(table, args.analyze_n, args.analyze_classes)
    zoo = zoo_section(args) if "zoo" in args.sections else ""
    if "export" in args.sections:
        export_rows(table, args.device, args.batch, args.repeats, args.quick)

    minutes = (time.time() - started) / 60
    header = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"device: {describe_device(args.device)}",
        f"torch {torch.__version__}, lrpcli {lrpcli.__version__} ({git_state()}), python {sys.version.split()[0]}",
        f"run: {'quick' if args.quick else 'full'}, {args.repeats} timed repeat(s), sections {','.join(args.sections)},"
        f" {minutes:.1f} min",
        f"load average (1/5/15 min): {load_start} at start, {load()} at end",
        f"malloc: {malloc}",
    ]
    if "epsilon*" in "".join(r[1] for r in table.rows):
        table.notes.append("epsilon*: not a built-in; Epsilon on every weighted layer, the reference for the "
                           "Epsilon-only target (no built-in composite is Epsilon-only)")
    notes = [f"- {n}" for n in table.notes]
    verdict = ("all targets met" if not table.misses else
               f"{len(table.misses)} target(s) missed: " + "; ".join(table.misses))
    if zoo and not table.rows:  # the zoo alone: its own table is the result
        text = "\n".join(header) + "\n\n" + zoo + "\n"
    else:
        text = "\n".join(header) + "\n\n" + table.markdown() + "\n\n" + "\n".join(notes) + f"\n\n{verdict}\n"
        text += f"\n{zoo}\n" if zoo else ""
    print(text)
    if args.write:
        results = HERE / "RESULTS.md"
        if not results.exists():
            results.write_text(RESULTS_TITLE)
        with open(results, "a") as f:
            title = f"## {time.strftime('%Y-%m-%d %H:%M')} — {device}{' (quick)' if args.quick else ''}"
            body = text.split("\n\n", 1)[1]
            f.write(f"\n{title}\n\n" + "\n".join(f"- {h}" for h in header) + "\n\n" + body)
        log(f"appended to {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
