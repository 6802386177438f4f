"""Attribution quality metrics as pure functions of numpy arrays, from their published definitions.

Relevance maps are channel-summed ``N x H x W`` arrays; everything is computed in float64 so a float16 file
gives the same numbers as a float32 one (up to its own rounding). The perturbation *curves* themselves are
computed by :mod:`lrpcli.commands.evaluate.perturb`; here they are only summarised.
"""

from __future__ import annotations

import numpy as np

__all__ = ["abpc", "aopc", "complexity", "faithfulness_correlation", "patch_ids", "patch_order", "patch_sums",
           "pointing_game", "random_relevance", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "sparseness"]


# ------------------------------------------------------------------------------------------------ patches
def patch_ids(height: int, width: int, patch: int) -> np.ndarray:
    """``H x W`` int64 map of each pixel's patch number on a grid of ``patch x patch`` squares, row-major.

    Border patches are smaller when the size does not divide ``patch``; there are
    ``ceil(H / patch) * ceil(W / patch)`` patches.
    """
    cols = -(-width // patch)
    rows = np.arange(height)[:, None] // patch
    return (rows * cols + np.arange(width)[None, :] // patch).astype(np.int64)


def patch_sums(relevance: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``N x P`` sum of the relevance in each patch (``relevance`` is ``N x H x W``)."""
    r = np.asarray(relevance, dtype=np.float64).reshape(len(relevance), -1)
    n_patches = int(ids.max()) + 1
    out = np.zeros((len(r), n_patches))
    for i in range(len(r)):
        out[i] = np.bincount(ids.reshape(-1), weights=r[i], minlength=n_patches)
    return out


def patch_order(sums: np.ndarray, most_relevant_first: bool) -> np.ndarray:
    """``N x P`` patch numbers from the most (MoRF) or least (LeRF) relevant; ties keep the lower number first."""
    key = -sums if most_relevant_first else sums
    return np.argsort(key, axis=1, kind="stable")


# ------------------------------------------------------------------------------------------ perturbation
def aopc(curve: np.ndarray) -> np.ndarray:
    """Area over the perturbation curve, per sample (Samek et al. 2017, eq. 12).

    ``curve`` is ``N x (L + 1)``: the score after 0, 1, ..., L perturbation steps.
    AOPC = 1/(L+1) * sum_k (f(x^(0)) - f(x^(k))). High for MoRF means the first removed regions mattered.
    """
    c = np.asarray(curve, dtype=np.float64)
    return (c[:, :1] - c).mean(axis=1)


def abpc(morf: np.ndarray, lerf: np.ndarray) -> np.ndarray:
    """Area between the LeRF and the MoRF curve, per sample: 1/(L+1) * sum_k (f_LeRF(k) - f_MoRF(k)).

    Named by Schulz et al. 2020 ("Restricting the flow", ICLR); it rewards removing the relevant regions
    first *and* keeping the score when the irrelevant ones go, so a map cannot win by destroying the image.
    """
    return (np.asarray(lerf, dtype=np.float64) - np.asarray(morf, dtype=np.float64)).mean(axis=1)


def faithfulness_correlation(attribution_sums: np.ndarray, score_drops: np.ndarray) -> np.ndarray:
    """Pearson correlation over the random subsets, per sample (Bhatt et al. 2020, IJCAI, eq. 2).

    ``attribution_sums`` and ``score_drops`` are ``N x runs``: the relevance summed over each random subset S
    and ``f(x) - f(x with S replaced)``. NaN where either side is constant.
    """
    a = np.asarray(attribution_sums, dtype=np.float64)
    d = np.asarray(score_drops, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    d = d - d.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (d * d).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * d).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


# ------------------------------------------------------------------------------------------ localisation
def _flat(relevance: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(relevance, dtype=np.float64)
    m = np.asarray(masks, dtype=bool)
    if r.shape != m.shape:
        raise ValueError(f"masks of shape {m.shape} do not match relevance of shape {r.shape}")
    return r.reshape(len(r), -1), m.reshape(len(m), -1)


def relevance_mass_accuracy(relevance: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of the positive relevance inside the mask (Arras et al. 2022, CLEVR-XAI, Information Fusion).

    Only positive relevance counts, as in the paper. NaN for a map without positive relevance.
    """
    r, m = _flat(relevance, masks)
    pos = np.clip(r, 0.0, None)
    total = pos.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * m).sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)


def relevance_rank_accuracy(relevance: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Of the K most relevant pixels, the share inside the mask, K = the mask's size (Arras et al. 2022).

    Ties at the K-th value are broken by pixel order (row-major), so the result is deterministic. NaN for an
    empty mask.
    """
    r, m = _flat(relevance, masks)
    out = np.full(len(r), np.nan)
    for i in range(len(r)):
        k = int(m[i].sum())
        if k:
            top = np.argsort(-r[i], kind="stable")[:k]
            out[i] = m[i, top].sum() / k
    return out


def pointing_game(relevance: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """1.0 where the most relevant pixel lies inside the mask, else 0.0 (Zhang et al. 2018, IJCV).

    The first maximum in row-major order is the point; no tolerance margin. NaN for an empty mask.
    """
    r, m = _flat(relevance, masks)
    hit = m[np.arange(len(r)), r.argmax(axis=1)].astype(np.float64)
    return np.where(m.any(axis=1), hit, np.nan)


# -------------------------------------------------------------------------------------------- complexity
def sparseness(relevance: np.ndarray) -> np.ndarray:
    """Gini index of |R| per sample (Chalasani et al. 2020, ICML; Hurley and Rickard 2009's formula).

    With |R| sorted ascending as v_1..v_d: G = 1 - 2 * sum_k (v_k / ||v||_1) * (d - k + 1/2) / d. 1 = all
    relevance on one pixel, 0 = spread evenly. NaN for an all-zero map.
    """
    v = np.sort(np.abs(np.asarray(relevance, dtype=np.float64)).reshape(len(relevance), -1), axis=1)
    d = v.shape[1]
    total = v.sum(axis=1, keepdims=True)
    k = np.arange(1, d + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 1.0 - 2.0 * ((v / total) * ((d - k + 0.5) / d)).sum(axis=1)
    return np.where(total[:, 0] > 0, g, np.nan)


def complexity(relevance: np.ndarray) -> np.ndarray:
    """Entropy (natural log) of the normalised absolute relevance, per sample (Bhatt et al. 2020, IJCAI).

    P_i = |R_i| / sum_j |R_j|; complexity = -sum_i P_i ln P_i (0 log 0 = 0). ln(H*W) for an even spread.
    NaN for an all-zero map.
    """
    a = np.abs(np.asarray(relevance, dtype=np.float64)).reshape(len(relevance), -1)
    total = a.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = a / total
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(total[:, 0] > 0, terms.sum(axis=1), np.nan)


# ----------------------------------------------------------------------------------------------- baseline
def random_relevance(indices: np.ndarray, height: int, width: int, seed: int) -> np.ndarray:
    """The "no information" attribution: standard normal maps, one generator per data set index.

    Seeded by (seed, index), so a row gets the same map whichever file, order or chunk it is evaluated in.
    """
    out = np.empty((len(indices), height, width), dtype=np.float64)
    for i, index in enumerate(np.asarray(indices, dtype=np.int64)):
        out[i] = np.random.default_rng([int(seed), int(index)]).standard_normal((height, width))
    return out
