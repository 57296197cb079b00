"""Audio corpus -> token dataset, on Ray Data.

    list tracks (driver) -> skip those already on disk
      -> decode (CPU tasks): read, decode, cut clips, pad short ones, make each tokenizer's waveform as
         open-musiclm does (tokens.system.tokenizer_inputs: 48/16/24 kHz), CLAP features;
         a file that fails becomes an error row, never a failed task
      -> tokenize (actor pool, GPU when the cluster has one): CLAP tower + RVQ, semantic encoder + k-means,
         EnCodec
      -> write (small CPU tasks): Parquet shards under train/, valid/ and errors/, each written atomically
      -> summary rows streamed back to the driver for progress and the final report.

CLAP's feature extraction (a mel spectrogram per 10 s window, 10 windows per second of audio with the 1 s
hop) runs in the decode tasks: it needs no weights, and it keeps the actors, which hold the models and
the GPUs, busy with model work only.

Each track is tokenized on its own (its CLAP windows batched together): a track's tokens then do not
depend on which other tracks shared its batch, so an interrupted run that is resumed writes exactly the
rows an uninterrupted run would. The caller connects to Ray; nothing here calls ``ray.init``.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..audio.io import AudioDecodeError, crop_or_pad, decode_audio
from ..config import DataConfig
from ..infra import storage
from ..infra.raycompute import ActorPlan
from . import dataset as ds_layout
from .clips import clip_spans, pad_clip, row_id, split_of
from .sources import Source, Track

# settings that change what the rows contain; a resumed run must use the same ones
ROW_SETTINGS = ("clip_seconds", "crops", "min_seconds", "pad_to_seconds", "valid_frac", "seed")
# how the tokenizers' waveforms are made (tokens.system.tokenizer_inputs), recorded with the settings so that a
# dataset begun by a version that made them otherwise (soxr, per-clip normalization) is not resumed with these
WAVEFORMS = "open-musiclm: sinc resampling, int16 grid for CLAP and EnCodec, semantic normalized per track"


@dataclass
class PreprocessJob:
    source: Source
    token_system: str  # a folder or an object-store URI
    out: str  # the same
    cfg: DataConfig
    manifest: dict  # what this run writes into manifest.json (without counts and status)
    pending: list[Track]
    scan: ds_layout.Scan
    rates: dict  # sample rate each tokenizer reads: clap, semantic, acoustic
    created: str | None = None
    status: str | None = None  # the manifest's status before this run


def prepare(source: Source, token_system: str | Path, out: str | Path, cfg: DataConfig, *,
            retry_errors: bool = False, log=print) -> PreprocessJob:
    """Check the token system and the output folder, and work out which tracks still need tokenizing."""
    from ..tokens.system import acoustic_sample_rate, check_unmodified, require_fitted_files

    out, token_system = storage.location(out), storage.location(token_system)
    # The driver checks what it can without the encoders' weights (settings, RVQ, k-means: an edited
    # token_system.json is refused here, before the manifest is written); each tokenizer actor loads the models,
    # checks the files still give this fingerprint, and refuses to run otherwise (Tokenizer.__init__).
    meta, tcfg = check_unmodified(token_system)
    require_fitted_files(token_system)
    if cfg.pad_to_seconds < tcfg.clap_audio_length_seconds:
        raise ds_layout.DatasetError(
            f"pad_to_seconds ({cfg.pad_to_seconds} s) is shorter than the CLAP window "
            f"({tcfg.clap_audio_length_seconds:g} s): every row needs at least one full CLAP window")
    manifest = {
        "token_system": token_system, "fingerprint": meta["fingerprint"],
        "source": {"kind": source.kind, "root": source.root, **source.settings},
        "settings": {**{k: getattr(cfg, k) for k in ROW_SETTINGS}, "waveforms": WAVEFORMS},
        "windows": {"clap_seconds": tcfg.clap_audio_length_seconds, "clap_hop_seconds": tcfg.clap_rvq_cfg.hop_seconds,
                    "clip_seconds": cfg.clip_seconds, "pad_to_seconds": cfg.pad_to_seconds},
        "tokens": {  # arrays are flattened time-major with the codebook fastest
            "clap": {"codebooks": tcfg.clap_rvq_cfg.rq_num_quantizers, "codebook_size": tcfg.clap_rvq_cfg.codebook_size,
                     "per": "CLAP window", "from": cfg.clap_from},
            "semantic": {"codebooks": 1, "codebook_size": tcfg.hubert_kmeans_cfg.codebook_size,
                         "hz": tcfg.hubert_kmeans_cfg.output_hz},
            "coarse": {"codebooks": tcfg.num_coarse_quantizers, "codebook_size": tcfg.encodec_cfg.codebook_size,
                       "hz": tcfg.encodec_cfg.output_hz},
            "fine": {"codebooks": tcfg.num_fine_quantizers, "codebook_size": tcfg.encodec_cfg.codebook_size,
                     "hz": tcfg.encodec_cfg.output_hz},
        },
    }
    existing = ds_layout.read_manifest(out)
    if existing is not None and existing.get("status") != "complete" and not any(
            ds_layout.shard_files(out, part) for part in (*ds_layout.SPLITS, ds_layout.ERRORS)):
        # nothing was made with the old settings: a first run that failed before its first row must not block
        # this one (an edited token system, since restored, was refused by every tokenizer actor)
        log(f"{out}: an earlier run wrote its manifest and no row; starting afresh with these settings")
        existing = None
    elif existing is not None:
        ds_layout.check_compatible(out, existing, manifest)
    elif not storage.is_empty_dir(out):
        raise ds_layout.DatasetError(f"output folder {out} is not empty and holds no {ds_layout.MANIFEST}: "
                                     f"choose an empty or new folder for the token dataset")
    if retry_errors:
        for f in ds_layout.shard_files(out, ds_layout.ERRORS):
            storage.delete(f)
    if ds_layout.remove_stale_temporaries(out):
        log(f"removed partly written files of an interrupted run in {out}")
    scan = ds_layout.scan(out)
    pending = [t for t in source.tracks if t.id not in scan.done_tracks]
    rates = {"clap": tcfg.clap_rvq_cfg.sample_rate, "semantic": tcfg.hubert_kmeans_cfg.target_sample_hz,
             "acoustic": acoustic_sample_rate(token_system)}
    return PreprocessJob(source, token_system, out, cfg, manifest, pending, scan, rates,
                         (existing or {}).get("created"), (existing or {}).get("status"))


# ------------------------------------------------------------------------------------------------ stages

@functools.lru_cache(maxsize=4)
def _featurizer(token_system: str):
    from ..tokens.system import load_clap_featurizer

    return load_clap_featurizer(token_system)


def _base_row(row: dict) -> dict:
    """Every column a decoded row has, empty; ``kind`` stays empty unless the track failed."""
    return {"id": row["track_id"], "track_id": row["track_id"], "path": row["path"], "caption": row["caption"],
            "split": "", "start_seconds": 0.0, "audio_seconds": 0.0, "seconds": 0, "rows_in_track": 0,
            "stage": "", "kind": "", "message": "", "clap_shape": np.zeros(4, np.int64),
            "clap_features": np.zeros(0, np.float32), "audio_semantic": np.zeros(0, np.float32),
            "audio_acoustic": np.zeros(0, np.float32)}


def _error_row(row: dict, stage: str, kind: str, message: str) -> dict:
    return {**_base_row(row), "stage": stage, "kind": kind, "message": message}


def track_clips(audio: np.ndarray, rate: int, cfg: DataConfig, track_id: str, rates: dict):
    """Each row's clip of a decoded track as preprocessing cuts it: (start, length, whole seconds, the waveform each
    tokenizer reads at ``rates``). Generation's audio prompts go through here too (``generation.prompts``), so that
    a clip gives the tokens preprocessing gives it."""
    from ..tokens.semantic import waveform_stats
    from ..tokens.system import tokenizer_inputs

    # open-musiclm normalizes the semantic encoder's input over the whole padded track, before cropping
    stats = waveform_stats(pad_clip(audio, rate, cfg.pad_to_seconds))
    for start, length in clip_spans(len(audio), rate, cfg, track_id):
        clip = pad_clip(audio[start: start + length], rate, cfg.pad_to_seconds)
        seconds = len(clip) // rate
        yield start, length, seconds, {name: crop_or_pad(wave, seconds * rates[name])
                                       for name, wave in tokenizer_inputs(clip, rate, rates, stats).items()}


def decode_track(row: dict, token_system: str, cfg: dict, rates: dict) -> list[dict]:
    """One track -> one row per clip with the audio each tokenizer needs, or one error row."""
    cfg = DataConfig(**cfg)
    if row.get("problem_kind"):  # listed, but there is no file to read (missing, a directory, a broken link)
        return [_error_row(row, "list", row["problem_kind"], row["problem"])]
    if cfg.clap_from == "caption" and not str(row.get("caption") or "").strip():
        return [_error_row(row, "list", "no_caption", "the track has no caption, and the CLAP tokens are made from "
                           "captions (clap_from=caption): give it one in the captions file, or use clap_from=audio")]
    try:
        audio, rate = decode_audio(row["path"])
    except AudioDecodeError as e:
        return [_error_row(row, "decode", e.kind, e.reason)]
    except Exception as e:  # a decoder crash must not end the job either
        return [_error_row(row, "decode", "decode_failed", f"{type(e).__name__}: {e}")]
    duration = len(audio) / rate
    if duration < cfg.min_seconds:
        return [_error_row(row, "decode", "too_short", f"track is {duration:.2f} s long, shorter than min_seconds "
                                                       f"({cfg.min_seconds:g} s)")]
    try:
        clips = list(track_clips(audio, rate, cfg, row["track_id"], rates))
        out = []
        featurizer = _featurizer(token_system)
        for k, (start, length, seconds, at) in enumerate(clips):
            if cfg.clap_from == "caption":  # the caption's tokens stand for every window: only their count is needed
                shape, feats = np.array([featurizer.window_count(len(at["clap"])), 0, 0, 0]), np.zeros(0, np.float32)
            else:
                feats = featurizer(at["clap"])
                shape = np.array(feats.shape)
            out.append({**_base_row(row), "id": row_id(row["track_id"], k, len(clips)),
                        "split": split_of(row["track_id"], cfg.valid_frac, cfg.seed),
                        "start_seconds": start / rate, "audio_seconds": min(length, len(audio) - start) / rate,
                        "seconds": seconds, "rows_in_track": len(clips), "clap_shape": shape,
                        "clap_features": feats.reshape(-1), "audio_semantic": at["semantic"],
                        "audio_acoustic": at["acoustic"]})
        return out
    except Exception as e:
        return [_error_row(row, "decode", "decode_failed", f"{type(e).__name__}: {e}")]


class Tokenizer:
    """Ray Data actor: holds the token system's models; turns decoded clips into token arrays."""

    def __init__(self, token_system: str, fingerprint: str, device: str, threads: int, clap_from: str = "audio"):
        import torch

        from ..tokens.system import CONFIG_FILE, TokenSystem, TokenSystemError

        if threads:
            torch.set_num_threads(threads)
        self.system = TokenSystem.load(token_system, device=device)
        if self.system.fingerprint != fingerprint:
            raise TokenSystemError(f"token system {token_system} gives fingerprint {self.system.fingerprint[:12]}, "
                                   f"but the job started from {CONFIG_FILE} saying {fingerprint[:12]}: its files "
                                   f"were changed. Restore them, or re-fit and start a new dataset.")
        c = self.system.config
        self.n_coarse, self.n_fine = c.num_coarse_quantizers, c.num_fine_quantizers
        self.semantic_hz, self.acoustic_hz = c.hubert_kmeans_cfg.output_hz, c.encodec_cfg.output_hz
        self.clap_from = clap_from

    def tokens(self, row: dict) -> dict[str, np.ndarray]:
        s = self.system
        shape = tuple(int(d) for d in row["clap_shape"])
        if self.clap_from == "caption":  # the caption's tokens for each of the clip's CLAP windows (no features)
            clap = np.repeat(s.clap.text_tokens([str(row["caption"])]), shape[0], axis=0)
        else:
            clap = s.clap.tokens(s.clap.embed_features(np.asarray(row["clap_features"], np.float32).reshape(shape)))
        semantic = s.semantic.tokens(np.asarray(row["audio_semantic"], np.float32))
        acoustic = s.acoustic.encode(np.asarray(row["audio_acoustic"], np.float32))
        seconds = int(row["seconds"])
        # the frame counts every reader relies on: 50 Hz semantic (one frame short, as HuBERT's convolutions
        # give), 75 Hz acoustic
        if len(semantic) != seconds * self.semantic_hz - 1 or len(acoustic) != seconds * self.acoustic_hz:
            raise RuntimeError(f"unexpected token counts for {seconds} s: semantic {len(semantic)}, "
                               f"acoustic {len(acoustic)}")
        coarse, fine = acoustic[:, :self.n_coarse], acoustic[:, self.n_coarse: self.n_coarse + self.n_fine]
        return {name: np.ascontiguousarray(a, dtype=np.uint16).reshape(-1)
                for name, a in (("clap", clap), ("semantic", semantic), ("coarse", coarse), ("fine", fine))}

    def __call__(self, batch: dict) -> dict:
        meta_cols = (*(c for c in ds_layout.ROW_SCHEMA.names if c not in ds_layout.TOKEN_COLUMNS),
                     "stage", "kind", "message")
        out = {c: [] for c in (*meta_cols, *ds_layout.TOKEN_COLUMNS)}
        for i in range(len(batch["id"])):
            row = {c: batch[c][i] for c in batch}
            tokens = {c: np.zeros(0, np.uint16) for c in ds_layout.TOKEN_COLUMNS}
            if not row["kind"]:
                try:
                    tokens = self.tokens(row)
                except Exception as e:  # one bad clip must not end the job: it becomes an error row
                    row.update(stage="tokenize", kind="tokenize_failed", message=f"{type(e).__name__}: {e}")
            for c in meta_cols:
                out[c].append(row[c])
            for c in ds_layout.TOKEN_COLUMNS:
                out[c].append(tokens[c])
        return out


class ShardWriter:
    """Writes tokenized rows as shards of exactly ``rows_per_shard`` rows per split (train, valid, errors), the
    last of each smaller. One per job: a Ray actor the driver makes (so that it can ``flush`` it when the stream
    ends), fed by the pipeline's last step (``_to_writer``), or an object in this process (``run_local``).
    Rows wait in its buffers until a shard is full: an interrupted run loses only those, and the rerun redoes
    them (resuming reads what is on disk). Token rows are small (about 80 KB per 30 s track): one writer keeps up."""

    def __init__(self, out: str, skip_rows: frozenset, rows_per_shard: int):
        self.out, self.skip_rows, self.rows_per_shard = out, skip_rows, rows_per_shard
        self.buffers: dict[str, list[dict]] = {part: [] for part in (*ds_layout.SPLITS, ds_layout.ERRORS)}

    def add(self, batch: dict) -> None:
        """Take a batch of tokenized rows; write every shard that is full."""
        for i in range(len(batch["id"])):
            if batch["kind"][i]:
                self.buffers[ds_layout.ERRORS].append({c: str(batch[c][i]) for c in ds_layout.ERROR_SCHEMA.names})
            elif batch["id"][i] not in self.skip_rows:  # rows of a partly written track already on disk
                self.buffers[str(batch["split"][i])].append({c: batch[c][i] for c in ds_layout.ROW_SCHEMA.names})
        for part in self.buffers:
            while len(self.buffers[part]) >= self.rows_per_shard:
                self._write(part, self.rows_per_shard)

    def flush(self) -> None:
        """Write what the buffers hold (the end of the stream)."""
        for part in self.buffers:
            if self.buffers[part]:
                self._write(part, len(self.buffers[part]))

    def _write(self, part: str, n: int) -> None:
        rows, self.buffers[part] = self.buffers[part][:n], self.buffers[part][n:]
        schema = ds_layout.ERROR_SCHEMA if part == ds_layout.ERRORS else ds_layout.ROW_SCHEMA
        ds_layout.write_shard(self.out, part, pa.table({c: [r[c] for r in rows] for c in schema.names}, schema=schema))


def summary_rows(batch: dict) -> dict:
    """What the driver hears of each tokenized row (for progress)."""
    return {"track_id": [str(t) for t in batch["track_id"]], "split": [str(s) for s in batch["split"]],
            "kind": [str(k) for k in batch["kind"]], "audio_seconds": np.asarray(batch["audio_seconds"], np.float64)}


def _to_writer(batch: dict, writer) -> dict:
    """The pipeline's last step: hand the batch to the job's writer actor, pass its summary on."""
    import ray

    ray.get(writer.add.remote(batch))
    return summary_rows(batch)


# ------------------------------------------------------------------------------------------------ driver

@dataclass
class Progress:
    total: int
    start: float = dataclasses.field(default_factory=time.time)
    tracks: set = dataclasses.field(default_factory=set)
    failed: Counter = dataclasses.field(default_factory=Counter)
    audio_seconds: float = 0.0
    rows: Counter = dataclasses.field(default_factory=Counter)
    last_log: float = 0.0

    def add(self, row: dict) -> None:
        self.tracks.add(row["track_id"])
        if row["kind"]:
            self.failed[row["kind"]] += 1
        else:
            self.rows[row["split"]] += 1
            self.audio_seconds += float(row["audio_seconds"])

    def line(self) -> str:
        wall = max(1e-9, time.time() - self.start)
        done = len(self.tracks)
        eta = (self.total - done) * wall / done if done else float("nan")
        return (f"{done}/{self.total} tracks ({sum(self.failed.values())} failed), {self.audio_seconds:.0f} s of "
                f"audio, {self.audio_seconds / wall:.1f} s audio/s, {done / wall:.2f} tracks/s, ETA {eta:.0f} s")


def run(job: PreprocessJob, plan: ActorPlan, *, tracks_per_task: int = 4, tokenize_batch: int = 1,
        log_every: float = 10.0, log=print) -> dict:
    """Tokenize the job's pending tracks on the connected Ray cluster; returns the run's summary."""
    import ray

    job.created = job.created or time.strftime("%Y-%m-%dT%H:%M:%S")
    ds_layout.write_manifest(job.out, {**job.manifest, "created": job.created, "status": "in_progress",
                                       "counts": job.scan.counts()})
    log(f"tokenizing {len(job.pending)} tracks into {job.out}: {plan.describe()}")
    items = [track_row(t) for t in job.pending]
    data = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // tracks_per_task)))
    data = data.flat_map(decode_track, num_cpus=plan.decode_cpus,
                         fn_kwargs={"token_system": str(job.token_system), "cfg": dataclasses.asdict(job.cfg),
                                    "rates": job.rates})
    data = data.map_batches(Tokenizer, batch_size=tokenize_batch,
                            compute=ray.data.ActorPoolStrategy(size=plan.actors),
                            num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                            fn_constructor_kwargs={"token_system": str(job.token_system),
                                                   "fingerprint": job.manifest["fingerprint"],
                                                   "device": plan.device, "threads": plan.threads_per_actor,
                                                   "clap_from": job.cfg.clap_from})
    writer = ray.remote(num_cpus=0.05)(ShardWriter).remote(str(job.out), frozenset(job.scan.partial_rows),
                                                            job.cfg.rows_per_shard)
    # rows go to the writer as the tokenizers finish them (the tokenizer encodes row by row; a batch of one
    # hands each row on at once: the writer, not the batching, decides the shard size)
    data = data.map_batches(_to_writer, batch_size=None, num_cpus=0.05, fn_kwargs={"writer": writer})
    progress = Progress(len(job.pending))
    try:
        for row in data.iter_rows():
            progress.add(row)
            if time.time() - progress.last_log >= log_every:
                progress.last_log = time.time()
                log(progress.line())
        ray.get(writer.flush.remote())
        # Ended here rather than when its handle goes: the dataset's plan holds the handle in a reference cycle,
        # so the actor (and its 0.05 CPU) lived on until the driver's next garbage collection. A driver that goes
        # on with an actor asking every CPU (the pipeline's evaluation, one PromptWorker on a CPU machine) waited
        # 17-18 s for Ray to ask for that collection (measured in the demo pipeline, 2026-11-26).
        ray.kill(writer)
    except KeyboardInterrupt:
        log(f"interrupted after {len(progress.tracks)} tracks; every shard written so far is kept. Run the same "
            f"command again to tokenize the rest.")
        raise
    return finish(job, progress, log)


def decode_local(job: PreprocessJob, track) -> list[dict]:
    """``decode_track`` of one of the job's tracks, in this process."""
    return decode_track(track_row(track), str(job.token_system), dataclasses.asdict(job.cfg), job.rates)


def track_row(track: Track) -> dict:
    """The row a listed track enters the pipeline as."""
    return {"track_id": track.id, "path": track.path, "caption": track.caption,
            "problem_kind": track.problem_kind, "problem": track.problem}


def run_local(job: PreprocessJob, *, batch_rows: int = 16, log=print) -> dict:
    """The same steps in this process, without Ray: for small corpora and tests."""
    job.created = job.created or time.strftime("%Y-%m-%dT%H:%M:%S")
    ds_layout.write_manifest(job.out, {**job.manifest, "created": job.created, "status": "in_progress",
                                       "counts": job.scan.counts()})
    tokenizer = Tokenizer(str(job.token_system), job.manifest["fingerprint"], "cpu", threads=0,
                          clap_from=job.cfg.clap_from) if job.pending else None
    rows = [r for t in job.pending for r in decode_local(job, t)]
    writer = ShardWriter(str(job.out), frozenset(job.scan.partial_rows), job.cfg.rows_per_shard)
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i: i + batch_rows]
        writer.add(tokenizer({c: [r[c] for r in chunk] for c in chunk[0]}))
    writer.flush()
    return finish(job, None, log)


def finish(job: PreprocessJob, progress: Progress | None, log=print) -> dict:
    """Recount what is on disk, update the manifest, and log the summary."""
    scan = ds_layout.scan(job.out)
    remaining = sum(1 for t in job.source.tracks if t.id not in scan.done_tracks)
    status = "complete" if remaining == 0 else "in_progress"
    counts = scan.counts()
    ds_layout.write_manifest(job.out, {**job.manifest, "created": job.created or time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "status": status, "counts": counts})
    summary = {"out": str(job.out), "status": status, "remaining_tracks": remaining, "dataset": counts}
    if progress is not None:
        wall = time.time() - progress.start
        summary["run"] = {"tracks": len(progress.tracks), "failed": dict(progress.failed),
                          "rows": dict(progress.rows), "audio_seconds": round(progress.audio_seconds, 1),
                          "wall_seconds": round(wall, 1),
                          "audio_seconds_per_second": round(progress.audio_seconds / max(wall, 1e-9), 2)}
        log(f"this run: {progress.line()}")
        if progress.failed:
            log("failed by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(progress.failed.items()))
                + f" (see {storage.join(job.out, ds_layout.ERRORS)})")
    log(f"dataset {job.out}: {status}; rows {counts['rows']}, tracks {counts['tracks']}, errors "
        f"{counts['errors']}, {counts['seconds']:.0f} s tokenized"
        + (f"; {remaining} tracks still to do: run the same command again" if remaining else ""))
    return summary
