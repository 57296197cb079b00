"""Decode any audio file to float32 mono at a given rate; resample; crop/pad; write WAV.

Two resamplers: ``resample`` (soxr, high quality) for everything users listen to or score, and
``sinc_resample``, the windowed-sinc filter open-musiclm resamples its tokenizers' inputs with, so that
tokens are computed from the waveforms its k-means, RVQ and stages were fitted on.

Decoding tries soundfile (libsndfile with its bundled MP3 support: about 1,200x real time) and falls back to
PyAV (bundled FFmpeg) for formats libsndfile does not read. Every failure is an ``AudioDecodeError`` that
carries the path and the reason, so a pipeline can record it and go on.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from . import mp3

AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif")
# A decode that ends more than this many samples before the length a WAV/FLAC/OGG header declares means the
# file is cut short: those headers state the length exactly (MP3s are checked from their frames instead:
# musiclm.mp3). benchmarks/truncation.py: no intact WAV, FLAC or OGG file comes within it.
_TRUNCATION_TOLERANCE = 16


class AudioDecodeError(Exception):
    """The file could not be decoded. ``path`` names it, ``reason`` says why, ``kind`` is a short category
    for summaries: unreadable, empty, truncated, not_audio, no_samples, non_finite."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = "not_audio"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"cannot decode audio file {self.path}: {reason}")

    def __reduce__(self):  # picklable across Ray workers
        return (AudioDecodeError, (self.path, self.reason, self.kind))


def _decode_soundfile(data: bytes, check_declared: bool) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        declared = f.frames
        audio = f.read(dtype="float32", always_2d=True)
        rate = f.samplerate
    if check_declared and 0 < declared and audio.shape[0] + _TRUNCATION_TOLERANCE < declared:
        raise _Truncated(f"file is truncated: its header declares {declared / rate:.2f} s but only "
                         f"{audio.shape[0] / rate:.2f} s decode")
    return audio, rate


def _decode_pyav(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono")
        chunks, rate = [], stream.rate
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                rate = out.rate
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise ValueError("no audio frames")
    return np.concatenate(chunks).astype(np.float32)[:, None], rate


class _Truncated(Exception):
    pass


def _wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE file looks cut (its data chunk declares more bytes than follow), or None. libsndfile
    clamps the declared length to what is there, so its length cannot show this."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4: pos + 8], "little")
        if data[pos: pos + 4] == b"data":
            present = len(data) - pos - 8
            if 0 < size < 0xFFFFFFFF and present < size:  # 0 and 0xFFFFFFFF: a streamed WAV, length unknown
                return f"file is truncated: its data chunk declares {size} bytes but {present} follow"
            return None
        pos += 8 + size + (size & 1)
    return None


def decode_audio(source: str | os.PathLike | bytes, sample_rate: int | None = None, *, path: str | None = None,
                 max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode ``source`` (a path, or the file's bytes with ``path`` naming it) to float32 mono.

    Returns ``(audio, rate)``; ``rate`` is ``sample_rate`` when given (the audio is resampled), else the file's.
    ``max_seconds`` keeps only the start of the track. Raises ``AudioDecodeError``.
    """
    name = str(path if path is not None else source if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise AudioDecodeError(name, f"cannot read file: {e.strerror or e}", "unreadable") from None
    if len(data) == 0:
        raise AudioDecodeError(name, "file is empty (0 bytes)", "empty")
    # An MP3 is judged complete or cut from its own frames (musiclm.mp3); the length libsndfile declares for it
    # is an estimate unless a Xing/VBRI header gives it. Other formats' headers declare their length exactly.
    stream = mp3.inspect(data)
    try:
        cut = stream.truncation() if stream is not None else _wav_truncation(data)
        if cut:
            raise _Truncated(cut)
        audio, rate = _decode_soundfile(data, check_declared=stream is None)
        if stream is not None and audio.shape[0] < stream.seconds * rate - 2 * stream.samples_per_frame:
            # libsndfile stops at the length it estimated (a VBR MP3 without a Xing header: 7 of 30 s);
            # FFmpeg decodes every frame
            audio, rate = _decode_pyav(data)
    except _Truncated as e:
        raise AudioDecodeError(name, str(e), "truncated") from None
    except Exception as sf_error:  # libsndfile cannot read it: try FFmpeg
        try:
            audio, rate = _decode_pyav(data)
        except Exception as av_error:
            raise AudioDecodeError(name, f"not a decodable audio file (soundfile: {_short(sf_error)}; "
                                         f"FFmpeg: {_short(av_error)})", "not_audio") from None
    if audio.shape[0] == 0:
        raise AudioDecodeError(name, "file decodes to no audio samples", "no_samples")
    mono = audio.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioDecodeError(name, "file decodes to non-finite sample values", "non_finite")
    if max_seconds is not None:
        mono = mono[: int(round(max_seconds * rate))]
    if sample_rate is not None and sample_rate != rate:
        mono = resample(mono, rate, sample_rate)
        rate = sample_rate
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def load_audio(path: str | os.PathLike, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``path`` to float32 mono at ``sample_rate``. Raises ``AudioDecodeError``."""
    return decode_audio(path, sample_rate, max_seconds=max_seconds)[0]


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:160]


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """High-quality resampling (soxr) of a 1-D float32 signal."""
    if rate_in == rate_out:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio.astype(np.float32, copy=False), rate_in, rate_out).astype(np.float32, copy=False)


def sinc_resample(audio: np.ndarray, rate_in: int, rate_out: int, *, zero_crossings: int = 6,
                  rolloff: float = 0.99) -> np.ndarray:
    """Resample a 1-D float32 signal as ``torchaudio.functional.resample`` does with its defaults, which
    open-musiclm applies to every waveform it tokenizes: a Hann-windowed sinc low-pass with ``zero_crossings``
    zero crossings each side and its cutoff at ``rolloff`` times the lower Nyquist frequency, evaluated as a
    polyphase filter on the rates divided by their gcd; output length ``ceil(len * rate_out / rate_in)``.

    With the reduced rates ``a = rate_in / g`` and ``b = rate_out / g``, output sample ``f * b + j`` (frame ``f``,
    phase ``j``) is ``sum_k x[f * a + k - w] * h_j[k]`` over ``k < 2w + a``, where ``w = ceil(zero_crossings * a /
    cutoff)``, ``cutoff = min(a, b) * rolloff`` and ``h_j[k] = (cutoff / a) * sinc(u) * cos(pi u / (2 zc))^2``
    at ``u = cutoff * ((k - w) / a - j / b)`` clamped to ``[-zc, zc]``; ``x`` is zero outside the signal.
    Checked against torchaudio's own output (``tests/data/open_musiclm_semantic``): within 1.2e-7 on a unit signal.
    """
    import torch

    x = np.asarray(audio, dtype=np.float32)
    if rate_in == rate_out:
        return x
    g = math.gcd(int(rate_in), int(rate_out))
    a, b = int(rate_in) // g, int(rate_out) // g
    cutoff = min(a, b) * rolloff
    w = math.ceil(zero_crossings * a / cutoff)
    # float32 throughout, in torchaudio's order of operations: the taps then match its own to the last bit or
    # two (float64 taps differ from them by up to 2e-5 on a unit signal, enough to move int16 roundings)
    f32 = torch.float32
    u = (-torch.arange(b, dtype=f32)[:, None] / b + torch.arange(-w, w + a, dtype=f32)[None, :] / a) * cutoff
    u = u.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(u * math.pi / zero_crossings / 2) ** 2
    u = u * math.pi
    taps = torch.where(u == 0, torch.tensor(1.0, dtype=f32), torch.sin(u) / u) * window * (cutoff / a)
    kernel = taps[:, None, :]  # (b phases, 1, 2w + a)
    padded = torch.nn.functional.pad(torch.from_numpy(x)[None, None], (w, w + a))
    with torch.no_grad():
        frames = torch.nn.functional.conv1d(padded, kernel, stride=a)  # (1, b, frames)
    out = frames[0].transpose(0, 1).reshape(-1)[: math.ceil(b * len(x) / a)]
    return out.numpy().astype(np.float32, copy=False)


def int16_round_trip(audio: np.ndarray) -> np.ndarray:
    """Quantize to the 16-bit grid as laion_clap (before CLAP's features) and open-musiclm (before EnCodec)
    do: clamp to [-1, 1], scale by 32767 in float32, truncate to int16, divide by 32767. For CLAP it matters:
    the log-mel of quiet bins moves by up to 1.3 dB without it."""
    x = np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * np.float32(32767.0)
    return x.astype(np.int16).astype(np.float32) / np.float32(32767.0)


def crop_or_pad(audio: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """Exactly ``length`` samples starting at ``offset``; zero-padded at the end where the audio is shorter."""
    out = audio[offset: offset + length]
    if out.shape[-1] < length:
        out = np.pad(out, (0, length - out.shape[-1]))
    return out


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start offsets of ``window``-long windows every ``hop`` samples; one window when audio is shorter."""
    if num_samples <= window:
        return [0]
    return list(range(0, num_samples - window + 1, hop))


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """16-bit samples of float audio: scaled by 32768 (the scale readers divide by), rounded, clipped. So
    ``to_pcm16(as_written(x)) == to_pcm16(x)``: audio read back from a WAV writes back unchanged."""
    scaled = np.round(np.asarray(audio, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def as_written(audio: np.ndarray) -> np.ndarray:
    """The float32 audio a reader gets back from ``write_wav(audio)``'s file (16-bit samples / 32768)."""
    return (to_pcm16(audio) / 32768.0).astype(np.float32)


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Float audio as the bytes of a 16-bit PCM WAV file (``to_pcm16``)."""
    buf = io.BytesIO()
    sf.write(buf, to_pcm16(audio), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> str:
    """Write float audio as 16-bit PCM WAV to a file or an object-store URI, atomically; returns where."""
    from ..infra import storage

    storage.write_bytes(path, wav_bytes(audio, sample_rate))
    return storage.location(path)


def list_audio_files(folder: str | os.PathLike, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[str]:
    """All audio files under ``folder`` (recursive), sorted, by extension."""
    return scan_audio_files(folder, extensions)[0]


def scan_audio_files(folder: str | os.PathLike, extensions: tuple[str, ...] = AUDIO_EXTENSIONS
                     ) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(audio files, problems) under ``folder`` (recursive), sorted. A problem is an entry named like an audio
    file that is not one: ``(path, kind, reason)`` with kind ``not_a_file`` (a directory or device) or
    ``broken_link`` (a symbolic link to nothing)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} does not exist or is not a directory")
    files, problems = [], []
    for p in root.rglob("*"):
        if p.suffix.lower() not in extensions:
            continue
        if p.is_file():
            files.append(str(p))
        elif p.is_symlink() and not p.exists():
            problems.append((str(p), "broken_link", f"symbolic link to {os.readlink(p)}, which does not exist"))
        else:
            problems.append((str(p), "not_a_file", "named like an audio file but is a directory or special file"))
    return sorted(files), sorted(problems)
