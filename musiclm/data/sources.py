"""Where tracks come from: FMA (audio folder + its metadata), a plain folder of audio files with an optional
captions file (JSONL or CSV), or the synthetic set of ``musiclm synth``. Each gives a list of ``Track``
(stable id, absolute path, caption) that preprocessing turns into token rows.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..audio.io import scan_audio_files
from . import fma

KINDS = ("auto", "fma", "folder", "synth")
FMA_AUDIO_DIRS = ("fma_large", "fma_full", "fma_medium", "fma_small", "fma_synth")


@dataclass(frozen=True)
class Track:
    id: str
    path: str
    caption: str = ""
    # a track that is listed but cannot be read (kind: missing, not_a_file, broken_link): preprocessing writes
    # an error row for it with this reason instead of decoding
    problem_kind: str = ""
    problem: str = ""


@dataclass
class Source:
    kind: str
    root: str
    tracks: list[Track]
    skipped: dict[str, int] = field(default_factory=dict)  # filter or problem -> tracks left out
    settings: dict = field(default_factory=dict)  # what selected these tracks (recorded in the manifest)

    def describe(self) -> str:
        text = f"{self.kind} source {self.root}: {len(self.tracks)} tracks"
        problems = Counter(t.problem_kind for t in self.tracks if t.problem_kind)
        if problems:
            text += (" of which " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(problems.items()))
                     + " (each gets an error row)")
        if self.skipped:
            text += " (left out: " + ", ".join(f"{v} by {k}" for k, v in sorted(self.skipped.items())) + ")"
        return text


def open_source(path: str | Path, kind: str = "auto", *, captions: str | Path | None = None,
                metadata: str | Path | None = None, subset: str | None = None, genres: list[str] | None = None,
                min_duration: float | None = None, filter_fma: bool = False) -> Source:
    """List the tracks of a source. ``kind`` "auto" recognises the synthetic set (``captions.jsonl`` beside
    ``fma_synth/``), FMA (a ``fma_metadata/tracks.csv`` beside the audio folder), else a plain folder."""
    if kind not in KINDS:
        raise ValueError(f"source kind {kind!r} is not one of {', '.join(KINDS)}")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} does not exist or is not a directory")
    if kind == "auto":
        kind = _detect(root, metadata)
    filt = fma.FmaFilter(subset, list(genres or []), min_duration, filter_fma)
    if kind != "fma" and filt.active():
        raise ValueError(f"--subset, --genre, --min-duration and --filter-fma need FMA metadata, but {root} is a "
                         f"{kind} source (use --source-kind fma and --metadata DIR)")
    if kind == "fma":
        return fma_source(root, metadata, filt)
    if kind == "synth":
        return folder_source(root, captions or root / "captions.jsonl", kind="synth")
    return folder_source(root, captions)


def _detect(root: Path, metadata: str | Path | None) -> str:
    if (root / "captions.jsonl").is_file() and (root / "fma_synth").is_dir():
        return "synth"
    if metadata or _fma_layout(root) is not None:
        return "fma"
    return "folder"


def _fma_layout(root: Path) -> tuple[Path, Path] | None:
    """(audio folder, metadata folder) when ``root`` is an FMA audio folder with a sibling ``fma_metadata``,
    or a folder holding both."""
    if (root.parent / "fma_metadata" / "tracks.csv").is_file() and root.name.startswith("fma_"):
        return root, root.parent / "fma_metadata"
    if (root / "fma_metadata" / "tracks.csv").is_file():
        audio = [root / d for d in FMA_AUDIO_DIRS if (root / d).is_dir()]
        if len(audio) == 1:
            return audio[0], root / "fma_metadata"
    return None


def fma_source(root: Path, metadata: str | Path | None, filt: fma.FmaFilter) -> Source:
    layout = _fma_layout(root)
    audio_dir = layout[0] if layout and not metadata else root
    meta_dir = Path(metadata).expanduser().resolve() if metadata else layout[1] if layout else root.parent / "fma_metadata"
    tracks_meta = fma.read_tracks(meta_dir / "tracks.csv")
    genres = fma.read_genres(meta_dir / "genres.csv")
    genre_ids = filt.genre_ids(genres)
    files, problems = scan_audio_files(audio_dir)
    out, skipped, seen = [], Counter(), set()
    entries = [(path, "", "") for path in files] + list(problems)
    for path, problem_kind, problem in sorted(entries):
        stem = Path(path).stem
        meta = tracks_meta.get(int(stem)) if stem.isdigit() else None
        if meta is None:
            if filt.active():
                skipped["no_metadata"] += 1
                continue
            out.append(Track(stem, path, "", problem_kind, problem))
            continue
        drop = filt.reason_to_drop(meta, genre_ids)
        if drop:
            skipped[drop] += 1
            continue
        seen.add(meta.track_id)
        out.append(Track(meta.id, path, fma.caption(meta, genres), problem_kind, problem))
    expected = expected_subset(audio_dir, filt)
    if expected is not None:  # tracks the metadata lists for this folder that are not on disk at all
        for tid, meta in sorted(tracks_meta.items()):
            if tid in seen or not fma.in_subset(meta, expected) or filt.reason_to_drop(meta, genre_ids):
                continue
            path = audio_dir / f"{tid // 1000:03d}" / f"{tid:06d}.mp3"
            out.append(Track(meta.id, str(path), fma.caption(meta, genres), "missing",
                             f"listed in tracks.csv ({expected} subset) but not found at {path}"))
    _check_unique(out)
    settings = {"metadata": str(meta_dir), "subset": filt.subset, "genres": sorted(filt.genres),
                "min_duration": filt.min_duration, "filter_fma": filt.filter_fma}
    return Source("fma", str(audio_dir), out, dict(skipped), settings)


def expected_subset(audio_dir: Path, filt: fma.FmaFilter) -> str | None:
    """Which tracks of ``tracks.csv`` this audio folder should hold: the ``--subset`` asked for, else the one
    its name says (``fma_small``, ``fma_medium``, ``fma_large``; ``fma_full`` and the synthetic set hold every
    listed track: "full"); None for a folder named otherwise (nothing can be said to be missing)."""
    if filt.subset:
        return filt.subset
    name = audio_dir.name
    if name in ("fma_full", "fma_synth"):
        return "full"
    return name[len("fma_"):] if name.startswith("fma_") and name[len("fma_"):] in fma.SUBSETS else None


def folder_source(root: Path, captions: str | Path | None = None, kind: str = "folder") -> Source:
    """Every audio file under ``root``; id = the path relative to ``root`` without its extension, unless the
    captions file gives one. Captions: JSONL lines or CSV rows with ``path`` (relative to ``root`` or absolute)
    or ``id``, and ``caption``."""
    entries = _read_captions(Path(captions)) if captions else []
    by_path = {str((root / e["path"]).resolve()): e for e in entries if e.get("path")}
    by_id = {str(e["id"]): e for e in entries if e.get("id")}
    out = []
    files, problems = scan_audio_files(root)
    for path, problem_kind, problem in sorted([(path, "", "") for path in files] + list(problems)):
        rel_id = Path(path).relative_to(root).with_suffix("").as_posix()
        entry = by_path.get(str(Path(path).resolve())) or by_id.get(rel_id) or by_id.get(Path(path).stem) or {}
        out.append(Track(str(entry.get("id") or rel_id), path, str(entry.get("caption", "")), problem_kind, problem))
    _check_unique(out)
    matched = sum(1 for t in out if t.caption)
    skipped = {"caption_without_file": max(0, len(entries) - matched)} if entries and len(entries) > matched else {}
    return Source(kind, str(root), out, skipped, {"captions": str(captions) if captions else None})


def _read_captions(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"captions file {path} line {n} is not JSON: {e.msg}") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "caption" not in row or not (row.get("path") or row.get("id")):
            raise ValueError(f"captions file {path} entry {n} needs a 'caption' and a 'path' or 'id' field")
    return rows


def _check_unique(tracks: list[Track]) -> None:
    seen: dict[str, str] = {}
    for t in tracks:
        if t.id in seen:
            raise ValueError(f"two files have the same track id {t.id!r}: {seen[t.id]} and {t.path}; "
                             f"rename one of them")
        seen[t.id] = t.path
