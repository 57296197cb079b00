"""The driver's own work on an FMA-Large-sized corpus: listing, the done-set on resume, the manifest.

Generates an FMA layout of 106,574 tracks (``fma_metadata/tracks.csv`` in FMA's format with its 52 columns'
worth of text per row, and an empty ``fma_large/NNN/NNNNNN.mp3`` per track: listing never opens them) and a
token dataset of 100,000 rows on disk (real row schema, 30 s of tokens per row), then measures each step in a
fresh process (wall seconds and peak resident memory, VmHWM):

  listing   open_source(fma_large, subset large): scan the folders, parse tracks.csv, match, find the missing
  resume    prepare(...) on the dataset: read every shard's ids (the done-set) and work out what is pending,
            two ways: 128-row shards vs 1,024-row shards (``rows_per_shard``), to show what shard size costs a
            resume
  manifest  write_manifest with the counts of the 100,000 rows

Goal (issue 16): each under 60 s and 2 GiB.
    python benchmarks/fma_driver.py [--tracks 106574 --rows 100000 --keep DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GENRES = [(12, "Rock", 0), (15, "Electronic", 0), (21, "Hip-Hop", 0), (25, "Punk", 12), (38, "Experimental", 0)]
COLUMNS = [("album", "comments"), ("album", "date_created"), ("album", "information"), ("album", "title"),
           ("artist", "bio"), ("artist", "name"), ("set", "split"), ("set", "subset"), ("track", "bit_rate"),
           ("track", "duration"), ("track", "favorites"), ("track", "genre_top"), ("track", "genres"),
           ("track", "genres_all"), ("track", "information"), ("track", "listens"), ("track", "tags"),
           ("track", "title")]


def make_corpus(root: Path, tracks: int) -> None:
    rng = np.random.default_rng(0)
    meta = root / "fma_metadata"
    meta.mkdir(parents=True)
    ids = np.sort(rng.choice(160_000, tracks, replace=False)) + 2
    with open(meta / "tracks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([""] + [c[0] for c in COLUMNS])
        w.writerow([""] + [c[1] for c in COLUMNS])
        w.writerow(["track_id"] + [""] * len(COLUMNS))
        for i, tid in enumerate(ids):
            gid, title, parent = GENRES[i % len(GENRES)]
            subset = "small" if i % 13 == 0 else "medium" if i % 5 == 0 else "large"
            w.writerow([tid, 0, "2009-01-05", "<p>" + "album notes " * 20 + "</p>", f"Album {tid % 997}",
                        "<p>" + "artist biography " * 30 + "</p>", f"Artist {tid % 4001}", "training", subset,
                        256000, 30 + i % 300, i % 40, title, str([gid]), str([gid] + ([parent] if parent else [])),
                        "", 100 + i % 9000, str(["tag a", "tag b"][: i % 3]), f"Track title {tid}"])
    with open(meta / "genres.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["genre_id", "#tracks", "parent", "title", "top_level"])
        for gid, title, parent in GENRES:
            w.writerow([gid, 1, parent, title, parent or gid])
    audio = root / "fma_large"
    for tid in ids[:-10]:  # the last 10 listed tracks are missing on disk
        d = audio / f"{tid // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{tid:06d}.mp3").touch()


def make_dataset(root: Path, corpus: Path, rows: int, rows_per_shard: int) -> None:
    """A token dataset of ``rows`` rows (the first listed tracks) with a manifest prepare() accepts."""
    import pyarrow as pa

    from musiclm.data import dataset as layout

    ids = sorted(p.stem for p in (corpus / "fma_large").rglob("*.mp3"))[:rows]
    rng = np.random.default_rng(1)
    tokens = {"clap": rng.integers(0, 1024, 21 * 12, dtype=np.uint16), "semantic": rng.integers(0, 1024, 1499, dtype=np.uint16),
              "coarse": rng.integers(0, 1024, 2250 * 3, dtype=np.uint16), "fine": rng.integers(0, 1024, 2250 * 5, dtype=np.uint16)}
    for start in range(0, len(ids), rows_per_shard):
        chunk = ids[start: start + rows_per_shard]
        n = len(chunk)
        cols = {"id": chunk, "track_id": chunk, "path": [f"{corpus}/fma_large/{i[:3]}/{i}.mp3" for i in chunk],
                "caption": ["Rock music, \"Track\""] * n, "split": ["train"] * n, "start_seconds": [0.0] * n,
                "audio_seconds": [30.0] * n, "seconds": [30] * n, "rows_in_track": [1] * n,
                **{c: [tokens[c]] * n for c in layout.TOKEN_COLUMNS}}
        layout.write_shard(root, "train", pa.table(cols, schema=layout.ROW_SCHEMA))


def measure(step: str, *args: str) -> dict:
    """Run ``step`` in a fresh interpreter: its wall seconds and peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_step(step: str, corpus: Path, data: Path, token_system: Path) -> dict:
    from musiclm.config import DataConfig
    from musiclm.data import dataset as layout
    from musiclm.data.preprocess import prepare
    from musiclm.data.sources import open_source

    start = time.perf_counter()
    result = {}
    if step == "listing":
        src = open_source(corpus / "fma_large", subset="large")
        result = {"tracks": len(src.tracks), "missing": sum(t.problem_kind == "missing" for t in src.tracks)}
    elif step == "resume":
        src = open_source(corpus / "fma_large", subset="large")
        t0 = time.perf_counter()
        job = prepare(src, token_system, data, DataConfig(), log=lambda m: None)
        result = {"done": len(job.scan.done_tracks), "pending": len(job.pending),
                  "prepare_seconds": round(time.perf_counter() - t0, 2),
                  "shards": len(layout.shard_files(data, "train"))}
    elif step == "manifest":
        scan = layout.scan(data)
        t0 = time.perf_counter()
        manifest = layout.read_manifest(data)
        layout.write_manifest(data, {**manifest, "counts": scan.counts()})
        result = {"write_seconds": round(time.perf_counter() - t0, 3)}
    return {"step": step, "seconds": round(time.perf_counter() - start, 2), "peak_gib": round(peak_rss_gib(), 3),
            **result}


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20  # kB -> GiB
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracks", type=int, default=106_574)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, *args.paths)))
        return
    from musiclm.audio import synth
    from musiclm.audio.io import list_audio_files
    from musiclm.config import DataConfig, model_preset
    from musiclm.data import dataset as layout
    from musiclm.data.preprocess import prepare
    from musiclm.data.sources import open_source
    from musiclm.tokens.fit import fit_local
    from musiclm.tokens.system import TokenSystem

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        corpus, ts = root / "corpus", root / "ts"
        t0 = time.perf_counter()
        make_corpus(corpus, args.tracks)
        synth.write_corpus(root / "fit", 2, seconds=11.0)  # a fitted tiny token system: prepare() checks it
        fit_local(TokenSystem.create(model_preset("tiny").token_system(), ts), list_audio_files(root / "fit"))
        print(f"corpus of {args.tracks} tracks and token system made in {time.perf_counter() - t0:.0f} s")
        results = {}
        for name, rows_per_shard in (("128-row shards", 128), ("1,024-row shards", 1024)):
            data = root / f"dataset-{rows_per_shard}"
            job = prepare(open_source(corpus / "fma_large", subset="large"), ts, data, DataConfig(),
                          log=lambda m: None)
            layout.write_manifest(data, {**job.manifest, "status": "in_progress"})
            make_dataset(data, corpus, args.rows, rows_per_shard)
            results[name] = data
        paths = lambda d: ["--paths", str(corpus), str(d), str(ts)]  # noqa: E731
        first = next(iter(results.values()))
        print(json.dumps(measure("listing", *paths(first))))
        for name, data in results.items():
            print(name, json.dumps(measure("resume", *paths(data))))
        print(json.dumps(measure("manifest", *paths(first))))


if __name__ == "__main__":
    main()
