import numpy as np
import pytest
import torch

from musiclm.tokens.kmeans import nearest
from musiclm.tokens.rvq import ResidualVQ


def clustered(n=6000, dim=64, clusters=200, seed=0):
    """Unit vectors around ``clusters`` centers, like CLAP embeddings of a varied corpus."""
    g = np.random.default_rng(seed)
    centers = g.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[g.integers(0, clusters, n)] + 0.35 * g.standard_normal((n, dim)).astype(np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def test_fit_uses_most_codes_and_lowers_error_versus_init():
    x = clustered()
    rvq = ResidualVQ(num_quantizers=4, codebook_size=128, dim=64)
    report = rvq.fit(x, steps=150, batch_size=1024, init_size=1024, init_iters=3)
    print(report.summary())  # figures for the closing note
    assert report.final_error < 0.85 * report.init_error
    assert all(used >= 0.8 * 128 for used in report.codes_used), report.codes_used
    assert report.dead_codes_replaced > 0


def test_encode_is_greedy_residual_nearest_code():
    x = clustered(n=500)
    rvq = ResidualVQ(num_quantizers=3, codebook_size=32, dim=64)
    rvq.init_kmeans(x, iters=3)
    codes = rvq.encode(x)
    residual = x.clone()
    for q in range(3):  # brute force with explicit distances
        dist = torch.cdist(residual, rvq.codebooks[q])
        expect = dist.argmin(-1)
        assert torch.equal(codes[:, q], expect)
        residual -= rvq.codebooks[q][expect]
    assert torch.allclose(rvq.decode(codes), x - residual, atol=1e-5)
    assert codes.min() >= 0 and codes.max() < 32


def test_dead_code_is_replaced_by_data():
    x = clustered(n=2000)
    rvq = ResidualVQ(num_quantizers=1, codebook_size=16, dim=64, dead_code_threshold=0.5)
    rvq.init_kmeans(x, iters=3)
    rvq.codebooks[0, 5] = 100.0  # a code nothing will ever pick
    rvq.cluster_size[0, 5] = 0.0
    rvq.ema_step(x[:512])
    assert rvq.codebooks[0, 5].abs().max() < 5.0  # now a real residual
    assert int((nearest(x, rvq.codebooks[0]) == 5).sum()) > 0


def test_unfitted_rvq_refuses_to_encode():
    with pytest.raises(RuntimeError, match="fit-rvq"):
        ResidualVQ(2, 8, 4).encode(torch.zeros(3, 4))
