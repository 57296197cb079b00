"""Training one of the token system's encoders on Ray Train: the harness ``fit-clap`` and ``fit-codec`` share.

What differs between encoders is a ``Task`` (its module builds the model, computes a batch's loss and scores the
held-out tracks); the rest is here: tracks split by a stable hash of their id into train and held-out ones; a
Ray Data dataset of each track's rows (kept in the object store across epochs when it fits ``cache_gb``, else
streamed); the loop (AdamW, linear warm-up, gradients clipped at 1, DDP over the workers); held-out scores before
the first step and at every ``eval_every``, each with a checkpoint (weights and AdamW state as safetensors,
``train_state.json``) that the same command resumes from; TensorBoard; and at the end the weights written into
the token system with a ``history`` entry and a new fingerprint.

The caller connects to Ray; nothing here calls ``ray.init``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config_io import check, from_dict, to_dict
from ..data.clips import stable_fraction
from ..infra import storage
from .system import CONFIG_FILE, RVQ_FILE, TokenSystem, read_meta

WEIGHTS, OPTIMIZER, STATE, BASELINE = "weights.safetensors", "optimizer.safetensors", "train_state.json", "untuned.json"


@dataclass
class TuneSettings:
    """What every encoder's training takes (each job's config adds its own)."""
    steps: int = 2000
    batch_size: int = 32  # examples per worker and step
    lr: float = 1e-5
    warmup: int = 100  # linear warm-up steps, then constant
    weight_decay: float = 0.01
    max_seconds: float = 30.0  # of each track
    valid_tracks: int = 200  # held-out tracks (at most a fifth), chosen by a stable hash of the track id
    eval_every: int = 100  # steps between held-out scores (and checkpoints)
    num_workers: int = 1
    use_gpu: bool = False
    cache_gb: float = 2.0  # keep the decoded rows in Ray's object store across epochs when under this size
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "valid_tracks", "eval_every", "num_workers"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.lr > 0 and self.max_seconds > 0, "lr", "lr and max_seconds must be > 0")


def split_tracks(tracks: list, cfg: TuneSettings) -> tuple[list, list]:
    """(train, valid) of ``tracks``: the ``valid_tracks`` (at most a fifth, at least 2) whose stable hash of
    (seed, id) is lowest are held out, so adding tracks to a corpus moves few of them."""
    ranked = sorted(tracks, key=lambda t: stable_fraction(cfg.seed, f"clap-valid:{t.id}"))
    n_valid = min(cfg.valid_tracks, max(2, len(tracks) // 5))
    return sorted(ranked[n_valid:], key=lambda t: t.id), sorted(ranked[:n_valid], key=lambda t: t.id)


def track_dataset(tracks: list, rows_of, fn_kwargs: dict, cfg: TuneSettings, row_bytes: int):
    """The Ray Dataset of ``rows_of(track row, **fn_kwargs)`` over ``tracks``; materialized when it fits
    ``cfg.cache_gb`` (returned as the second value: feeding the workers then needs no CPU of its own)."""
    import ray

    items = [{"id": t.id, "path": t.path, "caption": t.caption} for t in tracks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    # rows in the tracks' order, not as the decoding tasks finish: the loop's seeded shuffle buffer then gives the
    # same batches for the same seed (two fit-clap runs of one seed trained different weights before)
    ds.context.execution_options.preserve_order = True
    ds = ds.flat_map(rows_of, fn_kwargs=fn_kwargs)
    if len(tracks) * row_bytes <= cfg.cache_gb * 2 ** 30:
        return ds.materialize(), True
    return ds, False


def held_out_rows(tracks: list, rows_of, fn_kwargs: dict, cfg: TuneSettings, what: str, log) -> tuple[list, dict]:
    """The held-out tracks' rows (gathered on the driver), and the tracks that could not be decoded (id -> why)."""
    rows = list(track_dataset(tracks, rows_of, fn_kwargs, cfg, 0)[0].iter_rows())
    bad = {r["id"]: r["error"] for r in rows if r["error"]}
    for tid, why in bad.items():
        log(f"held-out track {tid} skipped: {why}")
    rows = [r for r in rows if not r["error"]]
    if len({r["id"] for r in rows}) < 2:
        raise ValueError(f"{what}: fewer than 2 held-out tracks could be decoded")
    return rows, bad


# ---------------------------------------------------------------------------------------------- the loop

class Task:
    """One encoder's part of the loop. ``model`` is what is trained and saved; ``loss`` runs a batch through
    ``net`` (the model, DDP-wrapped with several workers); ``evaluate`` scores the held-out rows (rank 0)."""
    name = "fit"
    unit = "examples"

    def __init__(self, loop_cfg: dict, cfg: TuneSettings, device: torch.device, held: dict | None):
        raise NotImplementedError

    model: torch.nn.Module

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trained_module(self) -> torch.nn.Module:
        """What runs a batch (DDP wraps it): ``model`` itself, or a module around it."""
        return self.model

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, net, batch: dict) -> torch.Tensor | None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, scores: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())

    def train_scalars(self) -> dict[str, float]:
        return {}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as flat tensors (safetensors holds tensors only): ``<param index>.<name>``."""
    return {f"{i}.{name}": torch.as_tensor(v).detach().cpu().contiguous()
            for i, s in opt.state_dict()["state"].items() for name, v in s.items()}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def run_loop(task_cls: type[Task], settings_cls: type[TuneSettings], loop_cfg: dict) -> None:
    """Ray Train worker: train ``task_cls``'s model; rank 0 scores the held-out rows, logs and saves."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from safetensors.torch import load_file, save_file

    from ..train.checkpoint import staging_dir
    from ..train.loop import quiet_report_log, worker_print
    from ..train.metrics import TensorBoard, mean_over_workers

    cfg = from_dict(settings_cls, loop_cfg["config"], "config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(int(loop_cfg.get("threads", 1)))
    quiet_report_log()
    name = task_cls.name

    def log(msg: str) -> None:
        if rank == 0:
            worker_print(f"[{name}] {msg}")

    torch.manual_seed(cfg.seed)
    task = task_cls(loop_cfg, cfg, device, ray.get(loop_cfg["valid"]) if rank == 0 else None)
    model, params = task.model, task.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, epoch = 0, 0
    skipped: dict[str, str] = {}  # track id -> why (undecodable)
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, WEIGHTS)), strict=True)
            _load_optimizer(opt, load_file(os.path.join(d, OPTIMIZER)))
            saved = json.loads(Path(d, STATE).read_text())
            step, epoch = saved["step"], saved["epoch"] + 1
            skipped.update(saved.get("skipped", {}))
        log(f"resumed at step {step} (its epoch's remaining rows are not revisited: epoch {epoch} starts)")
    for group in opt.param_groups:  # the configured rate, not a resumed run's saved one
        group["lr"] = cfg.lr
    first_step = step
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (first_step + s + 1) / max(cfg.warmup, 1)))
    net = task.trained_module()
    net = ray.train.torch.prepare_model(net, move_to_device=False) if world > 1 else net
    tb = TensorBoard(loop_cfg["tensorboard_dir"] if rank == 0 else None, purge_step=step + 1 if step else None)

    def evaluate() -> dict:
        if rank != 0:
            return {}
        model.eval()
        scores = task.evaluate()
        task.train_mode()
        log(f"step {step}: {task.describe(scores)}")
        tb.scalars(scores, step)
        tb.flush(upload=True)
        return scores

    def save(metrics: dict) -> None:
        everyone = [skipped]
        if world > 1:  # the tracks every worker skipped, for the report
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, skipped)
        with staging_dir() as tmp:
            if rank == 0:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          os.path.join(tmp, WEIGHTS))
                save_file(_optimizer_tensors(opt), os.path.join(tmp, OPTIMIZER))
                Path(tmp, STATE).write_text(json.dumps({"step": step, "epoch": epoch, "metrics": metrics,
                                                        "skipped": {k: v for d in everyone for k, v in d.items()}}))
            ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)
        log(f"step {step}: checkpoint saved")

    if step == 0:
        first = evaluate()
        if rank == 0:
            storage.write_json(storage.join(loop_cfg["run_dir"], BASELINE), first)
    task.train_mode()
    shard = ray.train.get_dataset_shard("train")
    losses, started, seen = [], time.perf_counter(), 0
    while step < cfg.steps:
        got = False
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=max(cfg.batch_size * 8, 256),
                                        local_shuffle_seed=cfg.seed + epoch * 1000 + rank):
            keep = batch["error"] == ""
            for i in np.flatnonzero(~keep):
                if batch["id"][i] not in skipped:
                    skipped[str(batch["id"][i])] = str(batch["error"][i])
                    worker_print(f"[{name}] track {batch['id'][i]} skipped: {batch['error'][i]}")
            loss = task.loss(net, {k: v[keep] for k, v in batch.items()})
            if loss is None:
                continue
            got = True
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            step += 1
            seen += int(keep.sum())
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{name}: the loss became {losses[-1]} at step {step}: lower --lr (now "
                                         f"{cfg.lr:g})")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                loss_mean = mean_over_workers(float(np.mean(losses)), device)
                rate = mean_over_workers(seen / (time.perf_counter() - started), device) * world
                lr = schedule.get_last_lr()[0]
                log(f"step {step}/{cfg.steps}: loss {loss_mean:.4f} lr {lr:.2e} {rate:.1f} {task.unit}/s")
                tb.scalars({"train/loss": loss_mean, "train/lr": lr, f"train/{task.unit}_per_s": rate,
                            **task.train_scalars()}, step)
                save({"train/loss": loss_mean, **evaluate()})
                losses, started, seen = [], time.perf_counter(), 0
            if step >= cfg.steps:
                break
        if not got:
            raise RuntimeError(f"{name}: worker {rank} got no batch in epoch {epoch}: the train tracks give fewer "
                               f"rows than batch_size x workers; lower --batch-size or --num-workers")
        epoch += 1
    tb.close()


# ---------------------------------------------------------------------------------------------- the driver

def fit(loop, run_dir: str, loop_cfg: dict, cfg: TuneSettings, train_ds, cached: bool, held: dict,
        cluster_cpus: float) -> tuple[dict[str, torch.Tensor], dict, dict, str]:
    """Run ``loop`` (a ``run_loop`` partial) on Ray Train in ``run_dir`` (resumed when it has a checkpoint).
    Returns the final weights, the scores before the first step and at the end, and the checkpoint's location."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from ..train.run import DATA_RESERVE, cpus_per_worker

    # streamed, the decoding needs CPUs beside the workers (cpus_per_worker keeps one); cached, it is done
    cpus = cpus_per_worker(cfg.num_workers, cluster_cpus + (DATA_RESERVE if cached else 0), cfg.use_gpu)
    loop_cfg = {**loop_cfg, "config": to_dict(cfg), "valid": ray.put(held), "run_dir": run_dir,
                "tensorboard_dir": storage.join(run_dir, "tensorboard"), "threads": max(1, int(cpus))}
    fs, storage_path = storage.resolve(storage.parent(run_dir))
    trainer = TorchTrainer(
        loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=storage.name(run_dir), storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=1),
                             logging_config=LoggingConfig(log_level="WARNING")),
        # plain ExecutionOptions: Ray Train's default copies the DataContext's, setting a deprecated field with a
        # warning in every run's output (this loop sets no Ray Data option of its own)
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions()))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_dir} ended without a checkpoint")
    before = storage.read_json(storage.join(run_dir, BASELINE))
    with result.checkpoint.as_directory() as d:
        state = load_file(os.path.join(d, WEIGHTS))
        after = json.loads(Path(d, STATE).read_text())
    return state, before, after, storage.join(run_dir, storage.name(result.checkpoint.path))


def scores(metrics: dict) -> dict:
    """The held-out scores (``valid/...``) of a loop's metrics."""
    return {k: v for k, v in metrics.items() if k.startswith("valid/")}


def run_report(kind: str, run_dir: str, checkpoint: str, source, train: list, valid: list, bad: dict, after: dict,
               cfg: TuneSettings) -> dict:
    """What every tuning report holds: the run, its corpus and tracks, the tracks skipped, steps and settings."""
    return {"kind": kind, "run": run_dir, "checkpoint": checkpoint, "corpus": source.root,
            "source_kind": source.kind, "tracks": {"train": len(train), "valid": len(valid)},
            "held_out": [t.id for t in valid],
            "skipped": {**after.get("skipped", {}), **bad}, "steps": after["step"], "config": to_dict(cfg)}


def save_tuned(root: Path, key: str, state: dict[str, torch.Tensor], report: dict, name: str, start: float,
               drop_rvq: bool = False, log=print) -> dict:
    """``state`` written into the token system's encoder ``key`` (``write_encoder``, ``report``'s run as its history
    entry), then ``report`` with the new fingerprint and the wall time into ``<root>/<name>``."""
    entry = {k: report[k] for k in ("kind", "run", "checkpoint", "corpus", "tracks", "steps")}
    system = write_encoder(root, key, state, entry, drop_rvq=drop_rvq, log=log)
    report.update(fingerprint=system.fingerprint, wall_seconds=round(time.time() - start, 1))
    storage.write_json(root / name, report)
    return report


def write_encoder(root: Path, key: str, state: dict[str, torch.Tensor], entry: dict, drop_rvq: bool = False,
                  log=print) -> TokenSystem:
    """Weights ``state`` written into the encoder of config section ``key`` (``clap_rvq_cfg``, ``encodec_cfg``) of
    the token system at ``root`` (``encoders/<name>``, the same format; it loads from there from now on), ``entry``
    added to its history, its RVQ dropped if ``drop_rvq``; saved with its new fingerprint."""
    import dataclasses

    from .encoders import save_clap
    from .system import ENCODER_KEYS

    name = {v: k for k, v in ENCODER_KEYS.items()}[key]
    system = TokenSystem.load(root)  # verified: the files are what token_system.json says
    old = system.fingerprint
    model = system._models[name]
    model.load_state_dict(state, strict=True)
    if name == "clap":
        save_clap(model, system.clap.processor, root / "encoders/clap")
    else:
        model.save_pretrained(root / f"encoders/{name}")
    meta, config = read_meta(root)
    config = dataclasses.replace(config, **{key: dataclasses.replace(getattr(config, key),
                                                                     model_name=f"encoders/{name}")})
    storage.write_json(root / CONFIG_FILE, {**meta, "config": to_dict(config)})
    dropped = drop_rvq and (root / RVQ_FILE).exists()
    if dropped:
        (root / RVQ_FILE).unlink()
    system = TokenSystem.load(root, verify=False)  # the weights as written
    system.history.append(entry)
    system.save()
    log(f"token system {root}: {name} trained (fingerprint {old[:12]} -> {system.fingerprint[:12]})"
        + ("; its RVQ, fitted on the old CLAP, was dropped" if dropped else "")
        + ". Next: " + ("" if system.rvq_fitted else "fit the RVQ (`musiclm fit-rvq`), then ")
        + "make the token datasets (`musiclm preprocess`) and train the stages: datasets and checkpoints of the old "
          "fingerprint are refused.")
    return system


__all__ = ["TuneSettings", "Task", "run_loop", "fit", "split_tracks", "track_dataset", "held_out_rows",
           "write_encoder", "scores", "run_report", "save_tuned"]
