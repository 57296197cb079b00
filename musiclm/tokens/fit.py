"""Fitting the token system's quantizers from a folder of audio, with Ray Data.

decode (CPU tasks, per-file errors become rows) -> encoder actor pool (CLAP audio tower, the semantic encoder,
or both; GPU when the cluster has one) -> vectors streamed back to the driver -> fit (RVQ with EMA,
MiniBatchKMeans) -> written into the token-system directory with its new fingerprint, plus a report JSON each.
``fit_quantizers`` fits both in one pass: each track decoded once, its vectors for both from one actor.

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


def _decode_row(row: dict, rates: dict[str, int], max_seconds: float | None) -> dict:
    """The first ``max_seconds`` of a file as each encoder of ``rates`` (kind -> its sample rate) reads them
    (``tokenizer_input``: open-musiclm's waveform handling, as in preprocessing): ``audio_<kind>`` each."""
    try:
        audio, rate = decode_audio(row["path"], max_seconds=max_seconds)
        return {"path": row["path"], "error": "",
                **{f"audio_{kind}": tokenizer_input(kind, audio, rate, r) for kind, r in rates.items()}}
    except AudioDecodeError as e:
        return {"path": row["path"], "error": e.reason, **{f"audio_{kind}": np.zeros(0, np.float32) for kind in rates}}


def _rate(system: TokenSystem, kind: str) -> int:
    return system.clap.sample_rate if kind == CLAP else system.semantic.sample_rate


class _Encoder:
    """Ray Data actor: loads the token system once, turns each track's decoded audio into the vectors of each of
    ``kinds`` (one array per track and kind)."""

    def __init__(self, token_system: str, kinds: list[str], device: str, threads: int, frames_per_track: int):
        torch.set_num_threads(threads)
        self.system = TokenSystem.load(token_system, device=device)
        self.kinds, self.frames_per_track = list(kinds), frames_per_track

    def _vectors(self, kind: str, path: str, audio: np.ndarray) -> np.ndarray:
        if kind == CLAP:
            return self.system.clap.audio_embeddings(audio).numpy()
        feats = self.system.semantic.features(audio).numpy()
        if len(feats) > self.frames_per_track:  # a fixed random subset per track, same on every run
            rng = np.random.default_rng(int(hashlib.sha1(path.encode()).hexdigest()[:8], 16))
            feats = feats[np.sort(rng.choice(len(feats), self.frames_per_track, replace=False))]
        return feats

    def __call__(self, batch: dict) -> dict:
        out = {"path": [], "error": [], **{f"{x}_{k}": [] for k in self.kinds for x in ("seconds", "vectors")}}
        for i, path in enumerate(batch["path"]):
            error, rows = batch["error"][i], {}
            for kind in self.kinds:
                audio, vectors = np.asarray(batch[f"audio_{kind}"][i], dtype=np.float32), np.zeros(0, np.float32)
                if not error:
                    try:
                        vectors = self._vectors(kind, str(path), audio).astype(np.float32).reshape(-1)
                    except Exception as e:  # one bad track must not end the job: it becomes an error row
                        error = f"{kind} encoder failed: {type(e).__name__}: {e}"
                rows[kind] = (len(audio) / _rate(self.system, kind), vectors)
            out["path"].append(str(path))
            out["error"].append(error)
            for kind, (seconds, vectors) in rows.items():
                out[f"seconds_{kind}"].append(seconds)
                out[f"vectors_{kind}"].append(vectors if not error else np.zeros(0, np.float32))
        return out


def extract(paths: list[str], system: TokenSystem, kinds: list[str], plan: ActorPlan, *, max_seconds: float = 30.0,
            frames_per_track: int = 100, max_vectors: dict[str, int | None] | None = None, seed: int = 0,
            log=print) -> dict[str, Extracted]:
    """Run the decode -> encoder pipeline on Ray Data for each of ``kinds`` (CLAP, SEMANTIC) in one pass and gather
    the vectors on the driver; at most ``max_vectors[kind]`` of each, a uniform seeded subset."""
    import ray

    dims = {CLAP: system.config.clap_rvq_cfg.dim, SEMANTIC: system.semantic.hubert.config.hidden_size}
    log(f"extracting {' and '.join(kinds)} vectors from {len(paths)} files: {plan.describe()}")
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths), 64)))
    ds = ds.map(_decode_row, fn_kwargs={"rates": {k: _rate(system, k) for k in kinds}, "max_seconds": max_seconds},
                num_cpus=plan.decode_cpus)
    ds = ds.map_batches(_Encoder, batch_size=4,
                        compute=ray.data.ActorPoolStrategy(size=plan.actors),
                        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                        fn_constructor_kwargs={"token_system": str(system.root), "kinds": list(kinds),
                                               "device": plan.device, "threads": plan.threads_per_actor,
                                               "frames_per_track": frames_per_track})
    chunks: dict[str, list] = {k: [] for k in kinds}
    seconds = dict.fromkeys(kinds, 0.0)
    errors, tracks = [], 0
    for row in ds.iter_rows():
        if row["error"]:
            errors.append({"path": row["path"], "message": row["error"]})
            continue
        tracks += 1
        for k in kinds:
            seconds[k] += float(row[f"seconds_{k}"])
            chunks[k].append(np.asarray(row[f"vectors_{k}"], dtype=np.float32).reshape(-1, dims[k]))
    if not tracks:
        raise TokenSystemError(f"no {' or '.join(kinds)} vectors could be extracted: all {len(paths)} files failed "
                               f"({errors[0]['message'] if errors else 'no files'})")
    out = {}
    for k in kinds:
        vectors, cap = np.concatenate(chunks[k]), (max_vectors or {}).get(k)
        if cap and len(vectors) > cap:  # a uniform subset, not the first tracks to arrive
            vectors = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), cap, replace=False))]
        out[k] = Extracted(vectors, tracks, seconds[k], [{**e, "stage": f"fit_{k}"} for e in errors])
    return out


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


def _clap_windows(system: TokenSystem, max_seconds: float) -> int:
    """CLAP windows in the first ``max_seconds`` of a track: the RVQ's vectors per track."""
    c = system.config.clap_rvq_cfg
    return max(1, int((max_seconds - system.config.clap_audio_length_seconds) / c.hop_seconds) + 1)


def fit_rvq(token_system: str | Path, folder: str | Path, plan: ActorPlan, *, steps: int = 1000,
            batch_size: int = 2048, max_tracks: int | None = None, max_seconds: float = 30.0,
            max_vectors: int = 200_000, seed: int = 0, overwrite: bool = False, log=print) -> dict:
    """Fit the CLAP RVQ on the audio under ``folder`` and save it into ``token_system``."""
    start = time.time()
    refuse_refit(token_system, "clap_rvq", overwrite)
    system = TokenSystem.load(writable_root(token_system))
    paths, sample = _select(folder, _clap_windows(system, max_seconds), max_vectors, max_tracks, seed, log)
    data = extract(paths, system, [CLAP], plan, max_seconds=max_seconds, max_vectors={CLAP: max_vectors}, seed=seed,
                   log=log)[CLAP]
    return _fit_rvq_on(system, data, sample, steps, batch_size, seed, start, log)


def _fit_rvq_on(system: TokenSystem, data: Extracted, sample: dict, steps: int, batch_size: int, seed: int,
                start: float, log) -> dict:
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
    data = extract(paths, system, [SEMANTIC], plan, max_seconds=max_seconds, frames_per_track=frames_per_track,
                   max_vectors={SEMANTIC: max_vectors}, seed=seed, log=log)[SEMANTIC]
    return _fit_kmeans_on(system, data, sample, seed, start, log)


def _fit_kmeans_on(system: TokenSystem, data: Extracted, sample: dict, seed: int, start: float, log) -> dict:
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


def fit_quantizers(token_system: str | Path, folder: str | Path, plan: ActorPlan, *,
                   parts: tuple[str, ...] = ("clap_rvq", "semantic_kmeans"), rvq_steps: int = 1000,
                   rvq_batch_size: int = 2048, max_rvq_vectors: int = 200_000, frames_per_track: int = 100,
                   max_frames: int = 1_000_000, max_tracks: int | None = None, max_seconds: float = 30.0,
                   seed: int = 0, overwrite: bool = False, log=print) -> dict[str, dict]:
    """``fit_rvq`` and ``fit_kmeans`` (the ``parts`` named, keys of ``PARTS``) in one pass over the audio: each
    sampled track is decoded once and one actor gives its vectors for both (the sample is the larger of the two
    the jobs would draw, seeded as they seed it). The same fits, files and reports as the two jobs; one start of
    the encoder actors instead of two. Returns each part's report (none when ``parts`` is empty)."""
    if not parts:
        return {}
    start = time.time()
    for part in parts:
        refuse_refit(token_system, part, overwrite)
    system = TokenSystem.load(writable_root(token_system))
    kinds = {"clap_rvq": CLAP, "semantic_kmeans": SEMANTIC}
    needs = {CLAP: (_clap_windows(system, max_seconds), max_rvq_vectors), SEMANTIC: (frames_per_track, max_frames)}
    samples = [_select(folder, *needs[kinds[p]], max_tracks, seed, log=lambda m: None) for p in parts]
    paths, sample = max(samples, key=lambda s: len(s[0]))
    log(f"sampled {len(paths)} of {sample['files_in_folder']} files (seed {seed}) for "
        f"{' and '.join(PARTS[p] for p in parts)}")
    data = extract(paths, system, [kinds[p] for p in parts], plan, max_seconds=max_seconds,
                   frames_per_track=frames_per_track, max_vectors={k: needs[k][1] for k in needs}, seed=seed, log=log)
    def own(kind: str) -> dict:
        return {**sample, "vectors_per_track_expected": needs[kind][0]}

    reports = {}
    if "clap_rvq" in parts:
        reports["clap_rvq"] = _fit_rvq_on(system, data[CLAP], own(CLAP), rvq_steps, rvq_batch_size, seed, start, log)
    if "semantic_kmeans" in parts:
        reports["semantic_kmeans"] = _fit_kmeans_on(system, data[SEMANTIC], own(SEMANTIC), seed, start, log)
    return reports


def fit_local(system: TokenSystem, paths: list[str], *, rvq_steps: int = 20, kmeans_n_init: int = 1) -> TokenSystem:
    """Fit the RVQ and the k-means of ``system`` on whole files in this process, without Ray, and save it: for
    a handful of files (tests, benchmarks). ``fit_rvq`` / ``fit_kmeans`` are the jobs for real corpora."""
    def wave(path: str, kind: str, target_rate: int) -> np.ndarray:
        return _decode_row({"path": path}, {kind: target_rate}, max_seconds=None)[f"audio_{kind}"]

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
