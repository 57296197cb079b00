"""The three stage layouts (DESIGN.md) over the one decoder, and the loss and accuracy of a batch.

- semantic: clap → semantic
- coarse:   clap, semantic → coarse (``num_coarse_quantizers`` EnCodec codebooks)
- fine:     clap, coarse → fine (``num_fine_quantizers`` EnCodec codebooks)

A batch is a dict of int64 arrays or tensors named as the token dataset's columns, cropped to the stage's
window (``musiclm.data.shards.StageCrop``): ``clap`` (b, 12), ``semantic`` (b, T), ``coarse`` (b, T, 3),
``fine`` (b, T, 5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import STAGES, ModelConfig, check
from ..data.shards import STAGE_INPUTS
from .transformer import TokenConditionedTransformer, TokenSequence


def stage_sequences(stage: str, model_cfg: ModelConfig) -> list[TokenSequence]:
    check(stage in STAGES, "stage", f"{stage!r} is not one of {', '.join(STAGES)}")
    g = model_cfg.global_cfg
    sizes = {
        "clap": (model_cfg.clap_rvq_cfg.codebook_size, model_cfg.clap_rvq_cfg.rq_num_quantizers),
        "semantic": (model_cfg.hubert_kmeans_cfg.codebook_size, 1),
        "coarse": (model_cfg.encodec_cfg.codebook_size, g.num_coarse_quantizers),
        "fine": (model_cfg.encodec_cfg.codebook_size, g.num_fine_quantizers),
    }
    return [TokenSequence(name, *sizes[name]) for name in STAGE_INPUTS[stage]]


def build_stage(stage: str, model_cfg: ModelConfig) -> TokenConditionedTransformer:
    return TokenConditionedTransformer(stage_sequences(stage, model_cfg), model_cfg.stage(stage))


def split_batch(model: TokenConditionedTransformer, batch: dict, device=None) -> tuple[list[Tensor], Tensor]:
    """(conditioning tensors, target tensor) of a batch, on ``device``."""
    tensors = [torch.as_tensor(batch[s.name], dtype=torch.long, device=device) for s in model.sequences]
    return tensors[:-1], tensors[-1]


def chance_loss(model: TokenConditionedTransformer) -> float:
    """Cross-entropy of a uniform guess over the target vocabulary (codebook plus eos): ln(V)."""
    return math.log(model.target.codebook_size + 1)


def stage_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the target tokens and the eos after them, as open-musiclm computes it."""
    b = target.shape[0]
    flat = target.reshape(b, -1)
    labels = torch.cat((flat, flat.new_full((b, 1), logits.shape[-1] - 1)), dim=1)
    return F.cross_entropy(logits.float().transpose(1, 2), labels)


# The frames at the start of a target window where the CLAP condition is most of what a stage knows of its track:
# further on, the window's own tokens tell it (on a 256-track synthetic corpus the semantic stage's conditioning
# gain was +0.031 ± 0.012 nats on its first 5 tokens and +0.002 ± 0.002 on tokens 5-25; over the window, +0.0003).
OPENING_FRAMES = 5


def opening_losses(logits: Tensor, target: Tensor, frames: int = OPENING_FRAMES) -> Tensor:
    """(b,) each example's mean cross-entropy over the tokens of its first ``frames`` target frames (every
    codebook of a frame), the positions ``stage_loss`` scores them at."""
    b, q = target.shape[0], (target.shape[2] if target.dim() == 3 else 1)
    k = min(frames * q, target[0].numel())
    labels = target.reshape(b, -1)[:, :k]
    return F.cross_entropy(logits[:, :k].float().transpose(1, 2), labels, reduction="none").mean(1)


def token_hits(logits: Tensor, target: Tensor) -> Tensor:
    """(b, T, q) 1.0 where the most likely token (eos position excluded) is the target token."""
    b, q = target.shape[0], (target.shape[2] if target.dim() == 3 else 1)
    return (logits[:, :-1].argmax(-1) == target.reshape(b, -1)).float().reshape(b, -1, q)


def loss_and_metrics(logits: Tensor, target: Tensor, num_quantizers: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``stage_loss`` plus token accuracy of the target tokens, overall and per codebook (``accuracy_q{k}``)."""
    loss = stage_loss(logits, target)
    with torch.no_grad():
        hits = token_hits(logits, target)
        metrics = {"loss": loss.detach(), "accuracy": hits.mean()}
        per_q = hits.mean(dim=(0, 1))
        for k in range(num_quantizers):
            metrics[f"accuracy_q{k}"] = per_q[k]
    return loss, metrics


__all__ = ["OPENING_FRAMES", "stage_sequences", "build_stage", "split_batch", "chance_loss", "loss_and_metrics",
           "opening_losses", "stage_loss", "token_hits"]
