"""``lrpcli.commands.evaluate``: metric formulas on hand-computed cases, and the batched perturbation against an
independent per-sample implementation written here (float64, one image per forward, plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrpcli.commands.evaluate import metrics as M
from lrpcli.commands.evaluate.perturb import perturbation_curves, replacement, subset_scores
from lrpcli.commands.evaluate.run import pixel_ranks, random_subsets


# ------------------------------------------------------------------------------------------- formulas
def test_aopc_and_abpc_by_hand():
    morf = np.array([[4.0, 1.0, 0.0]])
    lerf = np.array([[4.0, 4.0, 3.0]])
    assert M.aopc(morf)[0] == pytest.approx((0 + 3 + 4) / 3)
    assert M.aopc(lerf)[0] == pytest.approx((0 + 0 + 1) / 3)
    assert M.abpc(morf, lerf)[0] == pytest.approx((0 + 3 + 3) / 3)


def test_gini_and_entropy_extremes():
    d = 16
    one = np.zeros((1, 4, 4))
    one[0, 2, 1] = -3.0  # sign does not matter: both use |R|
    flat = np.full((1, 4, 4), 0.5)
    assert M.sparseness(one)[0] == pytest.approx(1 - 1 / d)
    assert M.sparseness(flat)[0] == pytest.approx(0.0, abs=1e-12)
    assert M.complexity(one)[0] == pytest.approx(0.0)
    assert M.complexity(flat)[0] == pytest.approx(math.log(d))
    assert np.isnan(M.sparseness(np.zeros((1, 2, 2))))[0] and np.isnan(M.complexity(np.zeros((1, 2, 2))))[0]


def test_gini_matches_the_mean_difference_definition():
    """Hurley and Rickard's sorted formula equals the Gini mean difference sum|a_i - a_j| / (2 d sum a)."""
    r = np.random.default_rng(3).normal(size=(3, 5, 7))
    a = np.abs(r.reshape(3, -1))
    direct = np.abs(a[:, :, None] - a[:, None, :]).sum(axis=(1, 2)) / (2 * a.shape[1] * a.sum(axis=1))
    np.testing.assert_allclose(M.sparseness(r), direct, rtol=1e-12)


def test_localisation_by_hand():
    r = np.array([[[3.0, -1.0], [1.0, 0.0]]])  # positive mass 4, 3 of it in the top-left pixel
    inside = np.array([[[True, False], [False, False]]])
    assert M.relevance_mass_accuracy(r, inside)[0] == pytest.approx(0.75)
    assert M.relevance_mass_accuracy(r, ~inside)[0] == pytest.approx(0.25)  # the negative -1 does not count
    assert M.pointing_game(r, inside)[0] == 1.0 and M.pointing_game(r, ~inside)[0] == 0.0
    two = np.array([[[False, True], [True, False]]])  # K = 2: top-2 pixels are (0,0) and (1,0)
    assert M.relevance_rank_accuracy(r, two)[0] == pytest.approx(0.5)
    assert np.isnan(M.relevance_rank_accuracy(r, np.zeros_like(two))[0])


def test_faithfulness_correlation_is_pearson():
    rng = np.random.default_rng(0)
    a, d = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    want = [np.corrcoef(a[i], d[i])[0, 1] for i in range(4)]
    np.testing.assert_allclose(M.faithfulness_correlation(a, d), want, rtol=1e-12)
    assert np.isnan(M.faithfulness_correlation(np.ones((1, 5)), d[:1, :5])[0])


def test_patches_and_orders():
    ids = M.patch_ids(5, 7, 3)  # 2 x 3 patches, the last row and column smaller
    assert ids.max() == 5 and ids[4, 6] == 5 and ids[2, 2] == 0 and ids[3, 3] == 4
    r = np.arange(35, dtype=float).reshape(1, 5, 7)
    sums = M.patch_sums(r, ids)
    assert sums[0, 0] == r[0, :3, :3].sum() and sums[0, 5] == r[0, 3:, 6:].sum()
    ties = np.array([[1.0, 2.0, 2.0, 0.0]])
    assert M.patch_order(ties, True).tolist() == [[1, 2, 0, 3]]
    assert M.patch_order(ties, False).tolist() == [[3, 0, 1, 2]]


def test_random_relevance_depends_on_index_only():
    a = M.random_relevance(np.array([5, 9]), 4, 4, seed=0)
    b = M.random_relevance(np.array([9]), 4, 4, seed=0)
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(M.random_relevance(np.array([9]), 4, 4, seed=1)[0], b[0])


# -------------------------------------------------------------------------------- batched vs per-sample
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, 5)).double().eval()


def _slow_curve(net, x, base, target, rel, patch, steps, most_first, score):
    """One sample, one image per forward: patches removed one by one by slicing, order from sorted()."""
    h, w = rel.shape
    boxes = [(i, j) for i in range(0, h, patch) for j in range(0, w, patch)]
    sums = [rel[i:i + patch, j:j + patch].sum() for i, j in boxes]
    order = sorted(range(len(boxes)), key=lambda p: (-sums[p] if most_first else sums[p], p))
    img = x.clone()
    out = []
    for k in range(steps + 1):
        if k:
            i, j = boxes[order[k - 1]]
            img[:, i:i + patch, j:j + patch] = base[:, i:i + patch, j:j + patch]
        with torch.no_grad():
            logits = net(img[None])[0]
        out.append(float(torch.softmax(logits, 0)[target] if score == "probability" else logits[target]))
    return np.array(out)


@pytest.mark.parametrize("kind,score,batch", [("mean", "logit", 7), ("black", "probability", 1000),
                                              ("uniform", "logit", 1), ("blur", "logit", 13)])
def test_batched_curves_equal_the_per_sample_loop(kind, score, batch, one_thread):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(3, 3, 10, 11)))
    rel = rng.normal(size=(3, 10, 11))
    rel[0, :4, :4] = 0.0  # ties between patches
    targets = torch.tensor([0, 3, 4])
    net, patch = _net(), 4
    ids = M.patch_ids(10, 11, patch)
    steps = int(ids.max()) + 1
    base = replacement(x, kind, MEAN, STD, np.array([2, 7, 11]), seed=5, sigma=1.5)
    morf, lerf = perturbation_curves(net, x, base, targets, torch.from_numpy(pixel_ranks(rel, ids)), steps,
                                     batch_size=batch, score=score)
    for i in range(3):
        for curve, first in ((morf, True), (lerf, False)):
            want = _slow_curve(net, x[i], base[i], int(targets[i]), rel[i], patch, steps, first, score)
            np.testing.assert_allclose(curve[i].numpy(), want, rtol=1e-6, atol=1e-12)
    assert morf[:, -1].tolist() == lerf[:, -1].tolist()  # everything replaced: both end at the same image


def test_replacement_values():
    x = torch.ones(2, 3, 9, 9, dtype=torch.float64)
    assert torch.equal(replacement(x, "mean", MEAN, STD, np.array([0, 1])), torch.zeros_like(x))
    black = replacement(x, "black", MEAN, STD, np.array([0, 1]))
    np.testing.assert_allclose(black[0, :, 0, 0].numpy(), [-2.0, -2.0, -2.0])
    u = replacement(x, "uniform", MEAN, STD, np.array([0, 1]), seed=3)
    pixels = u * torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1) + torch.tensor(MEAN,
                                                                                      dtype=torch.float64).view(
        1, 3, 1, 1)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0 and not torch.equal(u[0], u[1])
    assert torch.equal(u[1], replacement(x[:1], "uniform", MEAN, STD, np.array([1]), seed=3)[0])
    np.testing.assert_allclose(replacement(x, "blur", MEAN, STD, np.array([0, 1]), sigma=2.0).numpy(), 1.0,
                               rtol=1e-12)
    impulse = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    impulse[0, 0, 10, 10] = 1.0
    blurred = replacement(impulse, "blur", [0.0], [1.0], np.array([0]), sigma=1.0)
    assert float(blurred.sum()) == pytest.approx(1.0) and float(blurred[0, 0, 10, 10]) == blurred.max()


def test_batched_subsets_equal_the_per_sample_loop(one_thread):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(2, 3, 8, 8)))
    targets = torch.tensor([1, 2])
    net = _net()
    ids = M.patch_ids(8, 8, 4)
    subsets = random_subsets(np.array([4, 6]), 4, runs=5, share=0.5, seed=0)
    assert subsets.sum(axis=2).tolist() == [[2] * 5] * 2
    base = replacement(x, "black", MEAN, STD, np.array([4, 6]))
    full, scores = subset_scores(net, x, base, targets, torch.from_numpy(subsets), torch.from_numpy(ids),
                                 batch_size=3)
    for i in range(2):
        with torch.no_grad():
            assert float(full[i]) == pytest.approx(float(net(x[i:i + 1])[0, targets[i]]), rel=1e-6)
        for r in range(5):
            img = x[i].clone()
            for p in np.flatnonzero(subsets[i, r]):
                a, b = divmod(int(p), 2)
                img[:, a * 4:a * 4 + 4, b * 4:b * 4 + 4] = base[i, :, a * 4:a * 4 + 4, b * 4:b * 4 + 4]
            with torch.no_grad():
                want = float(net(img[None])[0, targets[i]])
            assert float(scores[i, r]) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- parameter randomisation
def test_spearman_with_ties_by_hand():
    from lrpcli.commands.evaluate.randomisation import average_ranks, spearman

    assert average_ranks(np.array([[10.0, 20.0, 20.0, 5.0]])).tolist() == [[2.0, 3.5, 3.5, 1.0]]
    a = np.array([[1.0, 2.0, 3.0, 4.0]])
    assert spearman(a, a ** 3)[0] == pytest.approx(1.0)
    assert spearman(a, -a)[0] == pytest.approx(-1.0)
    b = np.array([[1.0, 2.0, 2.0, 3.0]])  # ranks 1, 2.5, 2.5, 4: Pearson of the ranks
    assert spearman(a, b)[0] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 2.5, 2.5, 4])[0, 1])
    assert np.isnan(spearman(a, np.ones((1, 4)))[0])


def test_cascade_randomises_from_the_top():
    from lrpcli.commands.evaluate.randomisation import cascade, parameter_layers

    net = _net()
    assert parameter_layers(net) == ["7", "3", "0"]
    models = cascade(net, checkpoints=3, seed=0)
    assert len(models) == 3
    first = dict(models[0].named_parameters())
    original = dict(net.named_parameters())
    assert not torch.equal(first["7.weight"], original["7.weight"])
    assert torch.equal(first["3.weight"], original["3.weight"]) and torch.equal(first["0.weight"], original["0.weight"])
    assert not torch.equal(dict(models[2].named_parameters())["0.weight"], original["0.weight"])
    again = cascade(net, checkpoints=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(models[2].parameters(), again[2].parameters()))
    assert len(cascade(net, checkpoints=10, seed=0)) == 3
