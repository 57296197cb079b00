"""Which stretches of a track become token rows, how short ones are padded, and the train/valid split.

Everything here is a pure function of the track id, its audio and the ``DataConfig``, so an interrupted
preprocessing run that is started again makes exactly the rows an uninterrupted one would.

Short tracks, as open-musiclm (``SoundDatasetForPreprocessing``): a clip shorter than ``pad_to_seconds``
(its semantic window, 10 s) is repeated a whole number of times and zero-padded to exactly that length, so
one full semantic window always exists; a longer clip is zero-padded to a whole number of seconds so that
CLAP windows (1 s hop), semantic frames (50 Hz) and acoustic frames (75 Hz) cover the same seconds.
(open-musiclm adds a whole second of silence when the length is already whole; we do not.)
Tracks shorter than ``min_seconds`` are refused before this, as error rows.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from ..config import DataConfig


def stable_fraction(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by ``seed`` and ``key``, the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_of(track_id: str, valid_frac: float, seed: int) -> str:
    """'valid' for about ``valid_frac`` of track ids, else 'train'; every crop of a track lands in one split."""
    return "valid" if stable_fraction(seed, track_id) < valid_frac else "train"


def row_id(track_id: str, crop: int, crops: int) -> str:
    return track_id if crops == 1 else f"{track_id}#{crop}"


def clip_spans(num_samples: int, rate: int, cfg: DataConfig, track_id: str) -> list[tuple[int, int]]:
    """(start, length) in samples of each row's clip: the first ``clip_seconds`` when ``crops`` is 1, else up to
    ``crops`` distinct clips starting at whole seconds chosen by a generator seeded with the track id."""
    clip = int(cfg.clip_seconds * rate)
    if cfg.crops == 1 or num_samples <= clip:
        return [(0, min(num_samples, clip))]
    starts = (num_samples - clip) // rate + 1  # whole-second start offsets that fit a full clip
    rng = np.random.default_rng(int(stable_fraction(cfg.seed, "crop:" + track_id) * 2 ** 63))
    chosen = np.sort(rng.choice(starts, size=min(cfg.crops, starts), replace=False))
    return [(int(s) * rate, clip) for s in chosen]


def pad_clip(audio: np.ndarray, rate: int, pad_to_seconds: int) -> np.ndarray:
    """Repeat-pad a clip shorter than ``pad_to_seconds`` to exactly that length; zero-pad a longer one to a
    whole number of seconds."""
    n = audio.shape[-1]
    target = int(pad_to_seconds * rate)
    if n < target:
        audio = np.tile(audio, target // n)
    else:
        target = math.ceil(n / rate) * rate
    return np.pad(audio, (0, target - audio.shape[-1])).astype(np.float32, copy=False)
