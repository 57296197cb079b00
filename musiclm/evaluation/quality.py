"""Scores of generated music that papers report, computed with the encoders a token system already loads:

- **FAD**, the Fréchet distance between Gaussian fits of two sets of embeddings (generated vs reference audio):
  ``|mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½)``, with CLAP audio embeddings (one per 10 s window) or
  semantic-encoder embeddings (MERT/HuBERT features of the token system's layer, mean-pooled per window).
  The numbers depend on the embedding model and its weights: reports name them (``embedding_names``).
- **CLAP score**, the mean cosine similarity of each prompt's text embedding and its audio's embedding.

``(S_a S_b)^½`` is taken the symmetric way: its trace is that of ``(A S_b A)^½`` with ``A = S_a^½``, a symmetric
positive semi-definite matrix whose eigenvalues are real; eigenvalues below zero (rounding) are clipped and,
when not negligible, reported. Covariances are estimated with ``n - 1``; with fewer samples than embedding
dimensions they are singular and FAD is biased upwards (a warning says so).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLAP_WINDOW_SECONDS = 10.0


@dataclass
class Gaussian:
    mean: np.ndarray  # (dim,)
    cov: np.ndarray  # (dim, dim)
    n: int

    @classmethod
    def fit(cls, embeddings) -> "Gaussian":
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 embeddings of shape (n, dim) to fit a Gaussian, got {x.shape}")
        return cls(x.mean(0), np.cov(x, rowvar=False), len(x))


def _sqrt_psd(m: np.ndarray) -> tuple[np.ndarray, float]:
    """Square root of a symmetric positive semi-definite matrix, and the most negative eigenvalue clipped."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    clipped = float(min(vals.min(), 0.0))
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T, clipped


def frechet_distance(a: Gaussian, b: Gaussian) -> tuple[float, float]:
    """(Fréchet distance of two Gaussians, the most negative eigenvalue clipped on the way)."""
    root_a, neg_a = _sqrt_psd(a.cov)
    vals = np.linalg.eigvalsh(root_a @ b.cov @ root_a)
    neg = min(neg_a, float(min(vals.min(), 0.0)))
    cross = float(np.sqrt(np.clip(vals, 0, None)).sum())
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * cross), neg


def fad(generated, reference) -> dict:
    """FAD of two sets of embeddings (n, dim), with what a reader needs to trust it."""
    a, b = Gaussian.fit(generated), Gaussian.fit(reference)
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"embeddings of different sizes: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    value, negative = frechet_distance(a, b)
    dim = a.mean.shape[0]
    out = {"fad": max(value, 0.0), "n_generated": a.n, "n_reference": b.n, "dim": dim, "warnings": []}
    if min(a.n, b.n) <= dim:
        out["warnings"].append(f"{min(a.n, b.n)} samples for {dim}-dimensional embeddings: the covariance is "
                               f"singular and FAD is biased upwards; compare only FADs with the same sample counts")
    scale = max(np.trace(a.cov), np.trace(b.cov), 1e-30)
    if negative < -1e-6 * scale:
        out["warnings"].append(f"negative eigenvalue {negative:.3g} clipped in the matrix square root")
    return out


def clap_score(system, prompts: list[str], audio: list[np.ndarray], rate: int) -> list[float]:
    """CLAP score of each (prompt, audio) pair, the same similarity that ranks generated candidates
    (``generation.generate.clap_scores``: mean of the unit-norm 10 s window embeddings; one window up to 10 s)."""
    from ..generation.generate import clap_scores

    if len(prompts) != len(audio):
        raise ValueError(f"{len(prompts)} prompts for {len(audio)} clips")
    return [float(clap_scores(system, prompt, [clip], rate)[0]) for prompt, clip in zip(prompts, audio)]


def clap_embeddings(system, audio: np.ndarray, rate: int) -> torch.Tensor:
    """CLAP audio embeddings (windows, dim) of a mono clip: one per 10 s window, as tokenizing makes them."""
    from ..tokens.system import tokenizer_input

    x = tokenizer_input("clap", np.asarray(audio, dtype=np.float32), rate, system.clap.sample_rate)
    return system.clap.audio_embeddings(x)


def semantic_embeddings(system, audio: np.ndarray, rate: int,
                        window_seconds: float = CLAP_WINDOW_SECONDS) -> torch.Tensor:
    """Semantic-encoder embeddings (windows, dim) of a mono clip: the token system's layer features (as its
    k-means reads them), mean-pooled over each ``window_seconds`` (a shorter last window is kept when at least
    half a window long, or when it is the only one)."""
    from ..tokens.system import tokenizer_input

    feats = system.semantic.features(tokenizer_input("semantic", np.asarray(audio, dtype=np.float32), rate,
                                                     system.semantic.sample_rate))
    per = max(1, int(round(window_seconds * system.semantic.cfg.output_hz)))
    windows = [feats[i: i + per] for i in range(0, len(feats), per)]
    kept = [w for w in windows if len(w) * 2 >= per] or windows[:1]
    return torch.stack([w.mean(0) for w in kept])


def embedding_names(system) -> dict[str, str]:
    """What the embeddings are, for reports: model ids/paths and the token system's fingerprint of their weights."""
    from ..tokens.system import read_meta

    meta = read_meta(system.root)[0]
    cfg, parts = system.config, meta.get("fingerprint_parts", {})
    return {"clap": f"{cfg.clap_rvq_cfg.model_name} (weights {str(parts.get('clap_weights', '?'))[:12]})",
            "semantic": f"{cfg.hubert_kmeans_cfg.model_name} layer {cfg.hubert_kmeans_cfg.embed_layer} "
                        f"(weights {str(parts.get('semantic_weights', '?'))[:12]}), mean over "
                        f"{CLAP_WINDOW_SECONDS:g} s windows"}


__all__ = ["Gaussian", "frechet_distance", "fad", "clap_score", "clap_embeddings", "semantic_embeddings",
           "embedding_names"]
