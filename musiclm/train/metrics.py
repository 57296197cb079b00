"""Validation sums reduced over workers, TensorBoard on rank 0, and the chance-level check."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from ..models.stages import token_hits

CHANCE_TOLERANCE = 0.02  # within 2 % of ln(V): the model predicts no better than a uniform guess
TENSORBOARD_PREFIX = "musiclm-tb-"  # + host-pid-: where a rank-0 worker writes events bound for an object store


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

    def reduce(self, device: torch.device | str) -> dict[str, float]:
        """The sums over all workers (reduced on ``device``, the training device), as metrics."""
        t = all_reduce_sum(self.t, device)
        if t[1] == 0:
            raise RuntimeError("the validation subset gave no batches")
        out = {"valid/loss": float(t[0] / t[1]), "valid/accuracy": float(t[2] / t[3])}
        per = t[3] / self.q
        for k in range(self.q):
            out[f"valid/accuracy_q{k}"] = float(t[4 + k] / per)
        return out


class ConditioningSums:
    """Validation loss with each example's own CLAP tokens, with another example's (rolled by one within the
    batch, over batches of at least two examples) and with the null condition in their place (every batch).
    ``valid/conditioning_gain`` (shuffled - own) shows whether a stage uses the text condition at all: about 0
    when it ignores it. (Two crops of one track in a batch share their CLAP tokens nearly, so it is a lower
    bound.) ``valid/null_condition_gain`` (null - own) is what the text buys over the null condition, the
    difference classifier-free guidance amplifies; it means something once the stage learned the null condition
    (``train.cond_drop_prob``): before, the null condition is a prompt the stage never saw.

    The same two over each window's opening (``models.stages.opening_losses``, per example):
    ``valid/conditioning_gain_opening`` and ``valid/null_condition_gain_opening``. Over the whole window a
    stage soon reads its track from the tokens before, and the condition's share is diluted 30- to 100-fold; the
    opening is where generation takes the text's direction."""

    def __init__(self):
        # own loss·n, shuffled loss·n, n; own loss·m, null loss·m, m (labels); then the same over the openings,
        # per example
        self.t = torch.zeros(12, dtype=torch.float64)
        # this worker's gain of each batch (of each example, over its opening), for the spread of the mean
        # (evaluation.prompt_following)
        self.gains: list[float] = []
        self.null_gains: list[float] = []
        self.opening_gains: list[float] = []
        self.opening_null_gains: list[float] = []

    @staticmethod
    def _add(t: torch.Tensor, own: torch.Tensor, other: torch.Tensor, n: int, gains: list[float]) -> None:
        t += torch.tensor([float(own) * n, float(other) * n, n], dtype=torch.float64)
        gains.append(float(other) - float(own))

    @staticmethod
    def _add_openings(t: torch.Tensor, own: torch.Tensor | None, other: torch.Tensor | None,
                      gains: list[float]) -> None:
        if own is None:
            return
        own, other = own.double().cpu(), other.double().cpu()
        t += torch.stack([own.sum(), other.sum(), torch.tensor(float(len(own)), dtype=torch.float64)])
        gains.extend((other - own).tolist())

    def add(self, own_loss: torch.Tensor, shuffled_loss: torch.Tensor, n_labels: int,
            own_opening: torch.Tensor | None = None, shuffled_opening: torch.Tensor | None = None) -> None:
        """One batch: its mean losses over ``n_labels`` labels, and (optional) each example's opening losses."""
        self._add(self.t[0:3], own_loss, shuffled_loss, n_labels, self.gains)
        self._add_openings(self.t[6:9], own_opening, shuffled_opening, self.opening_gains)

    def add_null(self, own_loss: torch.Tensor, null_loss: torch.Tensor, n_labels: int,
                 own_opening: torch.Tensor | None = None, null_opening: torch.Tensor | None = None) -> None:
        self._add(self.t[3:6], own_loss, null_loss, n_labels, self.null_gains)
        self._add_openings(self.t[9:12], own_opening, null_opening, self.opening_null_gains)

    def reduce(self, device: torch.device | str) -> dict[str, float]:
        """The sums over all workers (a collective: every worker calls it). The shuffled loss is left out when no
        batch had two examples."""
        t = all_reduce_sum(self.t, device)
        out = {}
        for at, name, other in ((0, "conditioning_gain", "loss_cond_shuffled"),
                                (3, "null_condition_gain", "loss_null_condition")):
            if t[at + 2] > 0:
                own, shuffled = float(t[at] / t[at + 2]), float(t[at + 1] / t[at + 2])
                out.update({f"valid/{other}": shuffled, f"valid/{name}": shuffled - own})
            if t[at + 8] > 0:
                out[f"valid/{name}_opening"] = float((t[at + 7] - t[at + 6]) / t[at + 8])
        return out


def all_reduce_sum(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` summed over the workers, back on the CPU; ``t`` itself is left alone. The one place the training
    loop calls a collective: the reduction runs on ``device``, the engine's device, because NCCL (Ray Train's
    process group on GPUs) takes CUDA tensors only and gloo CPU ones. Without a process group, ``t``."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    on_device = t.to(device, copy=True)
    dist.all_reduce(on_device)
    return on_device.cpu()


def mean_over_workers(value: float, device: torch.device | str) -> float:
    """The mean of ``value`` over the workers."""
    t = all_reduce_sum(torch.tensor([value], dtype=torch.float64), device)
    return float(t[0]) / (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)


def any_over_workers(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is true on any worker (a collective: every worker calls it)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), device)[0] > 0)


# Dense bf16 peak of one device in TFLOP/s (datasheet figures without sparsity), matched by substring of the
# name torch reports, first match wins (so "H100 PCIe" before "H100"). train.peak_tflops overrides.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0))


def peak_flops(device: torch.device | str, configured_tflops: float = 0.0) -> float | None:
    """The device's peak dense bf16 FLOP/s, for MFU: ``configured_tflops`` when set, else by the GPU's name;
    None on CPUs and unknown GPUs (MFU is then not logged)."""
    if configured_tflops:
        return configured_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def at_chance(valid_loss: float, vocabulary: int) -> bool:
    chance = math.log(vocabulary)
    return abs(valid_loss - chance) <= CHANCE_TOLERANCE * chance


def stuck_at_chance(valid_losses: list[float], vocabulary: int, final: bool) -> bool:
    """At chance and not on its way down: the latest validation loss is within ``CHANCE_TOLERANCE`` of ln(V), and
    the run has ended or the loss fell less than a quarter of that tolerance since the validation before. A run
    still warming up (its first validation near chance, falling) is not alarmed about."""
    if not valid_losses or not at_chance(valid_losses[-1], vocabulary):
        return False
    if final:
        return True
    return len(valid_losses) > 1 and valid_losses[-2] - valid_losses[-1] < CHANCE_TOLERANCE / 4 * math.log(vocabulary)


def chance_message(stage: str, step: int, valid_loss: float, vocabulary: int) -> str:
    return (f"WARNING: {stage} validation loss {valid_loss:.3f} at step {step} is within "
            f"{CHANCE_TOLERANCE:.0%} of ln({vocabulary}) = {math.log(vocabulary):.3f}: the model is at chance "
            f"level. Usual causes: the dataset and the initial checkpoint come from different token systems, "
            f"an lr too high or too low, or tokens with no structure (an unfitted RVQ or k-means).")


class TensorBoard:
    """Scalars, audio and text to TensorBoard from rank 0; a no-op elsewhere.

    ``log_dir`` may be an object-store URI: events are then written to a local folder and each event file is
    uploaded whole at a ``flush`` at most every ``upload_every_s`` seconds or when asked, and at ``close`` (one
    new file per writer, so a resumed run never rewrites another's file)."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None, upload_every_s: float = 30.0):
        self.writer, self.remote, self.local = None, None, None
        self.upload_every_s, self._uploaded = upload_every_s, None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            from ..infra import storage

            if storage.is_remote(log_dir):  # a worker that Tune stops never closes this: the next one removes it
                self.remote, self.local = log_dir, storage.process_tempdir(TENSORBOARD_PREFIX)
            self.writer = SummaryWriter(self.local.name if self.local else log_dir, purge_step=purge_step)

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

    def flush(self, upload: bool = False) -> None:
        """Write the events out; to an object store too when ``upload`` (after a validation: a worker stopped
        early, by Tune's scheduler say, never reaches ``close``) or when ``upload_every_s`` have passed."""
        if self.writer:
            self.writer.flush()
            if upload or self._uploaded is None or time.monotonic() - self._uploaded >= self.upload_every_s:
                self._upload()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self._upload()
            if self.local:
                self.local.cleanup()
            self.writer = None

    def _upload(self) -> None:
        if self.remote:
            from ..infra import storage

            storage.upload_dir(self.local.name, self.remote)
            self._uploaded = time.monotonic()


def tensorboard_steps(log_dir) -> dict[str, list[int]]:
    """The steps of every scalar tag in the order TensorBoard shows them: all event files of ``log_dir`` read in
    order as one run, with the purges a restarted writer asks for applied (``SummaryWriter(purge_step=...)``)."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ..infra import storage

    with tempfile.TemporaryDirectory() as tmp:
        local = tmp if storage.is_remote(log_dir) else str(log_dir)
        if storage.is_remote(log_dir):
            storage.download_dir(log_dir, tmp, "events.*")
        acc = EventAccumulator(local, size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``: {tag: [(step, value), ...]} (later files win)."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ..infra import storage

    out: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(log_dir, tmp, "events.*") if storage.is_remote(log_dir) else \
            storage.list_files(log_dir, "events.*")
        for events in sorted(local, key=lambda p: str(p).rsplit("/", 1)[-1]):
            _read_events(EventAccumulator(str(events)), out)
    return {k: sorted(v.items()) for k, v in out.items()}


def _read_events(acc, out: dict) -> None:
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
