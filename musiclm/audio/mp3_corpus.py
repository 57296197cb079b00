"""A corpus of MP3s of many kinds, intact and cut, to measure truncation detection (``musiclm.mp3``).

Two encoders: FFmpeg's libmp3lame (through PyAV), which can leave out the Xing/Info header and write ID3v1/v2
tags, and LAME inside libsndfile (through soundfile); CBR, VBR and ABR; 8-48 kHz; mono and stereo; music and
digital silence; plus files that are not MP3 inside (WAV, FLAC, OGG, random bytes) named ``.mp3``. Each intact
file is also cut at fractions of its size and at an MPEG frame boundary.

Used by ``tests/test_audio.py`` (a small set) and ``benchmarks/truncation.py`` (the full set).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from . import mp3, synth


@dataclass(frozen=True)
class Variant:
    name: str
    encoder: str  # "ffmpeg", "libsndfile", or "none" (not an MP3 inside)
    rate: int = 44100
    channels: int = 2
    mode: str = "cbr"  # cbr, vbr, abr
    kbps: int = 128  # CBR/ABR bitrate
    quality: float = 4  # VBR quality (FFmpeg -q:a 0-9; libsndfile compression level = quality / 9)
    xing: bool = True  # FFmpeg only: write the Xing/Info header
    id3v2: int = 4  # FFmpeg only: 0 = none, 3 or 4
    id3v1: bool = False  # FFmpeg only
    content: str = "music"  # music, silence
    seconds: float = 30.0
    container: str = "mp3"  # for encoder "none": wav, flac, ogg, random


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    variant: Variant
    cut: str  # "" for the intact file, else how it was cut ("0.33", "frame")
    intact_seconds: float  # what the intact file decodes to


def full_variants(seconds: float = 30.0) -> list[Variant]:
    """The measurement set: every encoder setting crossed with rates and channels where it matters."""
    out = []
    for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000):
        for channels in (1, 2):
            kbps = 32 if rate <= 12000 else 64 if rate <= 24000 else 128
            out.append(Variant(f"ffmpeg-cbr{kbps}-{rate}-{channels}ch", "ffmpeg", rate, channels, "cbr", kbps,
                               seconds=seconds))
            out.append(Variant(f"ffmpeg-cbr{kbps}-noxing-{rate}-{channels}ch", "ffmpeg", rate, channels, "cbr", kbps,
                               xing=False, seconds=seconds))
            out.append(Variant(f"lame-cbr-{rate}-{channels}ch", "libsndfile", rate, channels, "cbr", seconds=seconds))
    for q in (0, 4, 9):
        out.append(Variant(f"ffmpeg-vbr-q{q}", "ffmpeg", mode="vbr", quality=q, seconds=seconds))
        out.append(Variant(f"lame-vbr-q{q}", "libsndfile", mode="vbr", quality=q, seconds=seconds))
    for kbps in (64, 192):
        out.append(Variant(f"ffmpeg-abr{kbps}", "ffmpeg", mode="abr", kbps=kbps, seconds=seconds))
        out.append(Variant(f"lame-abr-{kbps}", "libsndfile", mode="abr", kbps=kbps, seconds=seconds))
    out += [
        Variant("ffmpeg-cbr320", "ffmpeg", kbps=320, seconds=seconds),
        Variant("ffmpeg-cbr64-22k-mono", "ffmpeg", 22050, 1, kbps=64, seconds=seconds),
        Variant("ffmpeg-noid3", "ffmpeg", id3v2=0, seconds=seconds),
        Variant("ffmpeg-id3v23-id3v1", "ffmpeg", id3v2=3, id3v1=True, seconds=seconds),
        Variant("ffmpeg-noxing-id3v1", "ffmpeg", xing=False, id3v1=True, seconds=seconds),
        Variant("ffmpeg-vbr-noxing", "ffmpeg", mode="vbr", xing=False, seconds=seconds),
        Variant("ffmpeg-silence", "ffmpeg", content="silence", seconds=seconds),
        Variant("ffmpeg-silence-noxing", "ffmpeg", content="silence", xing=False, seconds=seconds),
        Variant("lame-silence", "libsndfile", content="silence", seconds=seconds),
        Variant("lame-silence-22k-mono", "libsndfile", 22050, 1, content="silence", seconds=seconds),
        Variant("lame-60s", "libsndfile", seconds=2 * seconds),
        Variant("ffmpeg-60s", "ffmpeg", seconds=2 * seconds),
        Variant("lame-3s", "libsndfile", seconds=3.0),
        Variant("wav-as-mp3", "none", container="wav", seconds=seconds),
        Variant("flac-as-mp3", "none", container="flac", seconds=seconds),
        Variant("ogg-as-mp3", "none", container="ogg", seconds=seconds),
        Variant("random-bytes-as-mp3", "none", container="random", seconds=seconds),
    ]
    return out


def small_variants(seconds: float = 4.0) -> list[Variant]:
    """A few of each kind, for a test."""
    return [
        Variant("ffmpeg-cbr", "ffmpeg", seconds=seconds),
        Variant("ffmpeg-noxing-22k-mono", "ffmpeg", 22050, 1, kbps=64, xing=False, id3v1=True, seconds=seconds),
        Variant("ffmpeg-vbr-8k", "ffmpeg", 8000, 1, mode="vbr", seconds=seconds),
        Variant("ffmpeg-vbr-noxing", "ffmpeg", mode="vbr", xing=False, seconds=seconds),  # libsndfile stops short
        Variant("lame-vbr", "libsndfile", mode="vbr", seconds=seconds),
        Variant("lame-silence-22k-mono", "libsndfile", 22050, 1, content="silence", seconds=seconds),
        Variant("wav-as-mp3", "none", container="wav", seconds=seconds),
    ]


def _audio(v: Variant, seed: int) -> np.ndarray:
    if v.content == "silence":
        return np.zeros((int(v.seconds * v.rate), v.channels), np.float32)
    x = synth.render(synth.sample_params(seed, 0, v.seconds), sr=v.rate)
    return x[:, :1] if v.channels == 1 else x


def encode(v: Variant, audio: np.ndarray) -> bytes:
    if v.encoder == "ffmpeg":
        return _encode_ffmpeg(v, audio)
    buf = io.BytesIO()
    if v.encoder == "libsndfile":
        mode = {"cbr": "CONSTANT", "vbr": "VARIABLE", "abr": "AVERAGE"}[v.mode]
        level = min(v.quality / 9 if v.mode == "vbr" else 1 - min(v.kbps, 320) / 320, 0.95)  # libsndfile refuses 1.0
        sf.write(buf, audio, v.rate, format="MP3", subtype="MPEG_LAYER_III", bitrate_mode=mode,
                 compression_level=level)
    elif v.container == "random":
        return np.random.default_rng(len(v.name)).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    else:
        subtype = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}[v.container]
        sf.write(buf, audio, v.rate, format=v.container.upper(), subtype=subtype)
    return buf.getvalue()


def _encode_ffmpeg(v: Variant, audio: np.ndarray) -> bytes:
    import av

    buf = io.BytesIO()
    options = {"write_xing": str(int(v.xing)), "id3v2_version": str(v.id3v2), "write_id3v1": str(int(v.id3v1))}
    layout = "mono" if v.channels == 1 else "stereo"
    with av.open(buf, "w", format="mp3", options=options) as out:
        stream = out.add_stream("libmp3lame", rate=v.rate, layout=layout)
        if v.mode == "vbr":  # FFmpeg's -q:a: a quality scale instead of a bitrate
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = int(v.quality * 118)  # FF_QP2LAMBDA
        else:
            stream.bit_rate = v.kbps * 1000
            if v.mode == "abr":
                stream.codec_context.options = {"abr": "1"}
        if v.id3v2:
            out.metadata["title"] = v.name
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.reshape(1, -1)), format="flt", layout=layout)
        frame.sample_rate = v.rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def frame_boundary_near(data: bytes, fraction: float) -> int | None:
    """The byte offset of the MPEG frame boundary nearest ``fraction`` of the file (None: not an MP3)."""
    pos = mp3.first_frame(data)
    if pos is None:
        return None
    target = int(len(data) * fraction)
    while pos < target:
        head = mp3.parse_header(data, pos)
        if head is None:
            return None
        pos += head.length
    return pos


def write(out: str | Path, variants: list[Variant], cuts: tuple[float, ...] = (0.33, 0.5, 0.9, 0.99),
          frame_cut: bool = True) -> list[CorpusFile]:
    """Each variant intact and cut (its first bytes kept), as ``.mp3`` files under ``out``."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, v in enumerate(variants):
        audio = _audio(v, i + 1)
        data = encode(v, audio)
        intact = root / f"{v.name}.mp3"
        intact.write_bytes(data)
        seconds = len(audio) / v.rate
        files.append(CorpusFile(intact, v, "", seconds))
        if v.container == "random":
            continue
        for c in cuts:
            path = root / f"{v.name}.cut{c:g}.mp3"
            path.write_bytes(data[: int(len(data) * c)])
            files.append(CorpusFile(path, v, f"{c:g}", seconds))
        boundary = frame_boundary_near(data, 0.5) if frame_cut else None
        if boundary:
            path = root / f"{v.name}.cutframe.mp3"
            path.write_bytes(data[:boundary])
            files.append(CorpusFile(path, v, "frame", seconds))
    return files
