"""What a generation follows: a text, a clip's sound (an audio prompt), and a clip to continue.

- **Text** (``MusicPrompt("calm piano")``): the CLAP text embedding's RVQ tokens, as always.
- **Audio prompt** (``audio=FILE``): the CLAP *audio* embedding of the clip, which is what the stages were trained
  on. Its tokens are exactly those preprocessing gives the clip as a track (``data.preprocess.track_clips``: the
  first clip of ``clip_seconds``, repeat-padded below ``pad_to_seconds``): the first CLAP window's, the window a
  training crop at the start of that clip is conditioned on.
- **Continuation** (``continues=FILE``): the clip's own semantic, coarse and fine tokens (its whole seconds,
  tokenized as preprocessing tokenizes a clip) are the prefix of every stage, kept bit for bit; the stages add
  ``duration`` seconds after it through the same sliding windows. The output is the clip followed by its
  continuation, decoded as one (``GenerateSettings.continuation_only``: the continuation alone). Without a text or
  an audio prompt, the clip itself is the audio prompt.

Candidates are ranked by CLAP similarity to the text, or to the audio prompt's (or continued clip's) audio
embedding.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..infra import storage

KEYS = ("text", "audio", "continues")


@dataclass(frozen=True)
class MusicPrompt:
    text: str | None = None
    audio: str | None = None  # a clip whose CLAP audio embedding conditions, instead of a text
    continues: str | None = None  # a clip whose tokens every stage continues

    def __post_init__(self):
        if not (self.text or self.audio or self.continues):
            raise ValueError("a prompt needs a text, an audio prompt or a clip to continue")
        if self.text and self.audio:
            raise ValueError(f"give a text or an audio prompt, not both (text {self.text!r}, audio {self.audio})")

    @property
    def label(self) -> str:
        """How reports, folders and tables name it: the text alone for a text prompt."""
        parts = [self.text] if self.text else [f"[audio prompt {storage.name(self.audio)}]"] if self.audio else []
        if self.continues:
            parts.append(f"[continues {storage.name(self.continues)}]")
        return " ".join(parts)

    @property
    def sound(self) -> str | None:
        """The clip whose CLAP audio embedding conditions and ranks (none for a text)."""
        return None if self.text else self.audio or self.continues

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def encode(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> "MusicPrompt":
        return cls(**json.loads(text))


def as_prompt(prompt: "str | MusicPrompt") -> MusicPrompt:
    return prompt if isinstance(prompt, MusicPrompt) else MusicPrompt(text=prompt)


def read_music_prompts(path: str) -> list[MusicPrompt]:
    """A prompt file for generation: a JSON list whose entries are texts or objects with ``text``, ``audio`` and
    ``continues`` (clip paths relative to the file's folder, or absolute, or URIs); any other prompt set
    (``evaluation.evaluate.read_prompt_set``: text lines, MusicCaps CSV) gives text prompts."""
    from ..evaluation.evaluate import read_prompt_set

    if not path.endswith(".json"):
        return [MusicPrompt(text=p.caption) for p in read_prompt_set(path)]
    try:
        data = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt file {path} is not valid JSON ({e}): give a JSON list") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: a JSON prompt set is a non-empty list of texts or objects "
                         f"({{\"text\": ..., \"audio\": FILE, \"continues\": FILE}})")
    folder = storage.parent(storage.location(path))
    prompts = []
    for i, entry in enumerate(data):
        if isinstance(entry, str) and entry.strip():
            prompts.append(MusicPrompt(text=entry.strip()))
            continue
        unknown = set(entry) - set(KEYS) if isinstance(entry, dict) else {"?"}
        if unknown or not all(isinstance(v, str) for v in entry.values()):
            raise ValueError(f"{path}: entry {i} must be a text or an object with string keys {', '.join(KEYS)}")
        clips = {k: entry[k] if storage.is_remote(entry[k]) or Path(entry[k]).is_absolute()
                 else storage.join(folder, entry[k]) for k in ("audio", "continues") if entry.get(k)}
        try:
            prompts.append(MusicPrompt(text=(entry.get("text") or "").strip() or None, **clips))
        except ValueError as e:
            raise ValueError(f"{path}: entry {i}: {e}") from None
    return prompts


@dataclass
class Clip:
    """A clip's tokens as preprocessing makes them, and its CLAP audio embedding for ranking."""

    path: str
    seconds: int
    tokens: dict[str, np.ndarray]  # clap (windows, q), semantic (T,), coarse (T', q), fine (T', q)


def clip_tokens(system, path: str, *, continuation: bool) -> Clip:
    """Tokens of the clip at ``path``. As an audio prompt: as preprocessing tokenizes the file as a track (its
    first row, default data settings). To be continued: its whole seconds as they are (no repeat padding: the
    prefix is the clip), the semantic encoder's input normalized over the clip, at least one second."""
    from ..audio.io import decode_audio

    audio, rate = decode_audio(path)  # AudioDecodeError names the file and why
    cfg = DataConfig()
    if continuation:
        seconds = len(audio) // rate
        if seconds < 1:
            raise ValueError(f"--continue {path}: the clip is {len(audio) / rate:.2f} s long; continuing needs at "
                             f"least 1 s (its whole seconds are the prefix)")
        audio = audio[: seconds * rate]
        cfg = DataConfig(clip_seconds=seconds, pad_to_seconds=1, min_seconds=1.0)  # the clip as it is
    seconds, waves = _first_clip(system, audio, rate, cfg)
    acoustic = system.acoustic.encode(waves["acoustic"])
    n_coarse, n_fine = system.config.num_coarse_quantizers, system.config.num_fine_quantizers
    return Clip(path, seconds, {"clap": system.clap.audio_tokens(waves["clap"]),
                                "semantic": system.semantic.tokens(waves["semantic"]),
                                "coarse": acoustic[:, :n_coarse], "fine": acoustic[:, n_coarse: n_coarse + n_fine]})


def sound_tokens(system, audio: np.ndarray, rate: int) -> np.ndarray:
    """An audio prompt's CLAP tokens (1, q), from its decoded audio: the first CLAP window of the clip
    preprocessing makes of it (``clip_tokens(continuation=False)``'s, without encoding the other tokens)."""
    _, waves = _first_clip(system, audio, rate, DataConfig())
    return system.clap.audio_tokens(waves["clap"])[:1]


def _first_clip(system, audio: np.ndarray, rate: int, cfg: DataConfig) -> tuple[int, dict[str, np.ndarray]]:
    """Whole seconds and the waveform each tokenizer reads of the first clip preprocessing cuts from ``audio``."""
    from ..data.preprocess import track_clips

    rates = {"clap": system.clap.sample_rate, "semantic": system.semantic.sample_rate,
             "acoustic": system.acoustic.sample_rate}
    _, _, seconds, waves = next(iter(track_clips(audio, rate, cfg, "", rates)))
    return seconds, waves


__all__ = ["MusicPrompt", "Clip", "as_prompt", "clip_tokens", "read_music_prompts", "sound_tokens", "KEYS"]
