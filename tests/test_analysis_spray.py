"""SpRAy numerics (lrpcli/commands/analysis/spray.py): hand-computed pooling, exact eigenvalues, planted groups."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from lrpcli.commands.analysis import spray


def _dense_laplacian_eigenvalues(a: np.ndarray) -> np.ndarray:
    d = a.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    lap = np.eye(len(a)) - inv[:, None] * a * inv[None, :]
    return np.sort(np.linalg.eigvalsh(lap))


def test_pool_averages_equal_areas_also_when_size_does_not_divide():
    m = np.arange(5 * 4, dtype=np.float32).reshape(1, 5, 4)
    out = spray.pool(m, 2)
    # rows split 0-1 | 2-4 (floor(i*5/2) = 0, 2), columns 0-1 | 2-3
    expected = [[np.mean(m[0, 0:2, 0:2]), np.mean(m[0, 0:2, 2:4])], [np.mean(m[0, 2:5, 0:2]), np.mean(m[0, 2:5, 2:4])]]
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    assert spray.pool(m, 8).shape == (1, 5, 4)  # never upsampled


def test_preprocess_sums_channels_and_scales_to_unit_l1():
    rel = np.zeros((3, 2, 4, 4), dtype=np.float32)
    rel[0, 0, 0, 0], rel[0, 1, 0, 0] = 3.0, 1.0  # channel sum 4 in the top-left pooled cell
    rel[1, 0, 3, 3] = -2.0
    feats = spray.preprocess(rel, size=2)
    np.testing.assert_allclose(feats[0], [1, 0, 0, 0])
    np.testing.assert_allclose(feats[1], [0, 0, 0, -1])
    np.testing.assert_array_equal(feats[2], [0, 0, 0, 0])  # an all-zero map stays zero
    np.testing.assert_allclose(spray.preprocess(rel, size=2, absolute=True)[1], [0, 0, 0, 1])


def test_knn_affinity_is_symmetric_binary_without_self_loops():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    a = spray.knn_affinity(x, 1).toarray()
    # nearest: 0->1, 1->0 (tie with 2 broken by order), 2->1, 3->2; symmetrised by union
    expected = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=float)
    np.testing.assert_array_equal(a, expected)


def test_eigenvalues_of_a_hand_made_graph_equal_the_dense_decomposition():
    # a path 0-1-2 and a triangle 3-4-5 with one weighted edge: two components, two zero eigenvalues
    a = np.zeros((6, 6))
    for i, j, w in [(0, 1, 1), (1, 2, 1), (3, 4, 1), (4, 5, 2), (3, 5, 1)]:
        a[i, j] = a[j, i] = w
    ev, emb = spray.spectral_embedding(sp.csr_matrix(a), 6)
    np.testing.assert_allclose(ev, _dense_laplacian_eigenvalues(a), atol=1e-12)
    np.testing.assert_allclose(ev[:2], [0, 0], atol=1e-12)
    # the path graph's spectrum is known: 0, 1, 2 for the normalised Laplacian of P3
    assert spray.eigengap(ev) == 2
    assert emb.shape == (6, 6)
    # the two null vectors (D^-1/2 form) are constant on each component
    null = emb[:, :2]
    assert np.allclose(null[0], null[1]) and np.allclose(null[1], null[2])
    assert np.allclose(null[3], null[4]) and np.allclose(null[4], null[5])


def test_sparse_solver_matches_dense_on_a_larger_graph(monkeypatch):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(8, 1, (40, 5))])
    g = spray.knn_affinity(x, 6)
    monkeypatch.setattr(spray, "DENSE_LIMIT", 10)  # force the ARPACK path
    ev, _ = spray.spectral_embedding(g, 6)
    np.testing.assert_allclose(ev, _dense_laplacian_eigenvalues(g.toarray())[:6], atol=1e-8)
    assert spray.eigengap(ev) == 2


def _purity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Share of samples whose cluster's majority class is their own class."""
    hits = 0
    for c in np.unique(pred):
        members = truth[pred == c]
        hits += np.bincount(members).max()
    return hits / len(truth)


def test_two_planted_groups_are_recovered_with_purity_one():
    rng = np.random.default_rng(0)
    rel = rng.normal(0, 0.05, (120, 3, 48, 48)).astype(np.float32)
    truth = np.repeat([0, 1], 60)
    rel[truth == 0, :, 5:15, 5:15] += 1.0
    rel[truth == 1, :, 30:40, 30:40] += 1.0
    order = rng.permutation(120)
    result = spray.analyse(spray.preprocess(rel[order]), spray.Params(clusters=(2, 3), tsne=False))
    assert _purity(result.clusterings["kmeans-02"], truth[order]) == 1.0
    assert spray.eigengap(result.eigenvalues) == 2
    assert result.layouts == {} and result.embedding.shape == (120, 32)
    assert sorted(result.clusterings) == ["hdbscan", "kmeans-02", "kmeans-03"]


def test_clever_hans_watermark_ends_in_its_own_cluster():
    """One class's relevance: most maps sit on the object (centre, jittered), a fifth on a corner watermark
    as well (the shortcut). k-means (k = 2) isolates the watermark samples; HDBSCAN never mixes them in."""
    rng = np.random.default_rng(3)
    n, n_mark = 150, 30
    rel = np.abs(rng.normal(0, 0.02, (n, 1, 64, 64))).astype(np.float32)
    for i in range(n):
        y, x = 24 + rng.integers(-6, 7), 24 + rng.integers(-6, 7)
        rel[i, 0, y: y + 16, x: x + 16] += rng.uniform(0.5, 1.0)
    marked = rng.choice(n, n_mark, replace=False)
    rel[marked, 0, 2:10, 54:62] += 3.0  # the watermark takes most of these maps' relevance
    truth = np.zeros(n, dtype=int)
    truth[marked] = 1
    result = spray.analyse(spray.preprocess(rel), spray.Params(clusters=(2,), tsne=False))
    km = result.clusterings["kmeans-02"]
    assert _purity(km, truth) == 1.0
    assert set(km[truth == 1]) != set(km[truth == 0])
    hd = result.clusterings["hdbscan"]  # may split a group by density, but never mixes marked and clean maps
    clustered = hd >= 0
    assert clustered[truth == 1].mean() > 0.8 and _purity(hd[clustered] + 1, truth[clustered]) == 1.0
    # margin: no kNN edge joins the two groups (two zero eigenvalues); the third is clearly above (0.036)
    np.testing.assert_allclose(result.eigenvalues[:2], [0, 0], atol=1e-6)
    assert result.eigenvalues[2] > 0.02


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_tiny_categories_still_get_every_clustering(n):
    feats = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    result = spray.analyse(feats, spray.Params(clusters=(2, 5)))
    assert sorted(result.clusterings) == ["hdbscan", "kmeans-02", "kmeans-05"]
    assert all(len(v) == n for v in result.clusterings.values())
    if n <= 5:  # k >= n: one cluster per sample
        np.testing.assert_array_equal(result.clusterings["kmeans-05"], np.arange(n))
    else:
        assert set(result.clusterings["kmeans-05"]) == set(range(5))
    tsne = result.layouts["tsne"]
    assert tsne.shape == (n, 2) and np.isfinite(tsne).all() and result.eigenvalues.shape == (min(n, 32),)
