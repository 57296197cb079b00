"""Tuning a token system's CLAP on captioned audio (``musiclm fit-clap``), contrastively, on Ray Train.

For a domain CLAP describes poorly (the seed blamed FMA's weak text), and for the offline world, where the
`tiny` CLAP starts random and embeds every clip alike. Data: a source with captions (``captions.jsonl``, FMA's
metadata captions) split by track into train and held-out tracks (a stable hash of the track id). Ray Data
decodes each track and turns up to ``windows_per_track`` of its CLAP windows (seeded per track) into CLAP's input
features; rows stream to the workers, or are kept in the object store across epochs when they fit
(``cache_gb``). Each worker runs CLAP's own symmetric contrastive loss (``ClapModel(return_loss=True)``, the
negatives being the other clips of its batch) on both towers or one (``train``: the other frozen), under DDP.

Rank 0 scores retrieval on the held-out tracks before the first step and every ``eval_every`` steps: each track's
audio embedding is the mean of its windows' (normalized), each caption is ranked against every held-out track
and every track against every caption; ``valid/recall@1`` and ``@5`` are the means of the two directions
(chance: k / tracks). A checkpoint (weights and AdamW state as safetensors, ``train_state.json``) is written at
every evaluation; running the same command again resumes from the latest. At the end the driver writes the
tuned weights into the token system (``encoders/clap``, the same transformers format), records what they were
tuned on in ``token_system.json`` (``history``) and ``fit_clap.report.json``, and drops a fitted RVQ, whose codes
the new embeddings no longer match (``--overwrite``; refused otherwise, before any work).

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

from ..audio.io import AudioDecodeError, decode_audio
from ..config_io import check, from_dict, to_dict
from ..data.clips import stable_fraction
from ..infra import storage
from .system import (CONFIG_FILE, RVQ_FILE, TokenSystem, TokenSystemError, encoder_source, read_meta,
                     tokenizer_input, writable_root)

REPORT = "fit_clap.report.json"
WEIGHTS, OPTIMIZER, STATE = "clap.safetensors", "optimizer.safetensors", "train_state.json"
TOWERS = {"audio": ("audio_model", "audio_projection", "logit_scale_a"),
          "text": ("text_model", "text_projection", "logit_scale_t")}


@dataclass
class ClapTuneConfig:
    steps: int = 2000
    batch_size: int = 32  # clips per worker and step: the contrastive loss's negatives are the batch's other clips
    lr: float = 1e-5  # a pretrained CLAP; a random one (tiny) learns at 3e-4
    warmup: int = 100  # linear warm-up steps, then constant
    weight_decay: float = 0.01
    train: str = "both"  # the towers that learn: both, audio or text (the other frozen)
    windows_per_track: int = 4  # CLAP windows (clap_audio_length_seconds each) of a track, chosen per track
    max_seconds: float = 30.0  # of each track
    valid_tracks: int = 200  # held-out tracks (at most), chosen by a stable hash of the track id
    eval_every: int = 100  # steps between held-out retrieval scores (and checkpoints)
    num_workers: int = 1
    use_gpu: bool = False
    cache_gb: float = 2.0  # keep the decoded features in Ray's object store across epochs when under this size
    seed: int = 0

    def __post_init__(self):
        check(self.train in ("both", "audio", "text"), "train", "must be both, audio or text")
        for key in ("steps", "batch_size", "windows_per_track", "valid_tracks", "eval_every", "num_workers"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.lr > 0 and self.max_seconds > 0, "lr", "lr and max_seconds must be > 0")


# ---------------------------------------------------------------------------------------------- data

def split_tracks(tracks: list, cfg: ClapTuneConfig) -> tuple[list, list]:
    """(train, valid) of the captioned ``tracks``: the ``valid_tracks`` whose stable hash of (seed, id) is lowest
    are held out, so adding tracks to a corpus moves few of them."""
    ranked = sorted(tracks, key=lambda t: stable_fraction(cfg.seed, f"clap-valid:{t.id}"))
    n_valid = min(cfg.valid_tracks, len(tracks) // 5)
    return sorted(ranked[n_valid:], key=lambda t: t.id), sorted(ranked[:n_valid], key=lambda t: t.id)


def _featurize(row: dict, token_system: str, windows: int, max_seconds: float, seed: int) -> list[dict]:
    """Rows of one track: up to ``windows`` of its CLAP windows as CLAP's input features (flattened), each with
    the track's caption; one row with ``error`` set when it cannot be decoded."""
    from .system import load_clap_featurizer

    featurizer = _FEATURIZERS.get(token_system) or _FEATURIZERS.setdefault(token_system,
                                                                             load_clap_featurizer(token_system))
    try:
        audio, rate = decode_audio(row["path"], max_seconds=max_seconds)
    except AudioDecodeError as e:
        return [{"id": row["id"], "caption": row["caption"], "features": np.zeros(0, np.float32), "error": e.reason}]
    feats = featurizer(tokenizer_input("clap", audio, rate, featurizer.sample_rate))
    if len(feats) > windows:  # a fixed subset per track, the same on every run
        rng = np.random.default_rng([seed, int(stable_fraction(seed, row["id"]) * 2 ** 32)])
        feats = feats[np.sort(rng.choice(len(feats), windows, replace=False))]
    return [{"id": row["id"], "caption": row["caption"], "features": f.reshape(-1), "error": ""} for f in feats]


_FEATURIZERS: dict = {}  # one per token system and Ray worker process


def feature_dataset(tracks: list, token_system: str, cfg: ClapTuneConfig, feature_bytes: int):
    """The Ray Dataset of ``tracks``' rows (``_featurize``), materialized when it fits ``cfg.cache_gb``; and whether
    it was (then feeding the workers needs no CPU of its own)."""
    import ray

    items = [{"id": t.id, "path": t.path, "caption": t.caption} for t in tracks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    ds = ds.flat_map(_featurize, fn_kwargs={"token_system": token_system, "windows": cfg.windows_per_track,
                                            "max_seconds": cfg.max_seconds, "seed": cfg.seed})
    if len(tracks) * cfg.windows_per_track * feature_bytes <= cfg.cache_gb * 2 ** 30:
        return ds.materialize(), True
    return ds, False


# ---------------------------------------------------------------------------------------------- metrics

def retrieval(audio: torch.Tensor, text: torch.Tensor, ids: list[str]) -> dict[str, float]:
    """Held-out retrieval of window embeddings ``audio`` (n, d) of tracks ``ids`` against each track's caption
    embedding ``text`` (n, d; the same for a track's windows): recall@1, recall@5 and the mean rank, averaged over
    text -> audio and audio -> text, with chance recall@1 for the number of tracks."""
    order = sorted(set(ids))
    index = torch.tensor([order.index(i) for i in ids])
    a = torch.zeros(len(order), audio.shape[1]).index_add_(0, index, torch.nn.functional.normalize(audio, dim=-1))
    t = torch.zeros(len(order), text.shape[1]).index_copy_(0, index, text)
    sim = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(a, dim=-1).T
    out = {}
    for name, s in (("text_to_audio", sim), ("audio_to_text", sim.T)):
        ranks = (s >= s.diag()[:, None]).sum(1).float() - 1  # others scoring at least the true pair's (ties lose)
        out.update({f"{name}/recall@1": (ranks < 1).float().mean().item(),
                    f"{name}/recall@5": (ranks < 5).float().mean().item(), f"{name}/mean_rank": ranks.mean().item() + 1})
    metrics = {f"valid/{k}": v for k, v in out.items()}
    for k in ("recall@1", "recall@5", "mean_rank"):
        metrics[f"valid/{k}"] = (out[f"text_to_audio/{k}"] + out[f"audio_to_text/{k}"]) / 2
    metrics["valid/chance_recall@1"] = 1 / len(order)
    metrics["valid/tracks"] = float(len(order))
    return metrics


@torch.no_grad()
def embed(model, processor, features: np.ndarray, captions: list[str], device, max_tokens: int,
          batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAP audio and text embeddings (unnormalized) of feature rows and their captions, in eval mode."""
    from .clap import _pooled, embed_audio_features

    audio = embed_audio_features(model, features, device, batch_size)
    text = []
    for i in range(0, len(captions), batch_size):
        enc = tokenize(processor, captions[i: i + batch_size], max_tokens, device)
        text.append(_pooled(model.get_text_features(**enc)).float().cpu())
    return audio, torch.cat(text)


def tokenize(processor, captions: list[str], max_tokens: int, device) -> dict:
    enc = processor.tokenizer(list(captions), padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


# ---------------------------------------------------------------------------------------------- the loop

def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as flat tensors (safetensors holds tensors only): ``<param index>.<name>``."""
    out = {}
    for i, s in opt.state_dict()["state"].items():
        for name, v in s.items():
            out[f"{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def clap_loop(loop_cfg: dict) -> None:
    """Ray Train worker: tune CLAP contrastively; rank 0 scores retrieval, logs and saves."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from safetensors.torch import load_file, save_file

    from ..train.checkpoint import staging_dir
    from ..train.loop import quiet_report_log, worker_print
    from ..train.metrics import TensorBoard, mean_over_workers
    from .encoders import load_clap

    cfg = from_dict(ClapTuneConfig, loop_cfg["config"], "config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(int(loop_cfg.get("threads", 1)))
    quiet_report_log()

    def log(msg: str) -> None:
        if rank == 0:
            worker_print(f"[fit-clap] {msg}")

    torch.manual_seed(cfg.seed)
    model, processor = load_clap(loop_cfg["clap"])
    frozen = [] if cfg.train == "both" else list(TOWERS["text" if cfg.train == "audio" else "audio"])
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
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
        log(f"resumed at step {step} (its epoch's remaining clips are not revisited: epoch {epoch} starts)")
    for group in opt.param_groups:  # the configured rate, not a resumed run's saved one
        group["lr"] = cfg.lr
    first_step = step
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (first_step + s + 1) / max(cfg.warmup, 1)))
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    max_tokens = int(loop_cfg["text_max_tokens"])
    tb = TensorBoard(loop_cfg["tensorboard_dir"] if rank == 0 else None, purge_step=step + 1 if step else None)
    valid = ray.get(loop_cfg["valid"]) if rank == 0 else None
    shape = tuple(loop_cfg["feature_shape"])

    def train_mode() -> None:  # a frozen tower stays in eval mode: its batch norms keep their statistics
        model.train()
        for name in frozen:
            if isinstance(getattr(model, name), torch.nn.Module):
                getattr(model, name).eval()

    def evaluate() -> dict:
        if valid is None:
            return {}
        model.eval()
        audio, text = embed(model, processor, valid["features"].reshape(-1, *shape), valid["captions"], device,
                            max_tokens)
        train_mode()
        scores = retrieval(audio, text, valid["ids"])
        log(f"step {step}: held-out retrieval over {int(scores['valid/tracks'])} tracks: recall@1 "
            f"{scores['valid/recall@1']:.3f} recall@5 {scores['valid/recall@5']:.3f} mean rank "
            f"{scores['valid/mean_rank']:.2f} (chance recall@1 {scores['valid/chance_recall@1']:.3f})")
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
            storage.write_json(storage.join(loop_cfg["run_dir"], "untuned.json"), first)
    train_mode()
    shard = ray.train.get_dataset_shard("train")
    losses, started = [], time.perf_counter()
    while step < cfg.steps:
        got = False
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=max(cfg.batch_size * 8, 256),
                                        local_shuffle_seed=cfg.seed + epoch * 1000 + rank):
            keep = batch["error"] == ""
            for i in np.flatnonzero(~keep):
                if batch["id"][i] not in skipped:
                    skipped[str(batch["id"][i])] = str(batch["error"][i])
                    worker_print(f"[fit-clap] track {batch['id'][i]} skipped: {batch['error'][i]}")
            idx = np.flatnonzero(keep)
            if len(idx) < min(cfg.batch_size, 2):  # a contrastive batch needs another clip
                continue
            got = True
            x = torch.from_numpy(np.stack(batch["features"][idx]).reshape(len(idx), *shape)).to(device)
            enc = tokenize(processor, [str(c) for c in batch["caption"][idx]], max_tokens, device)
            out = ddp(**enc, input_features=x, is_longer=torch.zeros(len(idx), 1, dtype=torch.bool, device=device),
                      return_loss=True)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            step += 1
            losses.append(float(out.loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"fit-clap: the contrastive loss became {losses[-1]} at step {step}: "
                                         f"lower --lr (now {cfg.lr:g})")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                loss = mean_over_workers(float(np.mean(losses)), device)
                rate = len(losses) * cfg.batch_size * world / (time.perf_counter() - started)
                log(f"step {step}/{cfg.steps}: loss {loss:.4f} lr {schedule.get_last_lr()[0]:.2e} "
                    f"{rate:.1f} clips/s")
                tb.scalars({"train/loss": loss, "train/lr": schedule.get_last_lr()[0], "train/clips_per_s": rate,
                            "train/logit_scale_text": float(model.logit_scale_t.exp()),
                            "train/logit_scale_audio": float(model.logit_scale_a.exp())}, step)
                save({"train/loss": loss, **evaluate()})
                losses, started = [], time.perf_counter()
            if step >= cfg.steps:
                break
        if not got:
            raise RuntimeError(f"fit-clap: worker {rank} got no batch of {cfg.batch_size} clips in epoch {epoch}: "
                               f"the train tracks give fewer clips than batch_size x workers; lower --batch-size or "
                               f"--num-workers, or raise --windows-per-track")
        epoch += 1
    tb.close()


# ---------------------------------------------------------------------------------------------- driver

def refuse_tuning(token_system: str | Path, overwrite: bool) -> dict:
    """``token_system.json``, checked: a fitted RVQ is refused unless ``overwrite`` (its codes were fitted on the
    CLAP about to change), before any work."""
    writable_root(token_system)
    meta, _ = read_meta(token_system)
    if meta.get("fitted", {}).get("clap_rvq") and not overwrite:
        raise TokenSystemError(
            f"the CLAP RVQ of {token_system} is fitted on its present CLAP: tuning CLAP changes every embedding, so "
            f"that RVQ, every conditioning token, every token dataset and every stage trained on them would no "
            f"longer match. Pass --overwrite to tune anyway: the RVQ is then dropped, and you re-fit it "
            f"(`musiclm fit-rvq`), re-make the token datasets (`musiclm preprocess`) and retrain the stages.")
    return meta


def _captioned(source, log) -> list:
    tracks = [t for t in source.tracks if t.caption and not t.problem_kind]
    missing = len(source.tracks) - len(tracks)
    if missing:
        log(f"{missing} of {len(source.tracks)} tracks have no caption or cannot be read: left out")
    return tracks


def fit_clap(token_system: str | Path, source, cfg: ClapTuneConfig, run_dir: str, cluster_cpus: float,
             overwrite: bool = False, log=print) -> dict:
    """Tune the CLAP of ``token_system`` on ``source``'s captioned tracks (a ``data.sources.Source``) in the run
    ``run_dir`` (resumed when it has a checkpoint), then write the weights into the token system. Needs a
    connected Ray."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..train.run import DATA_RESERVE, cpus_per_worker

    start = time.time()
    refuse_tuning(token_system, overwrite)
    root = Path(token_system)
    meta, ts_cfg = read_meta(root)
    tracks = _captioned(source, log)
    train, valid = split_tracks(tracks, cfg)
    if len(valid) < 2 or len(train) < cfg.batch_size:
        raise ValueError(f"fit-clap needs captioned tracks for a batch ({cfg.batch_size}) and at least 2 held-out "
                         f"ones (a fifth of the tracks, at most --valid-tracks): {source.root} has {len(tracks)}")
    from .system import load_clap_featurizer

    fe = load_clap_featurizer(root).feature_extractor
    frames = int(getattr(fe, "nb_max_samples", 480_000)) // int(getattr(fe, "hop_length", 480)) + 1
    log(f"fit-clap: {len(train)} train and {len(valid)} held-out tracks of {source.describe()}; "
        f"{cfg.steps} steps of {cfg.batch_size} clips x {cfg.num_workers} workers at lr {cfg.lr:g}, "
        f"training {'both towers' if cfg.train == 'both' else 'the ' + cfg.train + ' tower'}")
    train_ds, cached = feature_dataset(train, str(root), cfg, 4 * frames * fe.feature_size)
    rows = list(feature_dataset(valid, str(root), cfg, 4 * frames * fe.feature_size)[0].iter_rows())
    bad = {r["id"]: r["error"] for r in rows if r["error"]}
    rows = [r for r in rows if not r["error"]]
    for tid, why in bad.items():
        log(f"held-out track {tid} skipped: {why}")
    if len({r["id"] for r in rows}) < 2:
        raise ValueError(f"fit-clap: fewer than 2 held-out tracks of {source.root} could be decoded")
    shape = (1, np.asarray(rows[0]["features"]).size // fe.feature_size, fe.feature_size)
    held = {"features": np.stack([np.asarray(r["features"], np.float32) for r in rows]),
            "captions": [str(r["caption"]) for r in rows], "ids": [str(r["id"]) for r in rows]}
    # streamed, the decoding needs CPUs beside the workers (cpus_per_worker keeps one); cached, it is done
    cpus = cpus_per_worker(cfg.num_workers, cluster_cpus + (DATA_RESERVE if cached else 0), cfg.use_gpu)
    loop_cfg = {"config": to_dict(cfg), "clap": encoder_source(root, ts_cfg, "clap_rvq_cfg"), "valid": ray.put(held),
                "feature_shape": list(shape), "text_max_tokens": ts_cfg.clap_rvq_cfg.text_max_tokens,
                "run_dir": run_dir, "tensorboard_dir": storage.join(run_dir, "tensorboard"), "threads": int(cpus)}
    fs, storage_path = storage.resolve(storage.parent(run_dir))
    trainer = TorchTrainer(
        clap_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=storage.name(run_dir), storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=1),
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": train_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fit-clap run {run_dir} ended without a checkpoint")
    before = storage.read_json(storage.join(run_dir, "untuned.json"))
    with result.checkpoint.as_directory() as d:
        from safetensors.torch import load_file

        state = load_file(os.path.join(d, WEIGHTS))
        after = json.loads(Path(d, STATE).read_text())
    report = {"kind": "clap", "run": run_dir, "checkpoint": storage.join(run_dir, storage.name(result.checkpoint.path)),
              "corpus": source.root, "source_kind": source.kind, "tracks": {"train": len(train), "valid": len(valid)},
              "skipped": {**after.get("skipped", {}), **bad}, "steps": after["step"], "config": to_dict(cfg),
              "retrieval": {"untuned": {k: v for k, v in before.items() if k.startswith("valid/")},
                            "tuned": {k: v for k, v in after["metrics"].items() if k.startswith("valid/")}}}
    system = write_tuned(root, state, report, log)
    report.update(fingerprint=system.fingerprint, wall_seconds=round(time.time() - start, 1))
    storage.write_json(root / REPORT, report)
    b, a = report["retrieval"]["untuned"], report["retrieval"]["tuned"]
    log(f"held-out retrieval ({len(valid)} tracks): recall@1 {b['valid/recall@1']:.3f} -> {a['valid/recall@1']:.3f}, "
        f"recall@5 {b['valid/recall@5']:.3f} -> {a['valid/recall@5']:.3f}, mean rank {b['valid/mean_rank']:.2f} -> "
        f"{a['valid/mean_rank']:.2f} (chance recall@1 {a['valid/chance_recall@1']:.3f})")
    return report


def write_tuned(root: Path, state: dict[str, torch.Tensor], report: dict, log=print) -> TokenSystem:
    """The tuned CLAP weights written into the token system at ``root`` (``encoders/clap``, where its CLAP loads
    from from now on), what they were tuned on added to its history, a fitted RVQ dropped; saved with its new
    fingerprint."""
    import dataclasses

    from .encoders import save_clap

    system = TokenSystem.load(root)  # verified: the files are what token_system.json says
    old, had_rvq = system.fingerprint, system.rvq_fitted
    system.clap.model.load_state_dict(state, strict=True)
    save_clap(system.clap.model, system.clap.processor, root / "encoders/clap")
    meta, config = read_meta(root)
    config = dataclasses.replace(config, clap_rvq_cfg=dataclasses.replace(config.clap_rvq_cfg,
                                                                          model_name="encoders/clap"))
    storage.write_json(root / CONFIG_FILE, {**meta, "config": to_dict(config)})
    if had_rvq:
        (root / RVQ_FILE).unlink()
    system = TokenSystem.load(root, verify=False)  # the weights as written, the RVQ unfitted
    system.history.append({k: report[k] for k in ("kind", "run", "checkpoint", "corpus", "tracks", "steps")})
    system.save()
    log(f"token system {root}: CLAP tuned (fingerprint {old[:12]} -> {system.fingerprint[:12]})"
        + ("; its RVQ, fitted on the old CLAP, was dropped" if had_rvq else "")
        + ". Next: fit the RVQ (`musiclm fit-rvq`), then make the token datasets (`musiclm preprocess`) and train "
          "the stages: datasets and checkpoints of the old fingerprint are refused.")
    return system


__all__ = ["ClapTuneConfig", "fit_clap", "refuse_tuning", "retrieval", "split_tracks", "write_tuned", "REPORT"]
