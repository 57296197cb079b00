"""Driver side of a stage's training run: check that dataset, token system, initial checkpoint and the run
being resumed all agree, then build the Ray ``TorchTrainer`` (Train V2) around ``loop.train_loop``.

A run lives at ``STORAGE/RUN_NAME``: Ray Train's checkpoints (``checkpoint_*``: DeepSpeed shards,
``model.safetensors``, ``stage.json``, ``train_state.json``) and ``tensorboard/``. Running the same command
again resumes from the latest checkpoint; ``summary.json`` names the best and the latest checkpoints.
STORAGE is a folder every node can reach, or an object-store URI (``s3://bucket/runs``): Ray Train uploads each
checkpoint there through the same ``pyarrow`` filesystem (``musiclm.infra.storage``), and the driver reads it back
from there on resume.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..config import Config, ConfigError, to_dict
from ..data.shards import check_shards, open_manifest
from ..infra import storage
from ..models import stage_sequences
from . import checkpoint as ckpt
from .data import stage_data
from .engine import training_attention
from .loop import DIVERGED, read_train_state, train_loop

SUMMARY = "summary.json"


class TrainingDiverged(RuntimeError):
    """A run stopped because its loss (or gradient norm, or validation loss) became non-finite."""
DATA_RESERVE = 1.0  # CPUs left to the data pipeline: ListFiles of read_parquet takes 1 CPU, reads and crops 1/4 each


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str, option: str = "--run-name") -> None:
    """A run's name is a folder name and a key of Ray Train's metrics, which must be ASCII: letters, digits,
    ``.``, ``_`` and ``-``. Checked before anything is made (a name with ``ü`` crashed inside Ray Train's metrics
    and left an empty run folder)."""
    if not RUN_NAME.fullmatch(name or ""):
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-._")[:128] or "run-1"
        raise ConfigError(f"{option} {name!r}: use ASCII letters, digits, '.', '_' and '-' only, starting with a "
                          f"letter or digit (at most 128), e.g. {suggestion!r}")


@dataclass
class TrainRequest:
    config: Config
    data: str
    run_name: str
    storage: str = "runs"
    init_from: str | None = None
    token_system: str | None = None  # to check the fingerprint and decode audio samples (default: the dataset's)

    def __post_init__(self):
        check_run_name(self.run_name)

    @property
    def run_dir(self) -> str:
        return storage.join(storage.location(self.storage), self.run_name)


# where the model config keeps each token sequence's layout: (codebook size, number of codebooks; None: always 1)
TOKEN_LAYOUT_KEYS = {"clap": ("model.clap_rvq_cfg.codebook_size", "model.clap_rvq_cfg.rq_num_quantizers"),
                     "semantic": ("model.hubert_kmeans_cfg.codebook_size", None),
                     "coarse": ("model.encodec_cfg.codebook_size", "model.global_cfg.num_coarse_quantizers"),
                     "fine": ("model.encodec_cfg.codebook_size", "model.global_cfg.num_fine_quantizers")}


def _layout_fixes(cfg: Config, manifest: dict, skip: set[str] = frozenset()) -> dict[str, int]:
    """The settings that give the model the dataset's token layout (those in ``skip`` left out)."""
    fixes = {}
    for seq in stage_sequences(cfg.train.stage, cfg.model):
        tok = manifest["tokens"][seq.name]
        size_key, count_key = TOKEN_LAYOUT_KEYS[seq.name]
        if tok["codebook_size"] != seq.codebook_size and size_key not in skip:
            fixes[size_key] = tok["codebook_size"]
        if tok["codebooks"] != seq.num_quantizers and count_key is not None and count_key not in skip:
            fixes[count_key] = tok["codebooks"]
    return fixes


def adopt_token_layout(cfg: Config, manifest: dict, given: set[str] = frozenset()) -> tuple[Config, dict[str, int]]:
    """The model's token layout (codebook sizes and counts) taken from the dataset its token system made, except
    the settings the user gave (``given``: a real mismatch then fails in ``check_token_layout``). Returns the
    config and what was taken."""
    from ..config import apply_overrides

    fixes = _layout_fixes(cfg, manifest, given)
    return (apply_overrides(cfg, fixes) if fixes else cfg), fixes


def check_token_layout(cfg: Config, manifest: dict, data: str) -> None:
    """The model's token sequences must have the dataset's codebook counts and sizes."""
    stage = cfg.train.stage
    for seq in stage_sequences(stage, cfg.model):
        tok = manifest["tokens"][seq.name]
        theirs = (tok["codebooks"], tok["codebook_size"])
        if theirs != (seq.num_quantizers, seq.codebook_size):
            fixes = " ".join(f"{k}={v}" for k, v in _layout_fixes(cfg, manifest).items())
            raise ConfigError(f"the {stage} model config expects {seq.name} tokens of {seq.num_quantizers} codebooks "
                              f"× {seq.codebook_size} codes, but token dataset {data} has {theirs[0]} × {theirs[1]}: "
                              + (f"--set {fixes}, or leave those settings out (train takes the dataset's token "
                                 f"layout)" if fixes else "its token system's layout cannot be trained by this stage"))


def stage_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoints that hold a stage checkpoint, earliest step first (locations). A folder still being
    uploaded, or whose upload a killed run never finished, lacks its weights and is passed over."""
    found = [p for p in storage.list_dirs(run_dir, "checkpoint_*")
             if storage.exists(storage.join(p, ckpt.STAGE_FILE)) and storage.exists(storage.join(p, ckpt.MODEL_FILE))]
    return sorted(found, key=lambda p: ckpt.read_stage(p).step)


def latest_checkpoint(run_dir: str) -> str | None:
    return (stage_checkpoints(run_dir) or [None])[-1]


def describe_run(cfg: Config) -> str:
    """One line with the model's shape and the run's length: what a config file or a preset made of them."""
    import torch

    from ..models import build_stage, count_parameters

    t, m = cfg.train, cfg.model.stage(cfg.train.stage)
    with torch.device("meta"):
        n = count_parameters(build_stage(t.stage, cfg.model))
    return (f"{t.stage} stage: dim {m.dim}, depth {m.depth}, {m.heads} heads, {n / 1e6:.1f}M parameters; "
            f"{t.num_train_steps:,} steps at lr {t.lr:g}, batch {t.batch_size} x {t.grad_accum_every} accumulated "
            f"x {f'{t.min_workers}-{t.max_workers} workers (elastic)' if t.elastic else f'{t.num_workers} workers'}"
            + (f"; conditioning dropout {t.cond_drop_prob:g} (learns the null condition guidance needs)"
               if t.cond_drop_prob else ""))


def check_request(req: TrainRequest, log=print) -> dict:
    """All guards that can fail before training; returns what the workers need."""
    from ..tokens.system import read_meta

    cfg = req.config
    stage = cfg.train.stage
    token_system = req.token_system
    manifest = open_manifest(req.data, read_meta(token_system)[0]["fingerprint"] if token_system else None)
    fingerprint = manifest["fingerprint"]
    if token_system is None and manifest.get("token_system") and storage.exists(manifest["token_system"]):
        token_system = manifest["token_system"]
    check_token_layout(cfg, manifest, req.data)
    check_shards(req.data, manifest)
    init_null_steps = 0
    if req.init_from:
        init = ckpt.read_stage(req.init_from)
        ckpt.check_fits(init, stage, fingerprint, cfg.model, what=f"training on {req.data}")
        ckpt.check_weights(req.init_from)
        init_null_steps = init.null_condition_steps
    previous = latest_checkpoint(req.run_dir)
    if previous is not None:
        info = ckpt.read_stage(previous)
        ckpt.check_fits(info, stage, fingerprint, cfg.model, what=f"run {req.run_name} (resuming)")
        state = read_train_state(previous)
        if state and state.zero_stage != cfg.train.zero_stage:
            raise ConfigError(
                f"run {req.run_name} was saved with ZeRO stage {state.zero_stage}; this command asks for stage "
                f"{cfg.train.zero_stage}. A run resumes at another worker count (its state converted), but not at "
                f"another ZeRO stage: use train.zero_stage={state.zero_stage}, or start a new run name with "
                f"--init-from {previous} (weights only).")
        log(f"resuming run {req.run_name} from {storage.name(previous)} (step {info.step})")
        if state and not cfg.train.elastic and state.world_size != cfg.train.num_workers:
            log(at_another_worker_count(cfg.train, state))
    if cfg.train.elastic:
        t = cfg.train
        log(f"elastic run: it starts once {t.min_workers} worker{'s' if t.min_workers > 1 else ''} fit and grows to "
            f"{t.max_workers} as resources come "
            f"(looked for every {t.resize_interval_s:g} s), shrinks when a worker or node is lost; each resize "
            f"restarts the workers from the latest checkpoint, optimizer state and step carried")
    log(describe_run(cfg))
    return {"config": to_dict(cfg), "fingerprint": fingerprint, "token_system": token_system, "run_dir": req.run_dir,
            "init_from": storage.location(req.init_from) if req.init_from else None, "init_null_steps": init_null_steps,
            "tensorboard_dir": storage.join(req.run_dir, "tensorboard"), "manifest": manifest}


def at_another_worker_count(t, saved) -> str:
    """What a run resumed by ``t.num_workers`` workers from a checkpoint that others saved (``saved``: its
    ``TrainState``) does: its workers load the DeepSpeed state through the universal format (rank 0 converts it
    once) and, with ``train.keep_global_batch``, scale gradient accumulation so that the batch per optimizer step
    stays (``loop.batch_plan``, which the workers apply)."""
    from .loop import batch_plan

    return (f"resuming with {t.num_workers} workers a run saved by {saved.world_size}: "
            f"{batch_plan(t, t.num_workers, saved.batch_workers)[1]}")


def resolve_use_gpu(cfg: Config, resources: dict, log=print) -> Config:
    """``train.use_gpu`` "auto" made true or false by the cluster's GPUs (``ray.cluster_resources()``), and said."""
    import dataclasses

    t = cfg.train
    if t.use_gpu != "auto":
        return cfg
    gpus = float(resources.get("GPU", 0.0))
    log(f"train.use_gpu auto: the cluster has {gpus:g} GPUs, so training runs on "
        + (f"GPUs, one per worker ({t.num_workers}); --cpu to train on CPUs" if gpus >= 1 else
           "CPUs; --use-gpu to ask for GPUs (on an autoscaling cluster the job waits for GPU nodes)"))
    return dataclasses.replace(cfg, train=dataclasses.replace(t, use_gpu=gpus >= 1))


def worker_cpus(cfg: Config, cluster_cpus: float) -> float:
    """CPUs per worker: 1 beside a GPU; on CPUs the workers share all but one of the cluster's CPUs. Ray Data's
    file listing asks for a whole CPU and cannot be told otherwise, so one must stay free or the run hangs. An elastic
    run's workers take 1 CPU each (or ``train.cpus_per_worker``): how many fit is what changes."""
    t = cfg.train
    if t.elastic:  # its cluster changes: not a share of today's CPUs (a new node's would go unused)
        return t.cpus_per_worker or 1.0
    return t.cpus_per_worker or cpus_per_worker(t.num_workers, cluster_cpus, bool(t.use_gpu))


def cpus_per_worker(num_workers: int, cluster_cpus: float, use_gpu: bool) -> float:
    """``worker_cpus`` for any Ray Train job: 1 beside a GPU, else a share of all CPUs but ``DATA_RESERVE``."""
    if use_gpu:
        return 1.0
    share = max(cluster_cpus - DATA_RESERVE, 0.5) / num_workers
    return float(math.floor(share)) if share >= 1 else max(0.25, math.floor(share * 100) / 100)


def build_trainer(req: TrainRequest, loop_cfg: dict, cluster_cpus: float, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, t = req.config, req.config.train
    if t.use_gpu == "auto":
        raise ConfigError("train.use_gpu is 'auto': resolve it with the cluster's resources first (resolve_use_gpu)")
    # refused here, not in every worker's first step (45 s later on 2 CPUs)
    training_attention(t, bool(t.use_gpu), cfg.model.stage(t.stage))
    cpus = worker_cpus(cfg, cluster_cpus)
    if not t.use_gpu and not t.elastic and cpus * t.num_workers + DATA_RESERVE > cluster_cpus + 1e-9:
        raise ConfigError(f"{t.num_workers} workers × {cpus:g} CPUs plus the data pipeline ({DATA_RESERVE:g} CPU) "
                          f"need more than the cluster's {cluster_cpus:g} CPUs: lower num_workers or cpus_per_worker")
    data = stage_data(cfg, req.data, loop_cfg.get("manifest"))
    loop_cfg = {**{k: v for k, v in loop_cfg.items() if k != "manifest"}, "threads": max(1, int(cpus)),
                "held_data": data.held}
    resources = {"CPU": cpus, **({"GPU": 1} if t.use_gpu else {})}
    fs, storage_path = storage.resolve(storage.parent(req.run_dir))
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.max_workers) if t.elastic else t.num_workers,
                                     use_gpu=t.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.resize_interval_s),
        run_config=RunConfig(
            name=req.run_name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_best, checkpoint_score_attribute="valid/loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
            # Ray Train's own INFO lines (eight per worker group it starts, each worker's process-group setup)
            # buried the run's; its warnings and errors still show, and the workers print their own progress
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=data.datasets,
    )


def checkpoint_location(run_dir: str, checkpoint) -> str | None:
    """Where a Ray Train checkpoint of the run is, as the user would name it (Ray gives the path inside its
    filesystem: ``bucket/runs/x/checkpoint_...`` without the scheme)."""
    return storage.join(run_dir, storage.name(checkpoint.path)) if checkpoint is not None else None


def _valid_loss(metrics: dict) -> float:
    loss = metrics.get("valid/loss")
    return loss if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf


def write_summary(req: TrainRequest, result) -> dict:
    best = None
    if result.best_checkpoints:
        best = min(result.best_checkpoints, key=lambda cm: _valid_loss(cm[1]))
    summary = {
        "stage": req.config.train.stage, "run": req.run_dir,
        "latest_checkpoint": checkpoint_location(req.run_dir, result.checkpoint),
        "best_checkpoint": checkpoint_location(req.run_dir, best[0]) if best else None,
        "best_valid_loss": best[1].get("valid/loss") if best else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "tensorboard": f"tensorboard --logdir {storage.join(req.run_dir, 'tensorboard')} --host 127.0.0.1",
    }
    path = storage.join(req.run_dir, SUMMARY)
    if storage.exists(path):  # keep the scores watch-eval wrote there
        evaluated = storage.read_json(path).get("eval")
        if evaluated:
            summary["eval"] = evaluated
    storage.write_json(path, summary)
    return summary


def train(req: TrainRequest, cluster_cpus: float, log=print) -> dict:
    """Check, train, and write ``summary.json``. Needs a connected Ray."""
    import dataclasses

    import ray

    req = dataclasses.replace(req, config=resolve_use_gpu(req.config, ray.cluster_resources(), log))
    loop_cfg = check_request(req, log)
    trainer = build_trainer(req, loop_cfg, cluster_cpus)
    marker = storage.join(req.run_dir, DIVERGED)
    if storage.exists(marker):  # an earlier attempt's: this one starts afresh
        storage.delete(marker)
    result = trainer.fit()
    summary = write_summary(req, result)
    if storage.exists(marker):
        diverged = storage.read_json(marker)
        summary["diverged"] = {k: diverged[k] for k in ("step", "lr", "what")}
        storage.write_json(storage.join(req.run_dir, SUMMARY), summary)
        latest = summary["latest_checkpoint"] or "none yet (it diverged before the first save): start it again"
        raise TrainingDiverged(f"{diverged['message']} Latest checkpoint: {latest}.")
    return summary


__all__ = ["TrainRequest", "TrainingDiverged", "check_run_name", "check_request", "build_trainer", "train", "write_summary", "worker_cpus",
           "resolve_use_gpu", "latest_checkpoint", "cpus_per_worker"]
