"""FMA metadata: ``fma_metadata/tracks.csv`` (two header rows: section, field; then a ``track_id`` row) and
``genres.csv``; captions built from a track's genres, title and tags; the filters a user selects tracks by.

Read with the ``csv`` module (no pandas): the 250 MB ``tracks.csv`` of FMA Large parses in seconds.
"""
from __future__ import annotations

import ast
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

SUBSETS = ("small", "medium", "large")  # FMA's nested subsets: small is inside medium, medium inside large
EXPERIMENTAL_GENRE = 38  # open-musiclm's --filter_fma rule drops little-heard "Experimental" tracks


@dataclass
class FmaTrack:
    track_id: int
    title: str = ""
    artist: str = ""
    subset: str = ""
    duration: float = 0.0
    genre_top: str = ""
    genres_all: list[int] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    listens: int | None = None
    favorites: int | None = None

    @property
    def id(self) -> str:
        return f"{self.track_id:06d}"


class FmaMetadataError(ValueError):
    pass


def _literal_list(text: str) -> list:
    text = (text or "").strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)  # literal_eval only parses literals; it never runs code
    except (ValueError, SyntaxError):
        return []
    return list(value) if isinstance(value, (list, tuple)) else []


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def read_tracks(path: str | Path) -> dict[int, FmaTrack]:
    """Parse FMA's ``tracks.csv``: columns are addressed by (section, field), e.g. ("track", "genres_all")."""
    path = Path(path)
    if not path.is_file():
        raise FmaMetadataError(f"FMA metadata file {path} not found: download fma_metadata.zip and pass its folder "
                               f"with --metadata")
    csv.field_size_limit(sys.maxsize)  # FMA's free-text "information" fields can be long
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            sections, fields = next(reader), next(reader)
        except StopIteration:
            raise FmaMetadataError(f"{path} is empty; expected FMA's tracks.csv") from None
        columns = {(s.strip(), n.strip()): i for i, (s, n) in enumerate(zip(sections, fields))}
        need = [("track", "genres_all"), ("track", "title")]
        missing = [f"{s}.{n}" for s, n in need if (s, n) not in columns]
        if missing:
            raise FmaMetadataError(f"{path} does not look like FMA's tracks.csv (two header rows of section and "
                                   f"field names): no column {', '.join(missing)}")

        def get(row: list[str], section: str, name: str) -> str:
            i = columns.get((section, name))
            return row[i] if i is not None and i < len(row) else ""

        tracks: dict[int, FmaTrack] = {}
        for row in reader:
            if not row or not row[0].strip().isdigit():  # the "track_id,,,," index row and blank lines
                continue
            tid = int(row[0])
            tracks[tid] = FmaTrack(
                track_id=tid, title=get(row, "track", "title").strip(), artist=get(row, "artist", "name").strip(),
                subset=get(row, "set", "subset").strip(), duration=float(_int_or_none(get(row, "track", "duration")) or 0),
                genre_top=get(row, "track", "genre_top").strip(),
                genres_all=[int(g) for g in _literal_list(get(row, "track", "genres_all")) if str(g).isdigit()],
                tags=[str(t).strip() for t in _literal_list(get(row, "track", "tags")) if str(t).strip()],
                listens=_int_or_none(get(row, "track", "listens")),
                favorites=_int_or_none(get(row, "track", "favorites")))
    return tracks


def read_genres(path: str | Path) -> dict[int, str]:
    """``genres.csv``: genre id -> title."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {int(r["genre_id"]): r["title"].strip() for r in csv.DictReader(f) if r.get("genre_id", "").isdigit()}


def caption(track: FmaTrack, genres: dict[int, str]) -> str:
    """'Rock, Punk music, "Title", tagged lo-fi, garage' from the track's genres, title and tags."""
    names = [track.genre_top] if track.genre_top else []
    for gid in track.genres_all:
        name = genres.get(gid, "")
        if name and name not in names:
            names.append(name)
    text = f"{', '.join(names)} music" if names else "music"
    if track.title:
        text += f', "{track.title}"'
    if track.tags:
        text += ", tagged " + ", ".join(track.tags)
    return text


def in_subset(track: FmaTrack, subset: str) -> bool:
    """Whether ``track`` belongs to FMA ``subset`` (nested: small is inside medium, medium inside large);
    "full" holds every track."""
    if subset == "full":
        return True
    return track.subset in SUBSETS and SUBSETS.index(track.subset) <= SUBSETS.index(subset)


@dataclass
class FmaFilter:
    """Which tracks to keep. ``subset`` keeps the tracks of that FMA subset (small is inside medium, medium
    inside large); ``genres`` keeps tracks with any of these genres (ids or titles, any level);
    ``min_duration`` uses the metadata's duration; ``filter_fma`` is open-musiclm's rule."""

    subset: str | None = None
    genres: list[str] = field(default_factory=list)
    min_duration: float | None = None
    filter_fma: bool = False

    def __post_init__(self):
        if self.subset is not None and self.subset not in SUBSETS:
            raise ValueError(f"FMA subset {self.subset!r} is not one of {', '.join(SUBSETS)}")

    def active(self) -> bool:
        return bool(self.subset or self.genres or self.min_duration or self.filter_fma)

    def reason_to_drop(self, track: FmaTrack, genre_ids: set[int]) -> str | None:
        """None to keep the track, else the name of the filter that drops it."""
        if self.subset and not in_subset(track, self.subset):
            return "subset"
        if genre_ids and not genre_ids.intersection(track.genres_all):
            return "genre"
        if self.min_duration and track.duration < self.min_duration:
            return "min_duration"
        if self.filter_fma and is_filtered_by_open_musiclm(track):
            return "filter_fma"
        return None

    def genre_ids(self, genres: dict[int, str]) -> set[int]:
        by_title = {name.lower(): gid for gid, name in genres.items()}
        out = set()
        for g in self.genres:
            if str(g).isdigit():
                out.add(int(g))
            elif str(g).lower() in by_title:
                out.add(by_title[str(g).lower()])
            else:
                raise ValueError(f"genre {g!r} is not in genres.csv (give a genre id or one of its titles, "
                                 f"e.g. {', '.join(sorted(genres.values())[:5])})")
        return out


def is_filtered_by_open_musiclm(track: FmaTrack) -> bool:
    """open-musiclm's ``--filter_fma``: drop Experimental tracks with at most 1,000 listens or 5 favorites."""
    if EXPERIMENTAL_GENRE not in track.genres_all:
        return False
    if track.listens is None or track.favorites is None:
        raise FmaMetadataError(f"filter_fma needs the track.listens and track.favorites columns of tracks.csv "
                               f"(track {track.track_id} has none)")
    return track.listens <= 1000 or track.favorites <= 5
