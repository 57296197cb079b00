"""The per-worker training loop of every stage (Ray Train's ``train_loop_per_worker``), used by
``jobs.train`` and by Tune trials alike.

Each worker builds the stage model, wraps it in a DeepSpeed engine (ZeRO stage from the config), reads its
share of the train split (``train.data``: held by every worker when small, else streamed), and every ``log_every`` steps reports ``train/*``; every ``save_results_every``
steps all workers evaluate their share of the fixed validation subset and the sums are reduced; every
``save_model_every`` steps (and at the end) every worker saves its DeepSpeed shard, rank 0 adds the
consolidated ``model.safetensors`` + ``stage.json`` and the data position, and all report the checkpoint.
A restarted worker (or a re-run of the same command) resumes from the latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch

from ..config import Config, from_dict
from ..data.clips import stable_fraction
from ..models import build_stage, opening_losses, split_batch, stage_loss
from ..models.transformer import model_flops
from . import checkpoint as ckpt
from .engine import deepspeed_config, make_optimizer, skip_inference_comm_op, training_attention, uses_bf16
from .metrics import (ConditioningSums, TensorBoard, ValidSums, any_over_workers, chance_message, mean_over_workers,
                      peak_flops, stuck_at_chance)

DS_DIR, DS_TAG = "deepspeed", "state"
# DeepSpeed's shards of a checkpoint converted to its universal format (any worker count): made by rank 0 of a worker
# group that resumes with another number of workers than saved the checkpoint (``to_universal``), once per checkpoint
UNIVERSAL_DIR = "deepspeed_universal"
DIVERGED = "diverged.json"  # in the run folder: the step, rate and cause of a stop on a non-finite loss
TRAIN_STATE = "train_state.json"


def worker_print(message: str) -> None:
    """Print a line once in the driver's log. Ray Train V2 replaces ``print`` in its workers: the replacement
    both logs the message to a console handler and, because Ray's worker has swapped ``sys.stdout`` for its own
    stream, prints it there too, so every line reached the driver twice. Writing to the process's own stdout
    (what Ray forwards to the driver) sidesteps that; Ray Train's JSON app log does not get these lines."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the train split started
    batches: int = 0  # micro-batches consumed in the current epoch (skipped on resume)
    world_size: int = 1
    zero_stage: int = 2
    valid_loss: float | None = None
    null_steps: int = 0  # optimizer steps trained with conditioning dropout, --init-from's included (stage.json)
    # the worker count that sets the run's batch per optimizer step (batch_size x grad_accum_every x this): the count
    # the run started with, or an elastic run's MAX; 0 in checkpoints written before it was kept (their world_size)
    reference_workers: int = 0

    @property
    def batch_workers(self) -> int:
        return self.reference_workers or self.world_size


def read_train_state(path: str | Path) -> TrainState | None:
    """The data position saved with a checkpoint (a folder or an object-store URI); None when it has none."""
    from ..infra import storage

    try:
        return TrainState(**storage.read_json(storage.join(path, TRAIN_STATE)))
    except FileNotFoundError:
        return None


def to_universal(checkpoint: str, log=print) -> None:
    """Convert a checkpoint's DeepSpeed shards (ZeRO 1-3, saved by any number of workers) into DeepSpeed's universal
    format beside them (``UNIVERSAL_DIR``), once: what another worker count loads, optimizer state and all. A
    checkpoint in a bucket is converted locally and uploaded."""
    import argparse
    import contextlib
    import io
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from ..infra import storage

    target, done = storage.join(checkpoint, UNIVERSAL_DIR, DS_TAG), storage.join(checkpoint, UNIVERSAL_DIR, "complete")
    if storage.exists(done):  # written last: a conversion stopped halfway is made again
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="musiclm-universal-") as tmp:
        shards = storage.join(checkpoint, DS_DIR, DS_TAG)
        if storage.is_remote(shards):
            storage.download_dir(shards, Path(tmp, "in"))
            shards = str(Path(tmp, "in"))
        out = Path(tmp, "out")
        # our own checkpoint's client state lacks the info Megatron saves for it: DeepSpeed injects it
        args = argparse.Namespace(input_folder=shards, output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)
        storage.upload_dir(out, target)
        storage.write_text(done, "")
    log(f"converted {storage.name(checkpoint)}'s DeepSpeed state to its universal format (any worker count) in "
        f"{time.perf_counter() - start:.1f} s")


def batch_plan(tc, world: int, reference_workers: int) -> tuple[int, str]:
    """Gradient accumulation for ``world`` workers in a run whose batch per optimizer step is that of
    ``reference_workers`` (``batch_size x grad_accum_every x reference_workers``): scaled so that the batch stays, with
    ``train.keep_global_batch`` and when the counts divide it; else the configured one, and the batch follows the
    worker count. Returns the accumulation and a note that says which."""
    target = tc.batch_size * tc.grad_accum_every * reference_workers
    accum = tc.grad_accum_every
    if tc.keep_global_batch and (tc.grad_accum_every * reference_workers) % world == 0:
        accum = tc.grad_accum_every * reference_workers // world
    after = tc.batch_size * accum * world
    if after == target:
        return accum, (f"the batch per optimizer step stays {target}"
                       + (f" (gradient accumulation {tc.grad_accum_every} -> {accum})" if accum != tc.grad_accum_every
                          else ""))
    why = ("train.keep_global_batch is false" if not tc.keep_global_batch else
           f"{tc.grad_accum_every} x {reference_workers} accumulated batches do not divide among {world} workers")
    return accum, f"the batch per optimizer step changes {target} -> {after} ({why})"


@contextlib.contextmanager
def universal_source(local: str | None, location: str, rank: int, device, log):
    """Where this worker loads a checkpoint's DeepSpeed state in the universal format from (a context: a copy it
    downloaded is removed after): rank 0 converts it (``to_universal``, into the checkpoint's own folder, where every
    node can reach it) while the others wait for it in a collective (on ``device``, as every collective of the loop),
    which also tells them when it failed; then each rank reads it from its local copy of the checkpoint (``local``,
    from ``as_directory``: the folder itself on a shared file system) or, when that copy predates the conversion (a
    bucket), downloads it."""
    import tempfile

    from ..infra import storage

    error = None
    if rank == 0:
        try:
            to_universal(location, log)
        except Exception as e:  # said to every rank below, raised here
            error = e
    if any_over_workers(error is not None, device):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 could not convert the checkpoint {location} to DeepSpeed's universal format "
                           f"(its error is in the log)")
    here = os.path.join(local, UNIVERSAL_DIR) if local else None
    if here and os.path.exists(os.path.join(here, "complete")):
        yield here
        return
    with tempfile.TemporaryDirectory(prefix="musiclm-universal-in-") as copy:
        storage.download_dir(storage.join(location, UNIVERSAL_DIR), Path(copy))
        yield copy


def separate_adam_steps(engine) -> int:
    """DeepSpeed's ZeRO-3 universal load (0.19) gives the Adam state of every partition group one shared ``step``
    tensor, which torch's Adam then advances once per group per optimizer step: a run resumed at another worker
    count counted Adam's steps twice over (40 after 10 steps from step 20), and bias-corrected its moments for the
    wrong step. Each group gets its own copy. Returns how many were shared."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen, shared = set(), 0
    for state in getattr(base, "state", {}).values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            seen.add(id(step))
    return shared


def resplit(state: "TrainState", world: int, batch_size: int) -> tuple["TrainState", int]:
    """The data position of a checkpoint saved by ``state.world_size`` workers, for ``world`` workers: the epoch's
    rows are dealt from one permutation (``train.data.HeldRows.order``), so the rows consumed are its first
    ``batches x batch_size x saved workers``; each new rank skips its share of them, rounded up (a few rows of the
    epoch may go unseen, none twice). Returns the new state and the rows consumed."""
    consumed = state.batches * batch_size * state.world_size
    skip = math.ceil(consumed / (batch_size * world))
    return TrainState(**{**asdict(state), "batches": skip, "world_size": world}), consumed


def export_weights(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights in float32, for ``model.safetensors``: DeepSpeed's fp32 master copies where it keeps
    them apart (bf16 training under ZeRO 1/2/3, where the module's weights are rounded bf16 copies of them), else the
    module's own weights. A collective: every rank calls it, parameters in the same order (ZeRO-3: inside
    ``GatheredParameters``, so that buffers and any parameter without a master copy are whole). A rank that does not
    write the file passes ``keep=False``: it takes part in the gathers and keeps nothing (else every rank held a full
    float32 copy at every save: 1.1 GB for a large stage). A float32 module under ZeRO 0/1/2 *is* its masters (the
    updated partitions are copied back and gathered every step): its tensors are returned as they are, no gather."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, t in engine.module.state_dict(keep_vars=True).items():
        partitioned = hasattr(t, "ds_id")  # ZeRO-3's parameters: their data lives only inside GatheredParameters
        if isinstance(t, torch.nn.Parameter) and (t.dtype != torch.float32 or partitioned):
            master = safe_get_full_fp32_param(t)
            t = master if master is not None else t
        if keep:
            out[name] = t.detach().float().cpu()
    return out


class Sampler:
    """Teacher-forced reconstructions of coarse and fine windows decoded to audio (rank 0, at validation)."""

    def __init__(self, stage: str, token_system: str | None, log):
        self.stage, self.token_system, self.log, self.codec = stage, token_system, log, None
        self.enabled = stage in ("coarse", "fine") and token_system is not None

    def write(self, tb: TensorBoard, example: dict, step: int) -> None:
        if not self.enabled:
            return
        try:
            if self.codec is None:
                from ..tokens.system import load_acoustic_codec

                self.codec = load_acoustic_codec(self.token_system)
            if self.stage == "coarse":
                codes = {"predicted": example["predicted"], "target": example["coarse"]}
            else:
                codes = {"predicted": np.concatenate([example["coarse"], example["predicted"]], axis=1),
                         "target": np.concatenate([example["coarse"], example["fine"]], axis=1)}
            for name, c in codes.items():
                tb.audio(f"samples/{self.stage}_{name}", self.codec.decode(c), self.codec.sample_rate, step)
        except Exception as e:  # samples are a convenience: never stop training for them
            self.log(f"samples disabled: decoding with the token system at {self.token_system} failed: {e}")
            self.enabled = False


def _batches(held: dict, split: str, epoch: int, rank: int, world: int, batch_size: int, drop_last: bool):
    """The numpy batches this worker reads of ``split`` in ``epoch``: from the rows every worker holds
    (``train.data.HeldRows``), or from its shard of the streamed Ray Dataset (``train.data.StreamedRows``)."""
    return held[split].batches(epoch, rank, world, batch_size, drop_last)


@torch.no_grad()
def validation_pass(forward, model, batches: list[dict], device,
                    counted: list[bool] | None = None) -> tuple[ValidSums, ConditioningSums, dict | None]:
    """Loss and accuracy sums of this worker's validation batches (``forward``: the engine, or the model), and
    the same loss with every example's CLAP tokens swapped for those of the example half this worker's subset
    away (crops of one track sit together, so that is another track) and with the null condition in their place
    (what conditioning dropout teaches and guidance subtracts): ``ConditioningSums``. Also the first
    example with its predicted tokens, for the TensorBoard sample. Reduce both sums over the workers. Batches
    whose ``counted`` is false (``HeldRows.lockstep_batches``' filler) run the same forwards and add nothing."""
    counted = [True] * len(batches) if counted is None else counted
    sums, cond_sums, example = ValidSums(model.target.num_quantizers), ConditioningSums(), None
    clap = [s.name for s in model.sequences].index("clap")
    own = [np.asarray(b[model.sequences[clap].name]) for b, c in zip(batches, counted) if c]
    all_clap = np.concatenate(own) if own else None
    first = 0
    for batch, count in zip(batches, counted):
        cond, tgt = split_batch(model, batch, device)
        logits = forward(cond, tgt)
        loss = stage_loss(logits, tgt)
        n, b = (len(all_clap) if count else 0), tgt.shape[0]
        swapped = cond
        if n:
            other = torch.as_tensor(all_clap[(np.arange(first, first + b) + n // 2) % n], dtype=torch.long,
                                    device=cond[clap].device)
            swapped = [other if i == clap else c for i, c in enumerate(cond)]
        # a forward for every batch, also with nothing to swap (one example) or nothing to count (filler): under
        # ZeRO-3 a forward gathers parameters from every worker, so all must run as many
        shuffled_logits = forward(swapped, tgt)
        null_logits = forward(cond, tgt, 0.0, torch.ones(b, dtype=torch.bool, device=tgt.device))
        if not count:
            continue
        sums.add(loss, logits, tgt)
        labels = logits.shape[0] * logits.shape[1]
        opening = opening_losses(logits, tgt)
        cond_sums.add_null(loss, stage_loss(null_logits, tgt), labels, opening, opening_losses(null_logits, tgt))
        if n > 1:
            cond_sums.add(loss, stage_loss(shuffled_logits, tgt), labels, opening,
                          opening_losses(shuffled_logits, tgt))
        first += b
        if example is None:
            example = {k: np.asarray(batch[k][0]) for k in batch if k != "id"}
            example["predicted"] = logits[0, :-1, :-1].argmax(-1).reshape(tgt.shape[1:]).cpu().numpy()  # no eos
    return sums, cond_sums, example


def take_configured_lr(scheduler, lr: float, log) -> None:
    """A resumed run trains at the command's ``train.lr``: the checkpoint's schedule keeps its position (warm-up,
    cosine) and takes the new base rate. This is how a run stopped by a non-finite loss goes on, at a lower lr."""
    old = scheduler.base_lrs[0]
    if all(base == lr for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    log(f"train.lr {lr:g} (the checkpoint's was {old:g}); the schedule goes on from where it was")


def diverged_message(stage: str, step: int, what: str, lr: float) -> str:
    return (f"the {stage} stage's {what} became non-finite at step {step} (lr {lr:.3g}): the run stopped without "
            f"saving that step, so its latest checkpoint holds the last good weights. Run the same command with a "
            f"lower rate, e.g. --set train.lr={lr / 10:.3g}, to go on from it.")


def quiet_report_log() -> None:
    """Library lines a worker printed that say nothing a user can act on, each silenced precisely:
    - Ray Train V2 logs every ``ray.train.report`` call at INFO from every worker ("Reporting training result N:
      TrainingReport(... every metric ...)"), which buried the loop's own one line per log step;
    - and "Checkpoint successfully created at: ..." from every worker at every save (the loop logs one line per
      save, "step N: checkpoint saved");
    - DeepSpeed gathers ZeRO partitions at a save with ``torch.distributed.all_gather_into_tensor``, which torch
      deprecates with a FutureWarning per call (two per save): DeepSpeed's call, nothing a user can change.
    Ray's loggers are named after their files, so they are reached through the modules; a Ray without them changes
    nothing. Warnings and errors of these loggers still show."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    try:
        from ray.train.v2._internal.execution import context, storage as train_storage
    except ImportError:
        return
    for module in (context, train_storage):
        if isinstance(getattr(module, "logger", None), logging.Logger):
            module.logger.setLevel(logging.WARNING)


def train_loop(loop_cfg: dict) -> None:
    if not torch.cuda.is_available():  # said, not probed: DeepSpeed's probe warned "Setting accelerator to CPU"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # from every worker of every CPU run
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg: Config = from_dict(Config, loop_cfg["config"], "config")
    tc, stage = cfg.train, cfg.train.stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(int(loop_cfg.get("threads", 1)))
    quiet_report_log()

    def log(msg: str) -> None:
        if rank == 0:
            worker_print(f"[train {stage}] {msg}")

    torch.manual_seed(tc.seed)
    model = build_stage(stage, cfg.model).set_attention(training_attention(tc, on_gpu, cfg.model.stage(stage)))
    model.set_ff_align(tc.ff_align)
    model.checkpoint_blocks = tc.activation_checkpointing
    resume = ray.train.get_checkpoint()
    if resume is None and loop_cfg.get("init_from"):
        ckpt.load_into(model, ckpt.load_state(loop_cfg["init_from"]), loop_cfg["init_from"])
        log(f"initialized from {loop_cfg['init_from']}")
    bf16 = uses_bf16(tc, on_gpu)
    optimizer, scheduler = make_optimizer(model, tc, on_gpu)
    if not on_gpu:
        skip_inference_comm_op()
    state = TrainState(world_size=world, zero_stage=tc.zero_stage, null_steps=loop_cfg.get("init_null_steps", 0),
                       reference_workers=tc.max_workers)
    with (resume.as_directory() if resume is not None else contextlib.nullcontext()) as d:
        saved = read_train_state(d) if d is not None else None
        if d is not None and saved is None:
            raise ckpt.CheckpointError(
                f"the checkpoint this run resumes from ({resume.path}) has no {TRAIN_STATE}: it was not written "
                f"by this training loop, or it is incomplete. Start a new run name with --init-from on it "
                f"(weights only), or remove that checkpoint folder to resume from the one before.")
        # the batch per optimizer step is the run's (its first worker count's, or an elastic run's MAX): gradient
        # accumulation makes up for fewer workers where the counts divide it (an elastic group of any size, a run
        # resumed at another count)
        reference = saved.batch_workers if saved is not None else tc.max_workers
        accum, batch_note = batch_plan(tc, world, reference)
        if accum != tc.grad_accum_every:
            tc = dataclasses.replace(tc, grad_accum_every=accum)
        if world != reference:
            log(f"{world} worker{'s' if world > 1 else ''} in a run whose batch is set for {reference}: {batch_note}")
        # saved by another number of workers (a resize, a resume with another count): DeepSpeed's ZeRO partitions of
        # optimizer state load into this one from its universal format (ZeRO-0 keeps them whole: loaded as saved)
        universal = saved is not None and saved.world_size != world and tc.zero_stage > 0
        config = deepspeed_config(tc, bf16)
        if universal:
            config["checkpoint"] = {"load_universal": True}
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=config)
        if d is not None:
            from ..infra import storage

            location = storage.join(loop_cfg["run_dir"], storage.name(str(resume.path)))
            with (universal_source(d, location, rank, device, log) if universal
                  else contextlib.nullcontext(os.path.join(d, DS_DIR))) as source:
                engine.load_checkpoint(source, tag=DS_TAG)
            if universal:
                separate_adam_steps(engine)
            state = saved
            state.reference_workers = reference
    if tc.compile:
        engine.compile()  # in place (module.compile): parameter names, hence checkpoints, stay as they are
    log(f"attention: {model.attention}{', compiled' if tc.compile else ''}"
        f"{', activation checkpointing' if tc.activation_checkpointing else ''}"
        f"{f', feed-forward padded to a multiple of {tc.ff_align}' if tc.ff_align > 1 else ''}")
    if resume is not None:
        if state.world_size != world:
            saved_by = state.world_size
            state, consumed = resplit(state, world, tc.batch_size)
            log(f"resumed with {world} workers from a checkpoint {saved_by} workers saved: optimizer state, step and "
                f"lr schedule carried over; the epoch's {consumed} rows seen are skipped ({state.batches} batches "
                f"per worker)")
        log(f"resumed at step {state.step} (epoch {state.epoch}, batch {state.batches})")
        take_configured_lr(scheduler, tc.lr, log)
    # every rank built the same initial weights from tc.seed; from here each draws its own dropout and forgetful
    # mask, and a resumed run draws new ones rather than the first steps' again
    torch.manual_seed(int(stable_fraction(tc.seed, f"rank:{rank}:step:{state.step}") * 2 ** 62))
    vocabulary = model.target.codebook_size + 1
    peak = peak_flops(device, tc.peak_tflops)  # for train/mfu; None on CPUs and unknown GPUs
    flops_per_example: dict[tuple[int, int], float] = {}
    # a restart from the checkpoint of step N: TensorBoard hides what the lost attempt logged after step N (step N's
    # own events were logged before its checkpoint was saved, and stay)
    tb = TensorBoard(loop_cfg["tensorboard_dir"] if rank == 0 else None,
                     purge_step=state.step + 1 if state.step else None)
    sampler = Sampler(stage, loop_cfg.get("token_system"), log) if rank == 0 else None
    held = loop_cfg.get("held_data", {})

    valid_losses: list[float] = []  # this attempt's validation losses: the chance alarm judges their trend

    def validate() -> dict:
        engine.eval()
        batches, counted = held["valid"].lockstep_batches(rank, world, tc.batch_size)
        sums, cond_sums, example = validation_pass(engine, model, batches, device, counted)
        engine.train()
        out = {**sums.reduce(device), **cond_sums.reduce(device)}
        state.valid_loss = out["valid/loss"]
        gain, null_gain = out.get("valid/conditioning_gain"), out.get("valid/null_condition_gain")
        log(f"step {state.step}: valid loss {out['valid/loss']:.4f} accuracy {out['valid/accuracy']:.4f}"
            + (f" conditioning gain {gain:+.4f} (opening {out['valid/conditioning_gain_opening']:+.4f})"
               if gain is not None else "")
            + (f", over the null condition {null_gain:+.4f} (opening {out['valid/null_condition_gain_opening']:+.4f})"
               if null_gain is not None and state.null_steps else ""))
        tb.scalars(out, state.step)
        valid_losses.append(out["valid/loss"])
        if rank == 0 and state.step > tc.lr_warmup and stuck_at_chance(valid_losses, vocabulary,
                                                                        state.step >= tc.num_train_steps):
            message = chance_message(stage, state.step, out["valid/loss"], vocabulary)
            worker_print("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100)
            tb.text("warnings/chance_level", message, state.step)
        if sampler is not None and example is not None:
            sampler.write(tb, example, state.step)
        return out

    def stop_diverged(what: str) -> None:
        """Every rank stops at the same step (the check is a collective): no save, one report the driver reads."""
        lr = float(scheduler.get_last_lr()[0])
        message = diverged_message(stage, state.step, what, lr)
        if rank == 0:
            worker_print("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100)
            tb.text("warnings/diverged", message, state.step)
        if rank == 0:  # the driver reads it after the run: Ray's result holds the last checkpoint's metrics only
            from ..infra import storage

            storage.write_json(storage.join(loop_cfg["run_dir"], DIVERGED),
                               {"step": state.step, "lr": lr, "what": what, "message": message})
        tb.close()

    def save(metrics: dict) -> None:
        with ckpt.staging_dir() as tmp:
            engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG)
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=tc.zero_stage == 3):
                weights = export_weights(engine, keep=rank == 0)  # every rank: the gathers are collectives
                if rank == 0:
                    ckpt.save_stage(tmp, weights, stage, cfg.model, state.step, loop_cfg["fingerprint"], metrics,
                                    null_condition_steps=state.null_steps)
                    Path(tmp, TRAIN_STATE).write_text(json.dumps(asdict(state)))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        log(f"step {state.step}: checkpoint saved")

    engine.train()
    last_valid, last_saved = {}, state.step
    window_start, window_positions, window_flops, window_losses = time.perf_counter(), 0, 0.0, []
    skip = state.batches
    nonfinite = False  # a non-finite loss since the last optimizer step, on this rank
    while state.step < tc.num_train_steps:
        got_batches = False
        for batch in _batches(held, "train", state.epoch, rank, world, tc.batch_size, drop_last=True):
            got_batches = True
            if skip:
                skip -= 1
                continue
            state.batches += 1
            cond, tgt = split_batch(model, batch, device)
            null = torch.rand(tgt.shape[0], device=device) < tc.cond_drop_prob if tc.cond_drop_prob > 0 else None
            logits = engine(cond, tgt, tc.mask_prob, null)
            loss = stage_loss(logits, tgt)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            engine.step()
            window_losses.append(float(loss.detach()))
            nonfinite = nonfinite or not math.isfinite(window_losses[-1])
            positions = model.positions(cond, logits.shape[1] - 1)
            window_positions += logits.shape[0] * positions
            if (positions, logits.shape[1]) not in flops_per_example:  # one window length per stage: computed once
                flops_per_example[positions, logits.shape[1]] = model_flops(model, positions, logits.shape[1])
            window_flops += logits.shape[0] * flops_per_example[positions, logits.shape[1]]
            if not boundary:
                continue
            state.step += 1
            state.null_steps += tc.cond_drop_prob > 0
            grad_norm = engine.get_global_grad_norm()
            nonfinite = nonfinite or (grad_norm is not None and not math.isfinite(float(grad_norm)))
            if any_over_workers(nonfinite, device):  # before anything of this step is validated or saved
                return stop_diverged("training loss or gradient norm")
            if state.step % tc.log_every == 0 or state.step == tc.num_train_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": mean_over_workers(float(np.mean(window_losses)), device),
                    "train/lr": float(scheduler.get_last_lr()[0]),
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "train/tokens_per_s": mean_over_workers(window_positions / elapsed, device) * world,
                    "step": state.step, "epoch": state.epoch,
                }
                if peak:  # model FLOPs utilization, as torchtitan: model FLOPs/s per worker over its peak
                    metrics["train/mfu"] = mean_over_workers(window_flops / elapsed, device) / peak
                log(f"step {state.step}/{tc.num_train_steps}: loss {metrics['train/loss']:.4f} "
                    f"lr {metrics['train/lr']:.2e} grad norm {metrics['train/grad_norm']:.3f} "
                    f"{metrics['train/tokens_per_s']:.0f} tokens/s"
                    + (f" MFU {metrics['train/mfu']:.1%}" if peak else ""))
                tb.scalars(metrics, state.step)
                window_start, window_positions, window_flops, window_losses = time.perf_counter(), 0, 0.0, []
                report = {**metrics, **last_valid}
            else:
                report = None
            done = state.step >= tc.num_train_steps
            if state.step % tc.save_results_every == 0 or done or state.step % tc.save_model_every == 0:
                last_valid = validate()
                if not math.isfinite(last_valid["valid/loss"]):  # the same reduced value on every rank
                    return stop_diverged("validation loss")
                report = {**(report or {"step": state.step, "epoch": state.epoch}), **last_valid,
                          "fresh_valid": 1}
            if state.step % tc.save_model_every == 0 or done:
                save(report)
                last_saved = state.step
            elif (report or {}).get("fresh_valid"):
                # to Ray only what a validation measured (what Tune's scheduler and the checkpoint ranking read):
                # a report is a barrier through Ray Train's controller, ~1.5 s each on 2 CPUs, where a tiny step
                # takes 0.1 s. train/* reaches TensorBoard and the log every log_every steps without it
                ray.train.report(report)
            if (report or {}).get("fresh_valid"):  # tokens/s measures training only
                window_start, window_positions, window_flops = time.perf_counter(), 0, 0.0
            tb.flush(upload=bool((report or {}).get("fresh_valid")))
            if done:
                break
        if not got_batches:
            raise RuntimeError(f"the train split gave no batch of {tc.batch_size} rows to worker {rank}: it has fewer "
                               f"rows than batch_size × workers; lower batch_size or num_workers")
        if state.step < tc.num_train_steps:
            state.epoch += 1
            state.batches = 0
    if last_saved != state.step:
        save({"step": state.step, **last_valid})
    tb.close()


__all__ = ["train_loop", "validation_pass", "worker_print", "export_weights", "TrainState", "read_train_state", "DS_DIR",
           "DS_TAG", "TRAIN_STATE", "DIVERGED", "UNIVERSAL_DIR", "resplit", "to_universal", "batch_plan",
           "universal_source", "separate_adam_steps"]
