"""SpRAy at scale (lrpcli/commands/analysis/spray.py): the large-category paths (kNN on principal components, t-SNE on
a subset with the rest placed by neighbours) and the memory bound (no N x N array anywhere)."""

from __future__ import annotations

import tracemalloc

import numpy as np

from lrpcli.commands.analysis import spray


def test_principal_components_keep_distances_of_low_rank_data():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 5)) @ rng.normal(size=(5, 40)) + 3.0).astype(np.float32)
    z = spray.principal_components(x, 8)
    assert z.shape == (500, 8) and z.dtype == np.float32
    d_x = np.linalg.norm(x[:50, None] - x[None, :50], axis=2)
    d_z = np.linalg.norm(z[:50, None] - z[None, :50], axis=2)
    np.testing.assert_allclose(d_z, d_x, rtol=1e-3, atol=1e-3)


def test_large_categories_search_neighbours_on_principal_components(monkeypatch):
    """Rank-6 data in 200 dimensions: the projected search finds the same graph as the exact one."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(400, 6)) @ rng.normal(size=(6, 200))).astype(np.float32)
    with spray.limit_threads(1):
        exact = spray.knn_affinity(x, 5)
    calls = []
    real = spray.principal_components
    monkeypatch.setattr(spray, "principal_components", lambda f, d: calls.append(d) or real(f, d))
    monkeypatch.setattr(spray, "KNN_PCA_FROM", 100)
    monkeypatch.setattr(spray, "KNN_PCA_DIMS", 16)
    with spray.limit_threads(1):
        projected = spray.knn_affinity(x, 5)
    assert calls == [16]
    assert (projected != exact).nnz == 0 and exact.nnz >= 400 * 5


def test_place_is_the_inverse_distance_weighted_mean_of_neighbours(monkeypatch):
    monkeypatch.setattr(spray, "PLACE_NEIGHBORS", 2)
    ref = np.array([[0.0], [1.0], [10.0]])
    layout = np.array([[0.0, 0.0], [4.0, 8.0], [100.0, 100.0]], dtype=np.float32)
    out = spray.place(ref, layout, np.array([[0.25], [1.0]]))
    # query 0.25: neighbours 0 (d 0.25, w 4) and 1 (d 0.75, w 4/3): (4 * 0 + 4/3 * 4) / (16/3) = 1
    np.testing.assert_allclose(out[0], [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out[1], [4.0, 8.0], atol=1e-5)  # a query on a reference sample lands on it


def test_tsne_fits_a_subset_and_places_the_rest_next_to_their_group():
    rng = np.random.default_rng(2)
    n = 400
    group = np.repeat([0, 1], n // 2)
    emb = rng.normal(0, 0.05, (n, 6)) + np.where(group[:, None] == 0, 0.0, 5.0)
    with spray.limit_threads(1):  # OpenMP workers spin on a busy machine
        out = spray.tsne(emb, seed=0, fit=60)
        again = spray.tsne(emb, seed=0, fit=60)
    assert out.shape == (n, 2) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, again)  # seeded: reproducible
    fitted = np.sort(np.random.default_rng(0).choice(n, 60, replace=False))
    placed = np.setdiff1d(np.arange(n), fitted)
    for g in (0, 1):  # every placed sample lies inside its own group's fitted box, never in the other's
        box = out[fitted[group[fitted] == g]]
        inside = ((out[placed] >= box.min(0)) & (out[placed] <= box.max(0))).all(axis=1)
        np.testing.assert_array_equal(inside, group[placed] == g)


def test_graph_and_embedding_never_allocate_n_by_n(monkeypatch):
    """6,000 samples: one dense N x N float32 would be 144 MB; the traced peak stays far below it, and the
    graph has at most 2 * N * k entries."""
    monkeypatch.setattr(spray, "KNN_PCA_FROM", 1000)  # the large-category path, at a size a test affords
    n, k = 6000, 10
    rng = np.random.default_rng(3)
    feats = (rng.normal(size=(n, 8)) @ rng.normal(size=(8, 128))).astype(np.float32)
    dense = n * n * 4
    tracemalloc.start()
    try:
        with spray.limit_threads(1):
            graph = spray.knn_affinity(feats, k)
            _, emb = spray.spectral_embedding(graph, 8)
            layout = spray.tsne(emb, fit=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert graph.nnz <= 2 * n * k and graph.nnz >= n * k
    assert emb.shape == (n, 8) and layout.shape == (n, 2)
    assert peak < dense / 4, f"peak {peak / 2**20:.0f} MiB"
