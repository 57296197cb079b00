"""Sources: an FMA-layout fixture with a real-format tracks.csv, a plain folder with captions, the synth set."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from musiclm.audio.io import list_audio_files
from musiclm.data.sources import open_source

COLUMNS = [("album", "title"), ("artist", "name"), ("set", "split"), ("set", "subset"), ("track", "duration"),
           ("track", "favorites"), ("track", "genre_top"), ("track", "genres"), ("track", "genres_all"),
           ("track", "information"), ("track", "listens"), ("track", "tags"), ("track", "title")]
TRACKS = {  # id: subset, duration, favorites, genre_top, genres, genres_all, listens, tags, title
    2: ("small", 168, 2, "Hip-Hop", [21], [21], 1293, [], "Food"),
    5: ("medium", 206, 6, "Rock", [25], [12, 25], 50, ["garage", "lo-fi"], "This World"),
    10: ("large", 161, 1, "Experimental", [38], [38], 300, [], "Drone\nPiece"),  # newline in a quoted field
}
GENRES = [(12, "Rock", 0), (21, "Hip-Hop", 0), (25, "Punk", 12), (38, "Experimental", 0)]


@pytest.fixture()
def fma_root(tmp_path, corpus):
    mp3 = list_audio_files(corpus)[0]
    for tid in (2, 5, 10, 99):  # 99 has no row in tracks.csv
        dst = tmp_path / "fma_large" / f"{tid // 1000:03d}" / f"{tid:06d}.mp3"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mp3, dst)
    meta = tmp_path / "fma_metadata"
    meta.mkdir()
    with open(meta / "tracks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([""] + [c[0] for c in COLUMNS])
        w.writerow([""] + [c[1] for c in COLUMNS])
        w.writerow(["track_id"] + [""] * len(COLUMNS))
        for tid, (subset, dur, fav, top, g, g_all, listens, tags, title) in TRACKS.items():
            w.writerow([tid, "An album", "An artist", "training", subset, dur, fav, top, str(g), str(g_all),
                        "<p>about</p>", listens, str(tags), title])
    with open(meta / "genres.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["genre_id", "#tracks", "parent", "title", "top_level"])
        for gid, title, parent in GENRES:
            w.writerow([gid, 1, parent, title, parent or gid])
    return tmp_path


def test_fma_ids_and_captions(fma_root):
    src = open_source(fma_root / "fma_large")
    assert src.kind == "fma"
    by_id = {t.id: t for t in src.tracks}
    assert sorted(by_id) == ["000002", "000005", "000010", "000099"]
    assert by_id["000002"].caption == 'Hip-Hop music, "Food"'
    assert by_id["000005"].caption == 'Rock, Punk music, "This World", tagged garage, lo-fi'
    assert by_id["000010"].caption == 'Experimental music, "Drone\nPiece"'
    assert by_id["000099"].caption == ""
    assert by_id["000005"].path.endswith("fma_large/000/000005.mp3")
    assert open_source(fma_root).tracks == src.tracks  # the folder holding fma_large and fma_metadata works too


def test_fma_filters(fma_root):
    def ids(**kw):
        return sorted(t.id for t in open_source(fma_root / "fma_large", **kw).tracks)

    assert ids(subset="small") == ["000002"]
    assert ids(subset="medium") == ["000002", "000005"]  # small is inside medium
    assert ids(genres=["Rock"]) == ["000005"]
    assert ids(genres=["25", "21"]) == ["000002", "000005"]
    assert ids(min_duration=165) == ["000002", "000005"]
    assert ids(filter_fma=True) == ["000002", "000005"]  # Experimental with 300 listens is dropped
    src = open_source(fma_root / "fma_large", filter_fma=True)
    assert src.skipped == {"filter_fma": 1, "no_metadata": 1}
    with pytest.raises(ValueError, match="genre 'Polka' is not in genres.csv"):
        ids(genres=["Polka"])


def test_folder_with_captions_and_synth(tmp_path, corpus):
    folder = tmp_path / "music"
    paths = list_audio_files(corpus)[:2]
    (folder / "a").mkdir(parents=True)
    shutil.copy(paths[0], folder / "a" / "one.mp3")
    shutil.copy(paths[1], folder / "two.mp3")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"path": "a/one.mp3", "caption": "first"}) + "\n")
    src = open_source(folder, captions=tmp_path / "caps.jsonl")
    assert src.kind == "folder"
    assert [(t.id, t.caption) for t in src.tracks] == [("a/one", "first"), ("two", "")]
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "caption"], ["two", "second"]])
    assert [t.caption for t in open_source(folder, captions=tmp_path / "caps.csv").tracks] == ["", "second"]

    synth = open_source(corpus)
    assert synth.kind == "synth" and len(synth.tracks) == 6
    first = json.loads((corpus / "captions.jsonl").read_text().splitlines()[0])
    assert (synth.tracks[0].id, synth.tracks[0].caption) == (first["id"], first["caption"])
    with pytest.raises(ValueError, match="need FMA metadata"):
        open_source(folder, subset="small")


def test_listed_tracks_that_cannot_be_read_are_named_not_dropped(fma_root, tiny_system_dir, tmp_path):
    """A track tracks.csv lists for this folder's subset but the disk lacks, a directory named like a track and
    a symbolic link to nothing each stay in the listing with their reason, and become error rows."""
    from musiclm.config import DataConfig
    from musiclm.data.preprocess import decode_local, prepare

    with open(fma_root / "fma_metadata" / "tracks.csv", "a", newline="") as f:
        w = csv.writer(f)
        for tid, subset in ((11, "large"), (12, "small"), (13, "large"), (14, "large")):
            w.writerow([tid, "An album", "An artist", "training", subset, 30, 1, "Rock", "[12]", "[12]", "", 5,
                        "[]", f"Track {tid}"])
    audio = fma_root / "fma_large" / "000"
    (audio / "000013.mp3").mkdir()
    (audio / "000014.mp3").symlink_to(fma_root / "nowhere.mp3")
    src = open_source(fma_root / "fma_large")
    problems = {t.id: (t.problem_kind, t.problem) for t in src.tracks if t.problem_kind}
    assert {k: v[0] for k, v in problems.items()} == {
        "000011": "missing", "000012": "missing", "000013": "not_a_file", "000014": "broken_link"}
    assert "listed in tracks.csv (large subset) but not found at" in problems["000011"][1]
    assert "nowhere.mp3" in problems["000014"][1]
    assert "8 tracks of which 1 broken link, 2 missing, 1 not a file (each gets an error row)" in src.describe()
    # a folder of the small subset expects only its own tracks; a custom-named folder expects none
    assert {t.id for t in open_source(fma_root / "fma_large", subset="small").tracks if t.problem_kind} == {"000012"}
    shutil.copytree(fma_root / "fma_large", fma_root / "my_audio", symlinks=True)
    mine = open_source(fma_root / "my_audio", "fma", metadata=fma_root / "fma_metadata")
    assert {t.id: t.problem_kind for t in mine.tracks if t.problem_kind} == {"000013": "not_a_file",
                                                                             "000014": "broken_link"}

    job = prepare(src, tiny_system_dir, tmp_path / "ds", DataConfig(), log=lambda m: None)
    rows = {t.id: decode_local(job, t) for t in job.pending if t.problem_kind}
    for tid, (kind, reason) in problems.items():
        [row] = rows[tid]
        assert (row["stage"], row["kind"], row["message"]) == ("list", kind, reason)
