"""Synthetic music corpus: the demo and test set.

Each track is rendered from parameters drawn from a seeded generator: tempo, key and mode, a four-bar chord
progression, a melody on the scale, a bass line, a lead timbre (additive harmonics with their own decays)
and a drum pattern. The caption and an FMA-style genre are derived from the same parameters, so a model can
in principle learn the text-audio link. Output, in FMA's layout so the FMA source reads it too::

    OUT/fma_synth/000/000001.mp3 ...     44.1 kHz stereo MP3, like FMA
    OUT/fma_metadata/tracks.csv          FMA's multi-row header (section, field), track_id index
    OUT/fma_metadata/genres.csv
    OUT/captions.jsonl                   {"id", "path", "caption"} per track (for the plain-folder source)

Same seed, same files.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..infra import storage

SAMPLE_RATE = 44100
NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
PROGRESSIONS = [[0, 4, 5, 3], [0, 5, 3, 4], [5, 3, 0, 4], [0, 3, 4, 3], [1, 4, 0, 0], [0, 0, 3, 4]]
# timbre: (relative amplitude of harmonics 1..n, decay per second of the fundamental, attack seconds)
INSTRUMENTS = {
    "piano": ([1.0, 0.5, 0.3, 0.15, 0.08], 2.5, 0.005),
    "plucked guitar": ([1.0, 0.7, 0.45, 0.3, 0.2, 0.1], 4.0, 0.002),
    "organ": ([1.0, 0.0, 0.6, 0.0, 0.4, 0.0, 0.25], 0.0, 0.02),
    "sawtooth synth": ([1.0 / k for k in range(1, 12)], 0.3, 0.01),
    "square-wave synth": ([1.0 / k if k % 2 else 0.0 for k in range(1, 12)], 0.2, 0.01),
    "soft pad": ([1.0, 0.2, 0.05], 0.0, 0.25),
    "bell": ([1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.3], 1.5, 0.001),
}
DRUMS = {  # 16 steps per bar: kick, snare, hi-hat
    "none": ("", "", ""),
    "rock": ("x.......x.x.....", "....x.......x...", "x.x.x.x.x.x.x.x."),
    "four-on-the-floor": ("x...x...x...x...", "....x.......x...", "..x...x...x...x."),
    "breakbeat": ("x.....x...x.....", "....x..x.x..x..x", "xxxxxxxxxxxxxxxx"),
    "shuffle": ("x.....x.x.......", "....x.......x...", "x..x..x..x..x..x"),
}
GENRES = {  # genre_id, title, parent (FMA genres.csv columns)
    "Electronic": (15, 0), "Rock": (12, 0), "Folk": (17, 0), "Jazz": (4, 0), "Ambient": (107, 15), "Pop": (10, 0),
}


@dataclass
class TrackParams:
    track_id: int
    tempo: int
    root: int
    mode: str
    progression: list[int]
    instrument: str
    bass: str
    drums: str
    seconds: float

    @property
    def key(self) -> str:
        return f"{NOTE_NAMES[self.root]} {self.mode}"

    @property
    def genre(self) -> str:
        if self.drums == "four-on-the-floor" or (self.instrument in ("sawtooth synth", "square-wave synth") and self.drums != "none"):
            return "Electronic"
        if self.drums == "none":
            return "Ambient" if self.instrument in ("soft pad", "bell", "organ") else "Folk"
        if self.drums == "shuffle":
            return "Jazz"
        if self.drums == "rock":
            return "Rock"
        return "Pop"

    @property
    def mood(self) -> str:
        fast = self.tempo >= 120
        if self.mode == "major":
            return "upbeat" if fast else "warm"
        return "driving" if fast else "melancholic"

    def caption(self) -> str:
        drums = "no drums" if self.drums == "none" else f"{self.drums} drums"
        bass = "" if self.bass == "none" else f", {self.bass} bass"
        return (f"{_article(self.mood).title()} {self.mood} {self.genre.lower()} track at {self.tempo} BPM in "
                f"{self.key}, with {_article(self.instrument)} {self.instrument} lead{bass} and {drums}.")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_params(track_id: int, seed: int, seconds: float) -> TrackParams:
    rng = np.random.default_rng([seed, track_id])
    return TrackParams(
        track_id=track_id,
        tempo=int(rng.integers(70, 161)),
        root=int(rng.integers(0, 12)),
        mode=str(rng.choice(list(SCALES))),
        progression=[int(v) for v in PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]],
        instrument=str(rng.choice(list(INSTRUMENTS))),
        bass=str(rng.choice(["sine", "sawtooth", "none"], p=[0.45, 0.35, 0.2])),
        drums=str(rng.choice(list(DRUMS), p=[0.2, 0.25, 0.2, 0.2, 0.15])),
        seconds=seconds,
    )


def _midi_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def _tone(freq: float, dur: float, harmonics, decay: float, attack: float, sr: int) -> np.ndarray:
    t = np.arange(int(dur * sr)) / sr
    out = np.zeros_like(t)
    for k, amp in enumerate(harmonics, start=1):
        if amp and freq * k < sr / 2:
            out += amp * np.sin(2 * np.pi * freq * k * t) * np.exp(-decay * k * 0.5 * t)
    env = np.minimum(1.0, t / max(attack, 1e-4)) * np.minimum(1.0, (dur - t) / 0.02).clip(0, 1)
    return out * env / max(1.0, sum(abs(a) for a in harmonics))


def _add(buf: np.ndarray, sig: np.ndarray, start: int, gain: float) -> None:
    end = min(len(buf), start + len(sig))
    if end > start:
        buf[start:end] += gain * sig[: end - start]


def _drum_hit(kind: str, rng: np.random.Generator, sr: int) -> np.ndarray:
    if kind == "kick":
        t = np.arange(int(0.25 * sr)) / sr
        return np.sin(2 * np.pi * (50 * t + 60 * (1 - np.exp(-t * 30)) / 30)) * np.exp(-t * 12)
    if kind == "snare":
        t = np.arange(int(0.18 * sr)) / sr
        return (0.7 * rng.standard_normal(t.size) + 0.4 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 22)
    t = np.arange(int(0.05 * sr)) / sr  # hi-hat: high-passed noise
    return np.diff(rng.standard_normal(t.size + 1)) * 0.5 * np.exp(-t * 70)


def render(params: TrackParams, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Render a track to float32 stereo (n, 2), peak 0.9."""
    rng = np.random.default_rng([params.track_id, 7919])
    n = int(params.seconds * sr)
    left, right = np.zeros(n), np.zeros(n)
    beat = 60.0 / params.tempo
    bar = 4 * beat
    scale = SCALES[params.mode]
    base = 48 + params.root
    harm, decay, attack = INSTRUMENTS[params.instrument]
    pan = 0.3 + 0.4 * rng.random()
    degree = 0
    n_bars = int(np.ceil(params.seconds / bar))
    for b in range(n_bars):
        t0 = b * bar
        chord_deg = params.progression[b % len(params.progression)]
        chord = [base + 12 * ((chord_deg + i) // 7) + scale[(chord_deg + i) % 7] for i in (0, 2, 4)]
        for note in chord:  # sustained chord in the lead timbre, quiet
            sig = _tone(_midi_hz(note), bar, harm, decay * 0.5, max(attack, 0.02), sr)
            _add(left, sig, int(t0 * sr), 0.12)
            _add(right, sig, int(t0 * sr), 0.12)
        if params.bass != "none":  # bass on beats 1 and 3
            bh = [1.0] if params.bass == "sine" else [1.0 / k for k in range(1, 8)]
            for beat_i in (0, 2):
                sig = _tone(_midi_hz(chord[0] - 12), beat * 1.8, bh, 1.0, 0.01, sr)
                s = int((t0 + beat_i * beat) * sr)
                _add(left, sig, s, 0.35)
                _add(right, sig, s, 0.35)
        t = t0  # melody: random walk on the scale, eighths and quarters
        while t < t0 + bar - 1e-6:
            dur = beat * (0.5 if rng.random() < 0.6 else 1.0)
            degree = int(np.clip(degree + rng.integers(-2, 3), -3, 10))
            note = base + 12 + 12 * (degree // 7) + scale[degree % 7]
            if rng.random() > 0.1:  # an occasional rest
                sig = _tone(_midi_hz(note), dur * 0.95, harm, decay, attack, sr)
                _add(left, sig, int(t * sr), 0.35 * (1 - pan))
                _add(right, sig, int(t * sr), 0.35 * pan)
            t += dur
        kick, snare, hat = DRUMS[params.drums]
        for i in range(16 if kick else 0):
            s = int((t0 + i * beat / 4) * sr)
            for pattern, kind, gain in ((kick, "kick", 0.6), (snare, "snare", 0.35), (hat, "hat", 0.15)):
                if pattern[i] == "x":
                    hit = _drum_hit(kind, rng, sr)
                    _add(left, hit, s, gain)
                    _add(right, hit, s, gain)
    out = np.stack([left, right], axis=1)
    return (0.9 * out / max(1e-6, np.abs(out).max())).astype(np.float32)


def track_path(root: Path, track_id: int, folder: str = "fma_synth") -> Path:
    return root / folder / f"{track_id // 1000:03d}" / f"{track_id:06d}.mp3"


def mp3_bytes(params: TrackParams) -> bytes:
    """One track rendered and encoded as MP3."""
    mp3 = io.BytesIO()
    sf.write(mp3, render(params), SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    return mp3.getvalue()


def write_corpus(out: str | Path, num_tracks: int, seconds: float = 30.0, seed: int = 0,
                 first_id: int = 1, threads: int | None = None) -> list[TrackParams]:
    """Write ``num_tracks`` MP3s plus metadata under ``out``; returns the parameters of every track. Tracks are
    rendered and encoded on ``threads`` threads (default: one per CPU; numpy and libsndfile release the GIL, 1.9x
    on 2 cores, ``benchmarks/synth.py``); each is its own seeded draw, so the files are the same either way."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(out)
    tracks = [sample_params(first_id + i, seed, seconds) for i in range(num_tracks)]
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        # in track order; each file written whole or not at all, a failed write named (storage.write_bytes)
        for p, data in zip(tracks, pool.map(mp3_bytes, tracks)):
            storage.write_bytes(track_path(root, p.track_id), data)
    _write_metadata(root, tracks)
    return tracks


def _write_metadata(root: Path, tracks: list[TrackParams]) -> None:
    meta = root / "fma_metadata"
    columns = [("album", "title"), ("artist", "name"), ("set", "split"), ("set", "subset"),
               ("track", "duration"), ("track", "genre_top"), ("track", "genres"), ("track", "genres_all"),
               ("track", "tags"), ("track", "title"), ("track", "bit_rate"), ("track", "listens"), ("track", "favorites"),
               ("track", "synth_params")]
    f = io.StringIO()  # FMA's header: section row, field row, index row
    w = csv.writer(f)
    w.writerow([""] + [c[0] for c in columns])
    w.writerow([""] + [c[1] for c in columns])
    w.writerow(["track_id"] + [""] * len(columns))
    for p in tracks:
        gid, parent = GENRES[p.genre]
        all_ids = [gid] + ([parent] if parent else [])
        split = ("training", "validation", "test")[0 if p.track_id % 10 < 8 else 1 if p.track_id % 10 == 8 else 2]
        w.writerow([p.track_id, f"Synthetic album {p.track_id % 7}", f"Synth artist {p.track_id % 5}", split,
                    "small", f"{p.seconds:.0f}", p.genre, str([gid]), str(all_ids),
                    str([p.mood, p.instrument, p.drums]), f"{p.mood.title()} {p.genre} #{p.track_id}", 128000,
                    (p.track_id * 137) % 5000, (p.track_id * 7) % 40, json.dumps(asdict(p))])
    storage.write_text(meta / "tracks.csv", f.getvalue())
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(["genre_id", "#tracks", "parent", "title", "top_level"])
    for name, (gid, parent) in GENRES.items():
        count = sum(1 for p in tracks if p.genre == name)
        w.writerow([gid, count, parent, name, parent or gid])
    storage.write_text(meta / "genres.csv", f.getvalue())
    captions = [json.dumps({"id": f"{p.track_id:06d}", "path": str(track_path(root, p.track_id).relative_to(root)),
                            "caption": p.caption()}) + "\n" for p in tracks]
    storage.write_text(root / "captions.jsonl", "".join(captions))
