"""FAD and CLAP score (musiclm/evaluation/quality.py) against closed forms, scipy and transformers' ClapModel itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musiclm.evaluation.quality import (Gaussian, clap_embeddings, clap_score, embedding_names, fad, frechet_distance,
                                        semantic_embeddings)


def test_fad_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((300, 32)) * 3 + 1
    out = fad(x, x)
    assert out["fad"] == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(x, rowvar=False)))
    assert (out["n_generated"], out["n_reference"], out["dim"], out["warnings"]) == (300, 300, 32, [])


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    """Diagonal covariances: |mu_a - mu_b|² + Σ (√s_a - √s_b)²; and a rotated pair (same eigenvectors)."""
    rng = np.random.default_rng(1)
    mu_a, mu_b, s_a, s_b = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(s_a) - np.sqrt(s_b)) ** 2).sum()
    got, negative = frechet_distance(Gaussian(mu_a, np.diag(s_a), 100), Gaussian(mu_b, np.diag(s_b), 100))
    assert got == pytest.approx(expected, rel=1e-10) and negative == 0.0
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rotated, _ = frechet_distance(Gaussian(q @ mu_a, q @ np.diag(s_a) @ q.T, 100),
                                  Gaussian(q @ mu_b, q @ np.diag(s_b) @ q.T, 100))
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_fad_agrees_with_scipy_sqrtm_on_random_embeddings():
    """The usual implementation (pytorch-fid, frechet_audio_distance): scipy.linalg.sqrtm of S_a S_b, real part."""
    from scipy import linalg

    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 24)) @ rng.normal(size=(24, 24))
    b = rng.standard_normal((350, 24)) @ rng.normal(size=(24, 24)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    reference = diff @ diff + np.trace(ca) + np.trace(cb) - 2 * np.trace(linalg.sqrtm(ca @ cb).real)
    assert fad(a, b)["fad"] == pytest.approx(reference, rel=1e-7)


def test_fad_warns_when_too_few_samples_and_refuses_mismatched_sizes():
    rng = np.random.default_rng(3)
    assert "biased" in fad(rng.normal(size=(10, 16)), rng.normal(size=(50, 16)))["warnings"][0]
    with pytest.raises(ValueError, match="different sizes"):
        fad(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        fad(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))


def test_clap_score_equals_transformers_clap_model_recomputed_directly(tiny_system):
    """Text through the tokenizer and ClapModel.get_text_features, audio through transformers' own
    ClapFeatureExtractor and get_audio_features, cosine: the same scores (up to float rounding; ours go through
    this project's featurizer and the reranking's window averaging)."""
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(48_000 * 4).astype(np.float32) * 0.1 for _ in range(3)]
    prompts = ["a jazz piano trio", "heavy metal guitar", "ambient synth pads"]
    ours = clap_score(tiny_system, prompts, audio, 48_000)
    model, processor = tiny_system.clap.model, tiny_system.clap.processor
    with torch.no_grad():
        text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        t = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        feats = processor.feature_extractor(audio, sampling_rate=48_000, return_tensors="pt")
        a = model.get_audio_features(input_features=feats["input_features"], is_longer=feats["is_longer"])
    t, a = (getattr(x, "pooler_output", x) for x in (t, a))
    direct = torch.nn.functional.cosine_similarity(t, a).tolist()
    assert ours == pytest.approx(direct, abs=1e-5)
    assert len(set(np.round(ours, 6))) == 3  # three different pairs, three scores


def test_embeddings_per_window_and_their_names(tiny_system):
    audio = np.random.default_rng(1).standard_normal(24_000 * 26).astype(np.float32) * 0.1  # 26 s at 24 kHz
    assert clap_embeddings(tiny_system, audio, 24_000).shape[0] >= 2  # 10 s windows, 1 s hop (tokenizing's)
    sem = semantic_embeddings(tiny_system, audio, 24_000)
    assert sem.shape[0] == 3 and torch.isfinite(sem).all()  # 10 s, 10 s, and the 6 s rest (over half a window)
    assert semantic_embeddings(tiny_system, audio[:24_000 * 12], 24_000).shape[0] == 1  # 2 s rest dropped
    names = embedding_names(tiny_system)
    parts = tiny_system.fingerprint_parts()
    assert f"(weights {parts['clap_weights'][:12]})" in names["clap"]
    assert f"layer 7 (weights {parts['semantic_weights'][:12]})" in names["semantic"]
