"""Where does the relevance sit? Share of positive relevance inside the object masks, per method.

    python share/demo/report.py demo.h5                 # one stored run
    python share/demo/report.py --compare               # every built-in composite and the plain gradient

The mask area share is what a map spreading relevance uniformly would get; a useful explanation is well above it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from masks_share import load_masks, mask_area_share, mask_share  # noqa: E402

COMPARE = ["epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
           "epsilon_alpha2_beta1_flat", "excitation_backprop", "guided_backprop", "gradient", "input_x_gradient"]


def shares(path: Path) -> tuple[float, float, float]:
    """(mean positive-relevance share in masks, its minimum, mean mask area share) of a stored run."""
    from lrpcli.store import open_results

    results = open_results(path)
    masks = load_masks(HERE / "masks", results.filename)
    share = mask_share(results.attribution, masks)
    return float(np.nanmean(share)), float(np.nanmin(share)), float(mask_area_share(masks).mean())


def compare() -> list[tuple[str, float, float, float]]:
    from lrpcli.explainer.build import load_config
    from lrpcli.runner.local import run as explain

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in COMPARE:
            plain = method in ("gradient", "input_x_gradient")
            overrides = {"output.path": f"{tmp}/{method}.h5", "run.num_workers": 0}
            text = (ROOT / "configs" / "demo.yaml").read_text()
            text = text.replace("../share", str(ROOT / "share"))
            if plain:
                text = text.replace("method: lrp", f"method: {method}")
            else:
                text = text.replace("name: epsilon_gamma_box", f"name: {method}")
                if method != "epsilon_gamma_box":
                    text = "\n".join(line for line in text.splitlines()
                                     if not line.strip().startswith(("gamma:", "low:", "high:", "epsilon:"))
                                     or method.startswith("epsilon") and line.strip().startswith("epsilon:"))
            cfg = Path(tmp) / f"{method}.yaml"
            cfg.write_text(text)
            explain(load_config(cfg, overrides), HERE / "images", overwrite=True, progress=False)
            rows.append((method, *shares(Path(f"{tmp}/{method}.h5"))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("h5", nargs="?", type=Path, help="a run of configs/demo.yaml")
    parser.add_argument("--compare", action="store_true", help="run every composite and the gradient")
    args = parser.parse_args()
    if args.compare:
        rows = compare()
    elif args.h5:
        rows = [(str(args.h5), *shares(args.h5))]
    else:
        parser.error("give a result file or --compare")
    print(f"{'method':28s} {'in masks (mean)':>16s} {'(min)':>8s} {'mask area':>10s}")
    for name, mean, low, area in rows:
        print(f"{name:28s} {mean:16.1%} {low:8.1%} {area:10.1%}")


if __name__ == "__main__":
    main()
