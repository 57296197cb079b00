"""Nearest-centroid assignment and k-means, in torch (used by the RVQ and to seed the tiny EnCodec's
codebooks) and scikit-learn's MiniBatchKMeans for the semantic tokens (as open-musiclm)."""
from __future__ import annotations

import numpy as np
import torch

_CHUNK = 8192


@torch.no_grad()
def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest center (Euclidean) for every row of ``x``; chunked to bound memory."""
    c2 = (centers * centers).sum(-1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], _CHUNK):
        xi = x[i: i + _CHUNK]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row
        out[i: i + _CHUNK] = (c2 - 2 * xi @ centers.T).argmin(-1)
    return out


def sample_rows(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random rows of ``x``; with replacement when ``x`` has fewer than ``n`` rows."""
    if x.shape[0] >= n:
        idx = torch.randperm(x.shape[0], generator=generator)[:n]
    else:
        idx = torch.randint(0, x.shape[0], (n,), generator=generator)
    return x[idx.to(x.device)]


@torch.no_grad()
def lloyd_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain k-means. Returns ``(centers (k, d), counts (k,))``; empty clusters keep their previous center."""
    centers = sample_rows(x, k, generator).clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest(x, centers)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return centers, counts


def fit_minibatch_kmeans(features: np.ndarray, n_clusters: int, seed: int = 0, batch_size: int = 10_000,
                         max_iter: int = 100, n_init: int = 3) -> np.ndarray:
    """Fit scikit-learn's MiniBatchKMeans on ``features`` (N, D); returns float32 centers (n_clusters, D).

    Settings follow open-musiclm (k-means++ init, no reassignment, patience 100 batches) with fewer inits.
    """
    from sklearn.cluster import MiniBatchKMeans

    if features.shape[0] < n_clusters:
        raise ValueError(f"k-means with {n_clusters} clusters needs at least {n_clusters} feature frames, "
                         f"got {features.shape[0]}: give it more audio")
    km = MiniBatchKMeans(n_clusters=n_clusters, init="k-means++", max_iter=max_iter,
                         batch_size=min(batch_size, features.shape[0]), compute_labels=False, tol=0.0,
                         max_no_improvement=100, n_init=n_init, reassignment_ratio=0.0, random_state=seed)
    km.fit(features.astype(np.float32, copy=False))
    return km.cluster_centers_.astype(np.float32)
