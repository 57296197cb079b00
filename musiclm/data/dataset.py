"""The token dataset on disk.

    OUT/manifest.json          format, schema version, token-system fingerprint, source, settings, windows,
                               counts, status ("in_progress" until a run finishes)
    OUT/train/part-*.parquet   one row per track or crop (ROW_SCHEMA)
    OUT/valid/part-*.parquet   the same, for the tracks whose id hashes into the validation fraction
    OUT/errors/part-*.parquet  one row per track that could not be tokenized (ERROR_SCHEMA)

Token arrays are uint16 lists flattened time-major with the codebook fastest: ``clap`` n_windows x 12,
``semantic`` T, ``coarse`` T' x 3, ``fine`` T' x 5. Every shard is written to a temporary name and renamed,
so a shard on disk is always whole; its name is a hash of its row ids, so writing it again (a retried task)
replaces it with the same rows. Resuming reads the ids already on disk and skips those tracks.

OUT may be a local folder or an object-store URI (``s3://bucket/datasets/fma``): every read and write goes
through ``musiclm.infra.storage``, which keeps the same guarantee there (a shard is uploaded whole in one request, so
it exists whole or not at all; no temporary objects).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ..infra import storage

FORMAT = "musiclm-token-dataset"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")
ERRORS = "errors"
TOKEN_COLUMNS = ("clap", "semantic", "coarse", "fine")

ROW_SCHEMA = pa.schema([
    ("id", pa.string()),  # the track id, or "track_id#k" for crop k
    ("track_id", pa.string()),
    ("path", pa.string()),
    ("caption", pa.string()),
    ("split", pa.string()),
    ("start_seconds", pa.float32()),  # where the clip starts in the track
    ("audio_seconds", pa.float32()),  # audio in the clip before padding
    ("seconds", pa.int32()),  # tokenized length: whole seconds after padding
    ("rows_in_track", pa.int16()),  # how many rows this track has (resume checks a track is whole)
    *[(c, pa.list_(pa.uint16())) for c in TOKEN_COLUMNS],
])
ERROR_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("track_id", pa.string()),
    ("path", pa.string()),
    ("stage", pa.string()),  # decode | tokenize
    ("kind", pa.string()),  # short category: unreadable, empty, truncated, not_audio, too_short, ...
    ("message", pa.string()),
])


class DatasetError(ValueError):
    """The output directory cannot take this run (another token system, other settings, not a dataset)."""


def shard_files(root: str | Path, part: str) -> list[str]:
    """The split's (or errors') shards, as locations, in name order."""
    return storage.list_files(storage.join(root, part), "part-*.parquet")


def read_manifest(root: str | Path) -> dict | None:
    path = storage.join(root, MANIFEST)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not text (a binary file?); restore the dataset's manifest or use a new "
                           f"output folder") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e.msg}); restore it or use a new output folder") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        data = data if isinstance(data, dict) else {}
        raise DatasetError(f"{path} is not a token-dataset manifest (format {data.get('format')!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{path} has schema version {data.get('schema_version')}; this version reads "
                           f"{SCHEMA_VERSION}. Re-run preprocessing into a new folder.")
    return data


def write_manifest(root: str | Path, data: dict) -> None:
    data = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **data, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    storage.write_text(storage.join(root, MANIFEST), json.dumps(data, indent=2) + "\n")


def check_compatible(root: str | Path, existing: dict, wanted: dict) -> None:
    """Refuse to add rows made another way to an existing dataset, naming both sides."""
    if existing.get("fingerprint") != wanted["fingerprint"]:
        raise DatasetError(
            f"{root} holds tokens of token system {existing.get('fingerprint', '?')[:12]} "
            f"({existing.get('token_system', '?')}), but --token-system {wanted['token_system']} has fingerprint "
            f"{wanted['fingerprint'][:12]}. Tokens of two systems cannot share a dataset: write to a new --out, "
            f"or use the token system that made it.")
    diffs = [f"{section}.{k}: dataset has {existing.get(section, {}).get(k)!r}, this run {v!r}"
             for section in ("settings", "source") for k, v in wanted[section].items()
             if existing.get(section, {}).get(k) != v]
    # what the CLAP tokens are made of (a dataset from before the setting was recorded made them from audio)
    made, making = (m.get("tokens", {}).get("clap", {}).get("from", "audio") for m in (existing, wanted))
    if made != making:
        diffs.append(f"tokens.clap.from: dataset has {made!r}, this run {making!r}")
    if diffs:
        raise DatasetError(f"{root} was made with other settings; resuming would mix two kinds of rows: "
                           + "; ".join(diffs) + ". Run with the same settings, or write to a new --out.")


@dataclass
class Scan:
    """What is on disk already."""

    done_tracks: set[str] = field(default_factory=set)  # every row written, or an error row
    partial_rows: set[str] = field(default_factory=set)  # row ids of tracks with only some rows written
    rows: Counter = field(default_factory=Counter)  # split -> rows
    tracks: Counter = field(default_factory=Counter)  # split -> tracks
    seconds: float = 0.0  # tokenized seconds over all rows
    errors: Counter = field(default_factory=Counter)  # kind -> tracks

    def counts(self) -> dict:
        return {"rows": dict(self.rows), "tracks": dict(self.tracks), "errors": sum(self.errors.values()),
                "errors_by_kind": dict(self.errors), "seconds": round(self.seconds, 1)}


def scan(root: str | Path) -> Scan:
    out = Scan()
    rows_of: dict[str, list[str]] = {}
    expected: dict[str, int] = {}
    for split in SPLITS:
        tracks_in_split: set[str] = set()  # a track's crops can span shards: count it once
        for f in shard_files(root, split):
            t = storage.read_parquet(f, columns=["id", "track_id", "rows_in_track", "seconds"])
            ids, tracks = t["id"].to_pylist(), t["track_id"].to_pylist()
            for rid, tid, n in zip(ids, tracks, t["rows_in_track"].to_pylist()):
                rows_of.setdefault(tid, []).append(rid)
                expected[tid] = n
            out.rows[split] += t.num_rows
            tracks_in_split.update(tracks)
            out.seconds += float(sum(t["seconds"].to_pylist()))
        out.tracks[split] += len(tracks_in_split)
    for tid, rids in rows_of.items():
        if len(set(rids)) >= expected[tid]:
            out.done_tracks.add(tid)
        else:
            out.partial_rows.update(rids)
    for f in shard_files(root, ERRORS):
        t = storage.read_parquet(f, columns=["track_id", "kind"])
        out.done_tracks.update(t["track_id"].to_pylist())
        out.errors.update(t["kind"].to_pylist())
    return out


def write_shard(root: str | Path, part: str, table: pa.Table) -> str:
    """Write ``table`` as OUT/part/part-<hash of its ids>.parquet, atomically; returns its location."""
    digest = hashlib.sha256("\n".join(sorted(table["id"].to_pylist())).encode()).hexdigest()[:20]
    path = storage.join(root, part, f"part-{digest}.parquet")
    storage.write_bytes(path, storage.parquet_bytes(table, compression="zstd"))
    return path


def remove_stale_temporaries(root: str | Path) -> int:
    """Temporary files left by a run that was killed while writing (local folders only: see ``storage``)."""
    return sum(storage.remove_temporaries(storage.join(root, part)) for part in (*SPLITS, ERRORS, "."))
