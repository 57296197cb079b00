"""Fitting the token system's quantizers from a folder of audio, with Ray Data.

decode (CPU tasks, per-file errors become rows) -> encoder actor pool (CLAP audio tower, or the semantic
encoder; GPU when the cluster has one) -> vectors streamed back to the driver -> fit (RVQ with EMA, or
MiniBatchKMeans) -> written into the token-system directory with its new fingerprint, plus a report JSON.

The caller connects to Ray; nothing here calls ``ray.init``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..audio.io import AudioDecodeError, decode_audio, list_audio_files
from ..infra.raycompute import ActorPlan
from .kmeans import fit_minibatch_kmeans
from .system import TokenSystem, TokenSystemError, new_rvq, read_meta, tokenizer_input, writable_root

CLAP, SEMANTIC = "clap", "semantic"


@dataclass
class Extracted:
    vectors: np.ndarray
    tracks: int
    seconds: float
    errors: list[dict] = field(default_factory=list)


def _decode_row(row: dict, kind: str, sample_rate: int, max_seconds: float) -> dict:
    """The first ``max_seconds`` of a file as the ``kind`` encoder reads them (``tokenizer_input``: open-musiclm's
    waveform handling, as in preprocessing)."""
    try:
        audio, rate = decode_audio(row["path"], max_seconds=max_seconds)
        return {"path": row["path"], "audio": tokenizer_input(kind, audio, rate, sample_rate), "error": ""}
    except AudioDecodeError as e:
        return {"path": row["path"], "audio": np.zeros(0, np.float32), "error": e.reason}


class _Encoder:
    """Ray Data actor: loads the token system once, turns decoded audio into vectors (one array per track)."""

    def __init__(self, token_system: str, kind: str, device: str, threads: int, frames_per_track: int):
        torch.set_num_threads(threads)
        self.system = TokenSystem.load(token_system, device=device)
        self.kind, self.frames_per_track = kind, frames_per_track

    def _vectors(self, path: str, audio: np.ndarray) -> np.ndarray:
        if self.kind == CLAP:
            return self.system.clap.audio_embeddings(audio).numpy()
        feats = self.system.semantic.features(audio).numpy()
        if len(feats) > self.frames_per_track:  # a fixed random subset per track, same on every run
            rng = np.random.default_rng(int(hashlib.sha1(path.encode()).hexdigest()[:8], 16))
            feats = feats[np.sort(rng.choice(len(feats), self.frames_per_track, replace=False))]
        return feats

    def __call__(self, batch: dict) -> dict:
        out = {"path": [], "error": [], "seconds": [], "vectors": []}
        rate = self.system.clap.sample_rate if self.kind == CLAP else self.system.semantic.sample_rate
        for path, audio, error in zip(batch["path"], batch["audio"], batch["error"]):
            vectors = np.zeros((0, 0), np.float32)
            if not error:
                try:
                    vectors = self._vectors(str(path), np.asarray(audio, dtype=np.float32)).astype(np.float32)
                except Exception as e:  # one bad track must not end the job: it becomes an error row
                    error = f"{self.kind} encoder failed: {type(e).__name__}: {e}"
            out["path"].append(str(path))
            out["error"].append(error)
            out["seconds"].append(len(audio) / rate)
            out["vectors"].append(vectors.reshape(-1))
        return out


def extract(paths: list[str], system: TokenSystem, kind: str, plan: ActorPlan, *, max_seconds: float = 30.0,
            frames_per_track: int = 100, max_vectors: int | None = None, seed: int = 0, log=print) -> Extracted:
    """Run the decode -> encoder pipeline on Ray Data and gather the vectors on the driver."""
    import ray

    if kind == CLAP:
        rate, dim = system.clap.sample_rate, system.config.clap_rvq_cfg.dim
    else:
        rate, dim = system.semantic.sample_rate, system.semantic.hubert.config.hidden_size
    log(f"extracting {kind} vectors from {len(paths)} files: {plan.describe()}")
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths), 64)))
    ds = ds.map(_decode_row, fn_kwargs={"kind": kind, "sample_rate": rate, "max_seconds": max_seconds},
                num_cpus=plan.decode_cpus)
    ds = ds.map_batches(_Encoder, batch_size=4,
                        compute=ray.data.ActorPoolStrategy(size=plan.actors),
                        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                        fn_constructor_kwargs={"token_system": str(system.root), "kind": kind,
                                               "device": plan.device, "threads": plan.threads_per_actor,
                                               "frames_per_track": frames_per_track})
    chunks, errors, tracks, seconds = [], [], 0, 0.0
    for row in ds.iter_rows():
        if row["error"]:
            errors.append({"path": row["path"], "stage": f"fit_{kind}", "message": row["error"]})
            continue
        tracks += 1
        seconds += float(row["seconds"])
        chunks.append(np.asarray(row["vectors"], dtype=np.float32).reshape(-1, dim))
    if not chunks:
        raise TokenSystemError(f"no {kind} vectors could be extracted: all {len(paths)} files failed "
                               f"({errors[0]['message'] if errors else 'no files'})")
    vectors = np.concatenate(chunks)
    if max_vectors and len(vectors) > max_vectors:  # a uniform subset, not the first tracks to arrive
        keep = np.sort(np.random.default_rng(seed).choice(len(vectors), max_vectors, replace=False))
        vectors = vectors[keep]
    return Extracted(vectors, tracks, seconds, errors)


SAMPLE_MARGIN = 1.2  # tracks sampled beyond the estimate, for short and undecodable ones


def sample_tracks(paths: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``paths`` drawn uniformly without replacement by a generator seeded with ``seed`` (sorted)."""
    if n >= len(paths):
        return sorted(paths)
    return sorted(np.random.default_rng(seed).choice(sorted(paths), n, replace=False).tolist())


def _select(folder: str | Path, per_track: int, max_vectors: int | None, max_tracks: int | None, seed: int,
            log=print) -> tuple[list[str], dict]:
    """The tracks to encode: a uniform seeded sample of the folder, as many as ``max_vectors`` needs at
    ``per_track`` vectors each (plus a margin), at most ``max_tracks``; and its description for the report.
    Only these are decoded: on FMA Large a fit no longer encodes the whole corpus to keep a tenth of it."""
    paths = list_audio_files(folder)
    if not paths:
        raise FileNotFoundError(f"no audio files (mp3, wav, flac, ogg, ...) found under {folder}")
    n = len(paths)
    if max_vectors:
        n = min(n, math.ceil(max_vectors / max(per_track, 1) * SAMPLE_MARGIN))
    if max_tracks:
        n = min(n, max_tracks)
    sample = sample_tracks(paths, n, seed)
    info = {"files_in_folder": len(paths), "sampled": len(sample), "seed": seed,
            "vectors_per_track_expected": per_track, "folders_sampled": len({str(Path(p).parent) for p in sample}),
            "folders_in_folder": len({str(Path(p).parent) for p in paths})}
    log(f"sampled {len(sample)} of {len(paths)} files (seed {seed}, from {info['folders_sampled']} of "
        f"{info['folders_in_folder']} folders): about {per_track} vectors each")
    return sample, info


PARTS = {"clap_rvq": "CLAP RVQ", "semantic_kmeans": "semantic k-means"}  # token_system.json's "fitted" keys


def refuse_refit(token_system: str | Path, part: str, overwrite: bool) -> None:
    """Refuse to re-fit a fitted ``part`` (a key of ``PARTS``) of ``token_system`` unless ``overwrite``: checked
    from ``token_system.json`` alone, before a job starts Ray or loads an encoder (and again by the fit itself)."""
    fitted = read_meta(token_system)[0].get("fitted", {}).get(part, False)
    if fitted and not overwrite:
        raise TokenSystemError(f"the {PARTS[part]} of {token_system} is already fitted; re-fitting changes the "
                               f"fingerprint and every dataset made with it stops matching. Pass --overwrite to "
                               f"re-fit anyway.")


def _write_report(system: TokenSystem, name: str, report: dict) -> Path:
    path = Path(system.root) / f"{name}.report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def fit_rvq(token_system: str | Path, folder: str | Path, plan: ActorPlan, *, steps: int = 1000,
            batch_size: int = 2048, max_tracks: int | None = None, max_seconds: float = 30.0,
            max_vectors: int = 200_000, seed: int = 0, overwrite: bool = False, log=print) -> dict:
    """Fit the CLAP RVQ on the audio under ``folder`` and save it into ``token_system``."""
    start = time.time()
    refuse_refit(token_system, "clap_rvq", overwrite)
    system = TokenSystem.load(writable_root(token_system))
    c = system.config.clap_rvq_cfg
    windows = max(1, int((max_seconds - system.config.clap_audio_length_seconds) / c.hop_seconds) + 1)
    paths, sample = _select(folder, windows, max_vectors, max_tracks, seed, log)
    data = extract(paths, system, CLAP, plan, max_seconds=max_seconds, max_vectors=max_vectors, seed=seed, log=log)
    log(f"fitting RVQ {system.rvq.num_quantizers}x{system.rvq.codebook_size} on {len(data.vectors)} CLAP embeddings")
    rvq = new_rvq(system.config)
    fit = rvq.fit(data.vectors, steps=steps, batch_size=batch_size, seed=seed, log=log)
    system.set_rvq(rvq)
    system.save()
    report = {"kind": "clap_rvq", "fingerprint": system.fingerprint, "tracks": data.tracks,
              "seconds_of_audio": round(data.seconds, 1), "embeddings": int(len(data.vectors)),
              "sample": sample, "fit": asdict(fit), "failed": data.errors,
              "wall_seconds": round(time.time() - start, 1)}
    _write_report(system, "fit_rvq", report)
    log(fit.summary())
    _log_errors(data.errors, log)
    return report


def fit_kmeans(token_system: str | Path, folder: str | Path, plan: ActorPlan, *, frames_per_track: int = 100,
               max_tracks: int | None = None, max_seconds: float = 30.0, max_vectors: int = 1_000_000,
               seed: int = 0, overwrite: bool = False, log=print) -> dict:
    """Fit the semantic k-means on the audio under ``folder`` and save its centers into ``token_system``."""
    start = time.time()
    refuse_refit(token_system, "semantic_kmeans", overwrite)
    system = TokenSystem.load(writable_root(token_system))
    paths, sample = _select(folder, frames_per_track, max_vectors, max_tracks, seed, log)
    data = extract(paths, system, SEMANTIC, plan, max_seconds=max_seconds, frames_per_track=frames_per_track,
                   max_vectors=max_vectors, seed=seed, log=log)
    k = system.config.hubert_kmeans_cfg.codebook_size
    log(f"fitting MiniBatchKMeans k={k} on {len(data.vectors)} feature frames")
    centers = fit_minibatch_kmeans(data.vectors, k, seed=seed)
    system.set_kmeans(centers)
    system.save()
    tokens = system.semantic.tokens_of_features(torch.from_numpy(data.vectors))
    used = int(np.unique(tokens).size)
    report = {"kind": "semantic_kmeans", "fingerprint": system.fingerprint, "tracks": data.tracks,
              "seconds_of_audio": round(data.seconds, 1), "frames": int(len(data.vectors)), "clusters_used": used,
              "sample": sample, "failed": data.errors, "wall_seconds": round(time.time() - start, 1)}
    _write_report(system, "fit_kmeans", report)
    log(f"k-means fit: {used}/{k} clusters used on the fit frames; token system now {system.fingerprint[:12]}")
    _log_errors(data.errors, log)
    return report


def fit_local(system: TokenSystem, paths: list[str], *, rvq_steps: int = 20, kmeans_n_init: int = 1) -> TokenSystem:
    """Fit the RVQ and the k-means of ``system`` on whole files in this process, without Ray, and save it: for
    a handful of files (tests, benchmarks). ``fit_rvq`` / ``fit_kmeans`` are the jobs for real corpora."""
    def wave(path: str, kind: str, target_rate: int) -> np.ndarray:
        return _decode_row({"path": path}, kind, target_rate, max_seconds=None)["audio"]

    emb = torch.cat([system.clap.audio_embeddings(wave(p, CLAP, system.clap.sample_rate)) for p in paths])
    rvq = new_rvq(system.config)
    rvq.fit(emb, steps=rvq_steps, batch_size=64)
    system.set_rvq(rvq)
    feats = np.concatenate([system.semantic.features(wave(p, SEMANTIC, system.semantic.sample_rate)).numpy()
                            for p in paths])
    system.set_kmeans(fit_minibatch_kmeans(feats, system.config.hubert_kmeans_cfg.codebook_size,
                                           n_init=kmeans_n_init))
    system.save()
    return system


def _log_errors(errors: list[dict], log) -> None:
    if errors:
        log(f"{len(errors)} file(s) could not be used (listed in the report):")
        for e in errors[:20]:
            log(f"  {e['path']}: {e['message']}")
