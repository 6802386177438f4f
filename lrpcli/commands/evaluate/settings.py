"""What an evaluation's numbers depend on, without torch: the metric families, the perturbation choices and
the settings stored with the values, so ``lrpcli evaluate --help`` builds its options without the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: What a removed region is replaced with (see ``perturb.replacement``).
REPLACEMENTS = ("mean", "black", "uniform", "blur")
#: What is measured: the target's logit, or its softmax probability.
SCORES = ("logit", "probability")
#: Metric families (what --metrics names and what is stored), with the table rows each one gives.
FAMILIES: dict[str, tuple[str, ...]] = {
    "region_perturbation": ("aopc_morf", "aopc_lerf", "abpc"),
    "faithfulness_correlation": ("faithfulness_correlation",),
    "relevance_mass_accuracy": ("relevance_mass_accuracy",),
    "relevance_rank_accuracy": ("relevance_rank_accuracy",),
    "pointing_game": ("pointing_game",),
    "sparseness": ("sparseness",),
    "complexity": ("complexity",),
    "model_randomisation": ("model_randomisation",),
}
MODEL_FAMILIES = ("region_perturbation", "faithfulness_correlation", "model_randomisation")
#: Families that only run when named in --metrics (they re-run the attribution).
OPT_IN = ("model_randomisation",)
MASK_FAMILIES = ("relevance_mass_accuracy", "relevance_rank_accuracy", "pointing_game")
SOURCES = ("attribution", "random")


@dataclass(frozen=True)
class Settings:
    """What the numbers depend on (and so what the stored values are keyed by); see the README's table."""

    patch_size: int = 8
    steps: int | None = None  # None: every patch, at most 100
    replacement: str = "mean"
    score: str = "logit"
    seed: int = 0
    blur_sigma: float = 4.0
    fc_runs: int = 50
    fc_subset: float = 0.1
    mpr_checkpoints: int = 5

    def steps_for(self, height: int, width: int) -> int:
        """Perturbation steps for maps of this size: ``steps`` capped at the number of patches."""
        patches = math.ceil(height / self.patch_size) * math.ceil(width / self.patch_size)
        return min(patches, 100 if self.steps is None else int(self.steps))

    def of(self, family: str, height: int, width: int, masks: str | None) -> dict[str, Any]:
        """The settings that ``family``'s numbers depend on, as stored with them."""
        base = {"version": 1, "family": family}
        if family == "model_randomisation":
            base.update(checkpoints=self.mpr_checkpoints, seed=self.seed)
        elif family in MODEL_FAMILIES:
            base.update(patch_size=self.patch_size, replacement=self.replacement, score=self.score)
            if self.replacement == "uniform":
                base["seed"] = self.seed
            if self.replacement == "blur":
                base["blur_sigma"] = self.blur_sigma
        if family == "region_perturbation":
            base["steps"] = self.steps_for(height, width)
        if family == "faithfulness_correlation":
            base.update(runs=self.fc_runs, subset=self.fc_subset, seed=self.seed)
        if family in MASK_FAMILIES:
            base["masks"] = masks
        return base
