"""Validation sums reduced over workers, TensorBoard on rank 0, and the chance-level check."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..models.stages import token_hits

CHANCE_TOLERANCE = 0.02  # within 2 % of ln(V): the model predicts no better than a uniform guess


class ValidSums:
    """Token-weighted sums of loss and hits over validation batches; ``reduce`` adds them over workers."""

    def __init__(self, num_quantizers: int):
        self.q = num_quantizers
        self.t = torch.zeros(4 + num_quantizers, dtype=torch.float64)  # loss·n, n, hits, tokens, hits per q

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        hits = token_hits(logits, target).double().cpu()
        n_labels = logits.shape[0] * logits.shape[1]
        self.t[0] += float(loss) * n_labels
        self.t[1] += n_labels
        self.t[2] += hits.sum()
        self.t[3] += hits.numel()
        self.t[4:] += hits.sum(dim=(0, 1))

    def reduce(self) -> dict[str, float]:
        t = self.t
        if dist.is_available() and dist.is_initialized():
            t = t.clone()
            dist.all_reduce(t)
        if t[1] == 0:
            raise RuntimeError("the validation subset gave no batches")
        out = {"valid/loss": float(t[0] / t[1]), "valid/accuracy": float(t[2] / t[3])}
        per = t[3] / self.q
        for k in range(self.q):
            out[f"valid/accuracy_q{k}"] = float(t[4 + k] / per)
        return out


def mean_over_workers(value: float) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / dist.get_world_size()
    return value


def at_chance(valid_loss: float, vocabulary: int) -> bool:
    chance = math.log(vocabulary)
    return abs(valid_loss - chance) <= CHANCE_TOLERANCE * chance


def chance_message(stage: str, step: int, valid_loss: float, vocabulary: int) -> str:
    return (f"WARNING: {stage} validation loss {valid_loss:.3f} at step {step} is within "
            f"{CHANCE_TOLERANCE:.0%} of ln({vocabulary}) = {math.log(vocabulary):.3f}: the model is at chance "
            f"level. Usual causes: the dataset and the initial checkpoint come from different token systems, "
            f"an lr too high or too low, or tokens with no structure (an unfitted RVQ or k-means).")


class TensorBoard:
    """Scalars, audio and text to TensorBoard from rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def scalars(self, metrics: dict, step: int) -> None:
        if self.writer:
            for k, v in metrics.items():
                if "/" in k:
                    self.writer.add_scalar(k, v, step)

    def audio(self, tag: str, audio, rate: int, step: int) -> None:
        if self.writer:
            self.writer.add_audio(tag, torch.as_tensor(audio).float().clamp(-1, 1)[None], step, sample_rate=rate)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``: {tag: [(step, value), ...]} (later files win)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(Path(log_dir).glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {k: sorted(v.items()) for k, v in out.items()}
