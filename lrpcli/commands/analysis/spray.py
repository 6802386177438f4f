"""Spectral relevance analysis (SpRAy): pure functions from relevance maps to embeddings and clusterings.

The steps follow Lapuschkin et al. (2019, "Unmasking Clever Hans predictors") as packaged by CoRelAy/ViRelAy
(Anders et al., 2022): each map is summed over channels, average-pooled to a small square, scaled to unit
L1 norm and flattened; a sparse k-nearest-neighbour graph connects similar maps; the smallest eigenvalues of
its normalised Laplacian (their gaps tell how many groups there are) and their eigenvectors form the spectral
embedding; k-means (one clustering per k) and HDBSCAN group it; t-SNE lays it out in 2-d for display.

Memory: only the pooled features (N x size^2 float32) and the kNN graph (N x neighbours entries) are held;
there is no N x N matrix. scikit-learn and scipy do the numerics (well-kept, already needed by ViRelAy's
stack); CoRelAy itself was not used because it pulls in a dense pairwise-distance step (N^2 memory).

Time: the two steps that grow faster than N are bounded for large categories. The exact kNN search costs
N^2 * d, so above ``KNN_PCA_FROM`` samples it runs on the leading ``KNN_PCA_DIMS`` principal components (an
exact PCA from the d x d covariance: deterministic, and pooled relevance maps are smooth, so little is lost);
t-SNE is fitted on at most ``Params.tsne_fit`` samples (a seeded random subset) and every other sample is
placed at the distance-weighted mean of its nearest fitted neighbours in the spectral embedding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

#: Below this many samples the eigenproblem is solved densely (exact, and faster than ARPACK for small N).
DENSE_LIMIT = 600
#: Above this many samples the kNN search runs on principal components (its cost is N^2 * dimensions).
KNN_PCA_FROM = 10_000
#: Principal components kept for that search.
KNN_PCA_DIMS = 64
#: Fitted neighbours that place a sample left out of the t-SNE fit.
PLACE_NEIGHBORS = 10


def pool(maps: np.ndarray, size: int) -> np.ndarray:
    """Average-pool ``(n, H, W)`` maps to ``(n, size, size)`` over (nearly) equal areas.

    Bin edges are ``floor(i * H / size)``, so sizes that do not divide H are handled; maps smaller than
    ``size`` are kept at their size (nothing is upsampled).
    """
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape
    sh, sw = min(size, h), min(size, w)
    rows = (np.arange(sh) * h) // sh
    cols = (np.arange(sw) * w) // sw
    summed = np.add.reduceat(np.add.reduceat(maps, rows, axis=1), cols, axis=2)
    count_r = np.diff(np.append(rows, h)).astype(np.float32)
    count_c = np.diff(np.append(cols, w)).astype(np.float32)
    return summed / (count_r[None, :, None] * count_c[None, None, :])


def preprocess(relevance: np.ndarray, size: int = 32, absolute: bool = False) -> np.ndarray:
    """Relevance ``(n, C, H, W)`` (or ``(n, H, W)``) to SpRAy features ``(n, size*size)`` float32.

    Channel sum, optional absolute value, average pooling to ``size`` x ``size``, then each map divided by its
    L1 norm so that maps are compared by where relevance lies, not by how much there is (an all-zero map
    stays zero).
    """
    rel = np.asarray(relevance, dtype=np.float32)
    if rel.ndim == 4:
        rel = rel.sum(axis=1, dtype=np.float32)
    if rel.ndim != 3:
        raise ValueError(f"relevance must be (n, C, H, W) or (n, H, W), got shape {rel.shape}")
    if absolute:
        rel = np.abs(rel)
    pooled = pool(rel, size).reshape(rel.shape[0], -1)
    norm = np.abs(pooled).sum(axis=1, keepdims=True)
    np.divide(pooled, norm, out=pooled, where=norm > 0)
    return pooled


def principal_components(features: np.ndarray, dims: int, chunk: int = 2048) -> np.ndarray:
    """``features`` projected onto their ``dims`` leading principal components (float32, ``(n, dims)``).

    Exact: the d x d covariance is accumulated in float64 over row chunks and decomposed densely, so the result
    does not depend on a seed; the projection is made chunk by chunk too (no centred copy of all features).
    """
    x = np.asarray(features, dtype=np.float32)
    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, chunk):
        c = x[start: start + chunk].astype(np.float64) - mean
        cov += c.T @ c
    _, vec = np.linalg.eigh(cov)
    basis = vec[:, ::-1][:, :dims].astype(np.float32)
    out = np.empty((n, basis.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):  # chunk by chunk: no centred copy of all features
        out[start: start + chunk] = (x[start: start + chunk] - mean.astype(np.float32)) @ basis
    return out


def knn_affinity(features: np.ndarray, n_neighbors: int = 10) -> sp.csr_matrix:
    """Symmetric 0/1 affinity: i and j are joined when either is among the other's ``n_neighbors`` nearest
    (Euclidean) neighbours. Sparse, at most ``2 * n * n_neighbors`` entries; no self-loops.

    Above ``KNN_PCA_FROM`` samples, distances are taken on ``KNN_PCA_DIMS`` principal components: the exact
    search costs n^2 * d, and 64 components cut d sixteen-fold for maps pooled to 32 x 32.
    """
    from sklearn.neighbors import kneighbors_graph

    n = features.shape[0]
    if n < 2:
        return sp.csr_matrix((n, n), dtype=np.float64)
    if n > KNN_PCA_FROM and features.shape[1] > KNN_PCA_DIMS:
        features = principal_components(features, KNN_PCA_DIMS)
    k = max(1, min(n_neighbors, n - 1))
    graph = kneighbors_graph(features, k, mode="connectivity", include_self=False)
    graph = graph.maximum(graph.T).tocsr().astype(np.float64)
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def spectral_embedding(affinity: sp.spmatrix, n_eigval: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_eigval`` smallest eigenvalues of the normalised Laplacian ``L = I - D^-1/2 A D^-1/2`` (ascending;
    one 0 per connected component) and the matching eigenvectors mapped back by ``D^-1/2`` and scaled to unit
    length (the random-walk form, constant on a connected component), as ``(eigenvalues, embedding)`` with
    ``embedding`` of shape ``(n, n_eigval)``.

    Solved as the largest eigenvalues of ``D^-1/2 A D^-1/2`` (ARPACK, no shift-invert), densely for small n.
    Signs are fixed (largest-magnitude entry positive) so that runs are reproducible.
    """
    a = sp.csr_matrix(affinity, dtype=np.float64)
    n = a.shape[0]
    k = max(1, min(int(n_eigval), n))
    deg = np.asarray(a.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(deg)
    np.divide(1.0, np.sqrt(deg), out=inv_sqrt, where=deg > 0)
    m = sp.diags(inv_sqrt) @ a @ sp.diags(inv_sqrt)
    isolated = deg == 0
    if isolated.any():  # an isolated node is a component of its own: eigenvalue 0 of L, i.e. 1 of M
        m = m + sp.diags(isolated.astype(np.float64))
    if n <= DENSE_LIMIT or k >= n - 1:
        mu, vec = np.linalg.eigh(m.toarray())
        mu, vec = mu[::-1][:k], vec[:, ::-1][:, :k]
    else:
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).uniform(0.5, 1.5, n)
        mu, vec = eigsh(m, k=k, which="LA", v0=v0, tol=1e-9, maxiter=max(5000, 20 * n))
        order = np.argsort(-mu)
        mu, vec = mu[order], vec[:, order]
    eigenvalues = np.clip(1.0 - mu, 0.0, 2.0)
    scale = np.where(isolated, 1.0, inv_sqrt)
    embedding = vec * scale[:, None]
    embedding /= np.maximum(np.linalg.norm(embedding, axis=0, keepdims=True), 1e-300)
    flip = np.sign(embedding[np.abs(embedding).argmax(axis=0), np.arange(k)])
    embedding *= np.where(flip == 0, 1.0, flip)[None, :]
    return eigenvalues, embedding


def eigengap(eigenvalues: np.ndarray) -> int:
    """The number of groups the spectrum suggests: the position of the largest gap between consecutive
    eigenvalues (at least 1)."""
    ev = np.asarray(eigenvalues, dtype=np.float64)
    if ev.size < 2:
        return 1
    return int(np.argmax(np.diff(ev))) + 1


def kmeans(embedding: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on the first ``k`` spectral coordinates (Shi-Malik / Ng-Jordan-Weiss spectral clustering).

    When a category has no more than ``k`` samples, each sample is its own cluster, so that every category
    carries the same clustering names (ViRelAy lists them from the first category).
    """
    from sklearn.cluster import KMeans

    n = embedding.shape[0]
    if n <= k:
        return np.arange(n, dtype=np.int64)
    x = embedding[:, : max(1, min(k, embedding.shape[1]))]
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return _relabel(labels)


def hdbscan(embedding: np.ndarray, n_dims: int, min_cluster_size: int | None = None) -> np.ndarray:
    """Density-based clustering (HDBSCAN) on the first ``n_dims`` spectral coordinates; -1 marks noise.

    The default smallest cluster is 5% of the category (5 to 100 samples): smaller groups are noise.
    """
    from sklearn.cluster import HDBSCAN

    n = embedding.shape[0]
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    size = min_cluster_size or max(5, min(100, n // 20))
    x = embedding[:, : max(2, min(n_dims, embedding.shape[1]))]
    labels = HDBSCAN(min_cluster_size=min(size, n - 1), copy=True).fit_predict(x)
    return _relabel(labels)


def tsne(embedding: np.ndarray, seed: int = 0, perplexity: float = 30.0, fit: int = 2000) -> np.ndarray:
    """A 2-d t-SNE layout of the spectral embedding, for display (``(n, 2)`` float32).

    At most ``fit`` samples (a random subset drawn with ``seed``) are fitted; each other sample is placed at
    the inverse-distance-weighted mean of the layout of its ``PLACE_NEIGHBORS`` nearest fitted samples in the
    spectral embedding. t-SNE costs grow faster than n, placement is one cheap kNN query, and a display of
    more than a few thousand points per class shows no more structure.
    Perplexity is lowered to ``(n - 1) / 3`` for small categories; with fewer than 4 samples the first two
    spectral coordinates are used instead.
    """
    n = embedding.shape[0]
    if n < 4:
        out = np.zeros((n, 2), dtype=np.float32)
        d = min(2, embedding.shape[1])
        out[:, :d] = embedding[:, :d]
        return out
    if n <= fit:
        return _fit_tsne(embedding, seed, perplexity)
    fitted = np.sort(np.random.default_rng(seed).choice(n, max(4, fit), replace=False))
    out = np.empty((n, 2), dtype=np.float32)
    out[fitted] = _fit_tsne(embedding[fitted], seed, perplexity)
    rest = np.setdiff1d(np.arange(n), fitted)
    out[rest] = place(embedding[fitted], out[fitted], embedding[rest])
    return out


def _fit_tsne(embedding: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    from sklearn.manifold import TSNE

    perp = float(min(perplexity, (embedding.shape[0] - 1) / 3.0))
    layout = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(embedding)
    return layout.astype(np.float32)


def place(reference: np.ndarray, layout: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Positions for ``queries`` in the 2-d ``layout`` of ``reference``: the inverse-distance-weighted mean of
    their nearest reference samples' positions (a query equal to a reference sample lands on it)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(PLACE_NEIGHBORS, reference.shape[0])
    dist, idx = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(queries)
    weight = 1.0 / np.maximum(dist, 1e-12)
    weight /= weight.sum(axis=1, keepdims=True)
    return np.einsum("qk,qkc->qc", weight, layout[idx]).astype(np.float32)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered by first appearance (noise stays -1): deterministic names for equal partitions."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full_like(labels, -1)
    seen: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        if lab < 0:
            continue
        out[i] = seen.setdefault(lab, len(seen))
    return out


@dataclass
class Params:
    """The knobs of one analysis; stored with it so that a result can be reproduced."""

    size: int = 32
    absolute: bool = False
    neighbors: int = 10
    eigenvalues: int = 32
    clusters: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10)
    tsne: bool = True
    #: Largest number of samples of a category that t-SNE fits; the others are placed by their neighbours.
    tsne_fit: int = 2000
    seed: int = 0
    #: Threads of the numerical libraries (BLAS, OpenMP). 1 by default: their workers spin while they wait,
    #: and on a busy machine one thread ran k-means 70x and t-SNE 5x faster than two (share/bench).
    threads: int = 1


@dataclass
class Result:
    """The SpRAy outputs for one category (rows in the order of ``features``)."""

    eigenvalues: np.ndarray
    embedding: np.ndarray
    clusterings: dict[str, np.ndarray] = field(default_factory=dict)
    layouts: dict[str, np.ndarray] = field(default_factory=dict)


def analyse(features: np.ndarray, params: Params, times: dict[str, list[float]] | None = None) -> Result:
    """The full SpRAy pipeline on one category's preprocessed features ``(n, d)``.

    ``times``, when given, collects each stage's ``[wall, CPU]`` seconds (added to what it already holds):
    ``graph``, ``eigen``, ``clustering``, ``embedding``; share/bench/bench_analyze.py reports them.
    """
    with limit_threads(params.threads):
        return _analyse(features, params, times if times is not None else {})


def limit_threads(threads: int):
    """A context limiting BLAS and OpenMP to ``threads``. The libraries are imported first: threadpoolctl only
    limits thread pools already loaded, and scikit-learn loads its OpenMP runtime on first import."""
    import scipy.sparse.linalg  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.manifold  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(threads)


def _analyse(features: np.ndarray, params: Params, times: dict[str, list[float]]) -> Result:
    with _stage(times, "graph"):
        graph = knn_affinity(features, params.neighbors)
    with _stage(times, "eigen"):
        eigenvalues, embedding = spectral_embedding(graph, params.eigenvalues, params.seed)
    with _stage(times, "clustering"):
        clusterings = {f"kmeans-{k:02d}": kmeans(embedding, k, params.seed) for k in params.clusters}
        clusterings["hdbscan"] = hdbscan(embedding, min(8, max(4, eigengap(eigenvalues) + 1)))
    with _stage(times, "embedding"):
        layouts = {"tsne": tsne(embedding, params.seed, fit=params.tsne_fit)} if params.tsne else {}
    return Result(eigenvalues.astype(np.float32), embedding.astype(np.float32), clusterings, layouts)


@contextmanager
def _stage(times: dict[str, list[float]], name: str) -> Iterator[None]:
    """Adds the block's wall and process CPU seconds to ``times[name]``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    total = times.setdefault(name, [0.0, 0.0])
    total[0] += time.perf_counter() - wall
    total[1] += time.process_time() - cpu
