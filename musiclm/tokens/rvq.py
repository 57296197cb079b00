"""Residual vector quantizer for CLAP embeddings, trained the way open-musiclm trains its RVQ.

``num_quantizers`` codebooks of ``codebook_size`` vectors each; a vector is coded by picking the nearest code
of the first codebook, subtracting it, and repeating on the residual. Training uses no gradients: k-means
initialization level by level, then exponential-moving-average updates of each code towards the mean of
the residuals assigned to it (decay 0.95), and any code whose EMA usage falls below
``dead_code_threshold`` is replaced by a residual drawn from the current batch.

State is four tensors, saved as safetensors: ``codebooks (Q, K, D)``, ``cluster_size (Q, K)``,
``embed_sum (Q, K, D)``, ``initialized ()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .kmeans import lloyd_kmeans, nearest, sample_rows


@dataclass
class RVQFitReport:
    steps: int
    init_error: float  # mean squared quantization error right after k-means initialization
    final_error: float
    codes_used: list[int] = field(default_factory=list)  # distinct codes used on the fit data, per level
    dead_codes_replaced: int = 0

    def summary(self) -> str:
        used = sum(self.codes_used)
        return (f"RVQ fit: {self.steps} EMA steps, quantization MSE {self.init_error:.5f} after k-means init -> "
                f"{self.final_error:.5f}; {used} codes used over {len(self.codes_used)} levels "
                f"(per level {self.codes_used}); dead codes replaced {self.dead_codes_replaced}")


@torch.no_grad()
def ema_update(embed: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, x: torch.Tensor,
               idx: torch.Tensor, decay: float, eps: float, reduce=None) -> None:
    """One exponential-moving-average step of a codebook ``embed`` (K, D) toward the rows of ``x`` assigned to it
    (``idx``), its EMA counts ``cluster_size`` and sums ``embed_sum`` updated with it, all in place; Laplace
    smoothing (``eps``) keeps rarely used codes finite. ``reduce``, when given, sums the batch's counts and sums
    over workers first (in place)."""
    k = embed.shape[0]
    counts = torch.bincount(idx, minlength=k).to(x.dtype)
    sums = torch.zeros_like(embed).index_add_(0, idx, x)
    if reduce is not None:
        reduce(counts)
        reduce(sums)
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    embed.copy_(embed_sum / smoothed[:, None])


class ResidualVQ(nn.Module):
    def __init__(self, num_quantizers: int = 12, codebook_size: int = 1024, dim: int = 512,
                 decay: float = 0.95, dead_code_threshold: float = 0.5, eps: float = 1e-5):
        super().__init__()
        self.num_quantizers, self.codebook_size, self.dim = num_quantizers, codebook_size, dim
        self.decay, self.dead_code_threshold, self.eps = decay, dead_code_threshold, eps
        self.register_buffer("codebooks", torch.zeros(num_quantizers, codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(num_quantizers, codebook_size))
        self.register_buffer("embed_sum", torch.zeros(num_quantizers, codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    # ------------------------------------------------------------------ coding
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N, Q) for vectors (N, D)."""
        if not bool(self.initialized):
            raise RuntimeError("the RVQ has not been fitted yet: run `musiclm fit-rvq` on this token system first")
        residual = x.to(self.codebooks.dtype).clone()
        codes = []
        for q in range(self.num_quantizers):
            idx = nearest(residual, self.codebooks[q])
            residual -= self.codebooks[q][idx]
            codes.append(idx)
        return torch.stack(codes, dim=-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors (N, D) for codes (N, Q)."""
        out = torch.zeros(codes.shape[0], self.dim, dtype=self.codebooks.dtype, device=self.codebooks.device)
        for q in range(codes.shape[-1]):
            out += self.codebooks[q][codes[:, q]]
        return out

    @torch.no_grad()
    def quantization_error(self, x: torch.Tensor) -> float:
        return float(((x - self.decode(self.encode(x))) ** 2).sum(-1).mean())

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def init_kmeans(self, x: torch.Tensor, iters: int = 10, generator: torch.Generator | None = None) -> None:
        """Initialize every level by k-means on the residuals left by the levels before it."""
        generator = generator or torch.Generator().manual_seed(0)
        residual = x.to(self.codebooks.dtype).clone()
        for q in range(self.num_quantizers):
            centers, counts = lloyd_kmeans(residual, self.codebook_size, iters, generator)
            self.codebooks[q] = centers
            self.cluster_size[q] = counts
            self.embed_sum[q] = centers * counts[:, None]
            residual -= centers[nearest(residual, centers)]
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_step(self, x: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """One EMA update on a batch (N, D); returns how many dead codes were replaced."""
        generator = generator or torch.Generator().manual_seed(0)
        residual = x.to(self.codebooks.dtype).clone()
        replaced = 0
        for q in range(self.num_quantizers):
            idx = nearest(residual, self.codebooks[q])
            ema_update(self.codebooks[q], self.cluster_size[q], self.embed_sum[q], residual, idx, self.decay,
                       self.eps)
            dead = self.cluster_size[q] < self.dead_code_threshold
            if dead.any():
                fresh = sample_rows(residual, int(dead.sum()), generator)
                self.codebooks[q][dead] = fresh
                self.embed_sum[q][dead] = fresh
                self.cluster_size[q][dead] = 1.0
                replaced += int(dead.sum())
            residual -= self.codebooks[q][idx]  # the batch's assignment, as in EMA-trained VQ
        return replaced

    def fit(self, data: np.ndarray | torch.Tensor, steps: int = 1000, batch_size: int = 2048,
            init_iters: int = 10, init_size: int = 20_000, seed: int = 0, log=None) -> RVQFitReport:
        """k-means init on up to ``init_size`` vectors, then ``steps`` EMA steps on random batches."""
        x = torch.as_tensor(np.asarray(data, dtype=np.float32) if not torch.is_tensor(data) else data)
        x = x.to(self.codebooks.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RVQ fit expects vectors of shape (N, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("RVQ fit got no embeddings: no audio could be embedded")
        g = torch.Generator().manual_seed(seed)
        self.init_kmeans(sample_rows(x, init_size, g) if x.shape[0] > init_size else x,
                         iters=init_iters, generator=g)
        init_error = self.quantization_error(x)
        replaced = 0
        for step in range(steps):
            batch = sample_rows(x, min(batch_size, x.shape[0]), g)
            replaced += self.ema_step(batch, g)
            if log and (step + 1) % max(1, steps // 10) == 0:
                log(f"RVQ step {step + 1}/{steps}: quantization MSE {self.quantization_error(x):.5f}")
        codes = self.encode(x)
        used = [int(torch.unique(codes[:, q]).numel()) for q in range(self.num_quantizers)]
        return RVQFitReport(steps, init_error, self.quantization_error(x), used, replaced)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise ValueError(f"{source}: RVQ tensors {got} do not match the configured RVQ {expected} "
                             f"(rq_num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
                             f"dim={self.dim})")
        self.load_state_dict(tensors)

