"""The structure of an MP3 (MPEG audio) file, read from its bytes: whether it is complete.

A decoder alone cannot tell a cut file from a short one, and the length libsndfile reports for an MP3 is exact
only when the file carries a Xing/Info or VBRI header; otherwise it is estimated from the file size, and it
overshoots what any decoder gives from intact files by 0.07-0.14 s (digital silence, 22 kHz mono, tags). So
truncation is judged from the stream itself (``inspect``):

- the MPEG frames are walked from the first one (after ID3v2 tags and any junk before it) to the end of the
  stream (before a trailing ID3v1 or APEv2 tag): a stream that ends inside a frame was cut;
- a Xing/Info or VBRI header declares the number of frames: a stream holding fewer was cut, even at a frame
  boundary;
- a file without such a header cut exactly at a frame boundary is indistinguishable from a shorter file: it
  is kept, and its rows state the length it decodes to.

Facts used (ISO/IEC 11172-3 and 13818-3 frame headers; the Xing/Info, LAME and VBRI header layouts as LAME,
FFmpeg and Fraunhofer write them) are stated where they are used.
"""
from __future__ import annotations

from dataclasses import dataclass

# kbit/s by (MPEG-1?, layer) and the header's 4-bit index (0 = free format, 15 = invalid)
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_BITRATES[(False, 3)] = _BITRATES[(False, 2)]
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
_SEARCH_BYTES = 64 * 1024  # how far past the tags the first frame may start (junk some encoders leave)
_OTHER_CONTAINERS = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM", b"caff", b"\x30\x26\xb2\x75")  # WAV, FLAC, ...


@dataclass(frozen=True)
class FrameHeader:
    mpeg1: bool
    layer: int
    sample_rate: int
    length: int  # bytes, header included
    samples: int  # per channel
    mono: bool

    @property
    def side_info(self) -> int:
        """Bytes of Layer III side information after the 4-byte header (where a Xing/Info tag follows)."""
        return (17 if self.mono else 32) if self.mpeg1 else (9 if self.mono else 17)


def parse_header(b: bytes | memoryview, pos: int) -> FrameHeader | None:
    """The MPEG audio frame header at ``pos``, or None when the 4 bytes there are not a valid one."""
    if pos + 4 > len(b) or b[pos] != 0xFF or (b[pos + 1] & 0xE0) != 0xE0:
        return None
    version, layer_bits = (b[pos + 1] >> 3) & 3, (b[pos + 1] >> 1) & 3
    bitrate_index, rate_index = b[pos + 2] >> 4, (b[pos + 2] >> 2) & 3
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved version or layer, free-format or bad bitrate, reserved sample rate
    mpeg1, layer = version == 3, 4 - layer_bits
    rate = _RATES[version][rate_index]
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    padding = (b[pos + 2] >> 1) & 1
    if layer == 1:
        length, samples = (12 * bitrate // rate + padding) * 4, 384
    elif layer == 2 or mpeg1:
        length, samples = 144 * bitrate // rate + padding, 1152
    else:  # Layer III of MPEG-2 / 2.5: half the samples per frame
        length, samples = 72 * bitrate // rate + padding, 576
    return FrameHeader(mpeg1, layer, rate, length, samples, mono=(b[pos + 3] >> 6) == 3)


@dataclass(frozen=True)
class Mp3Stream:
    """What walking an MP3's frames found. ``frames`` counts complete audio frames (not a Xing/VBRI frame)."""

    sample_rate: int
    samples_per_frame: int
    frames: int
    declared_frames: int | None  # from a Xing/Info or VBRI header; None without one (plain CBR)
    tail_bytes: int  # bytes left after the last complete frame, before any trailing tag
    tail_is_partial_frame: bool  # those bytes start a valid frame header: the stream was cut inside a frame
    encoder_delay: int = 0  # samples (LAME tag)
    encoder_padding: int = 0

    @property
    def seconds(self) -> float:
        """Audio the complete frames hold, less the encoder's delay and padding when declared."""
        samples = self.frames * self.samples_per_frame - self.encoder_delay - self.encoder_padding
        return max(samples, 0) / self.sample_rate

    def truncation(self) -> str | None:
        """Why the file looks cut, or None."""
        if self.declared_frames is not None and self.frames < self.declared_frames - 1:
            declared = self.declared_frames * self.samples_per_frame / self.sample_rate
            return (f"file is truncated: its header declares {self.declared_frames} MPEG frames ({declared:.2f} s) "
                    f"but it holds {self.frames} ({self.frames * self.samples_per_frame / self.sample_rate:.2f} s)")
        if self.tail_is_partial_frame:
            return (f"file is truncated: it ends inside an MPEG frame ({self.tail_bytes} bytes of it) after "
                    f"{self.frames} complete frames ({self.seconds:.2f} s)")
        return None


def _id3v2_end(b: bytes | memoryview) -> int:
    """Offset after any ID3v2 tags at the start (size: 4 syncsafe bytes; a footer adds 10)."""
    pos = 0
    while len(b) >= pos + 10 and bytes(b[pos: pos + 3]) == b"ID3":
        size = (b[pos + 6] << 21) | (b[pos + 7] << 14) | (b[pos + 8] << 7) | b[pos + 9]
        pos += 10 + size + (10 if b[pos + 5] & 0x10 else 0)
    return pos


def _stream_end(b: bytes | memoryview) -> int:
    """Offset where the audio ends: before a trailing ID3v1 tag (128 bytes, "TAG") and APEv2 tag (32-byte
    footer "APETAGEX" whose size field counts the items and the footer; a header adds 32)."""
    end = len(b)
    for _ in range(3):  # the tags may come in either order
        if end >= 128 and bytes(b[end - 128: end - 125]) == b"TAG":
            end -= 128
        elif end >= 32 and bytes(b[end - 32: end - 24]) == b"APETAGEX":
            size = int.from_bytes(b[end - 20: end - 16], "little")
            flags = int.from_bytes(b[end - 12: end - 8], "little")
            end -= size + (32 if flags & 0x80000000 else 0)
        else:
            break
    return max(end, 0)


def _first_frame(b: bytes | memoryview, start: int, end: int) -> tuple[int, FrameHeader] | None:
    """The first offset from ``start`` with a valid header whose next frame also starts with a valid header of
    the same version, layer and rate (a lone 0xFFE pattern in junk is not a frame)."""
    for pos in range(start, min(end, start + _SEARCH_BYTES)):
        if b[pos] != 0xFF:
            continue
        head = parse_header(b, pos)
        if head is None:
            continue
        after = pos + head.length
        if after >= end:
            return (pos, head) if after == end else None
        nxt = parse_header(b, after)
        if nxt is not None and (nxt.mpeg1, nxt.layer, nxt.sample_rate) == (head.mpeg1, head.layer, head.sample_rate):
            return pos, head
    return None


def _vbr_header(b: bytes | memoryview, pos: int, head: FrameHeader) -> tuple[int | None, int, int] | None:
    """(declared frames, encoder delay, padding) from a Xing/Info (with its LAME extension) or VBRI header in the
    frame at ``pos``; None when the frame is audio."""
    at = pos + 4 + head.side_info
    tag = bytes(b[at: at + 4])
    if tag in (b"Xing", b"Info"):
        flags = int.from_bytes(b[at + 4: at + 8], "big")
        p, frames = at + 8, None
        if flags & 1:
            frames = int.from_bytes(b[p: p + 4], "big")
            p += 4
        p += 4 * bool(flags & 2) + 100 * bool(flags & 4) + 4 * bool(flags & 8)  # byte count, TOC, quality
        delay = padding = 0
        if bytes(b[p: p + 4]) in (b"LAME", b"Lavc", b"Lavf", b"L3.9"):  # LAME tag: 9-byte encoder name, then
            d = bytes(b[p + 21: p + 24])  # ... delay and padding as two 12-bit numbers at offset 21
            if len(d) == 3:
                delay, padding = (d[0] << 4) | (d[1] >> 4), ((d[1] & 0x0F) << 8) | d[2]
        return frames, delay, padding
    vbri = pos + 4 + 32
    if bytes(b[vbri: vbri + 4]) == b"VBRI":  # version 2, delay 2, quality 2, bytes 4, frames 4
        return int.from_bytes(b[vbri + 14: vbri + 18], "big"), 0, 0
    return None


def first_frame(data: bytes) -> int | None:
    """Offset of the first MPEG frame (after ID3v2 tags and junk), or None when ``data`` is not an MP3."""
    if data[:4] in _OTHER_CONTAINERS:
        return None
    b = memoryview(data)
    found = _first_frame(b, _id3v2_end(b), _stream_end(b))
    return None if found is None else found[0]


def inspect(data: bytes) -> Mp3Stream | None:
    """Walk an MP3's frames; None when ``data`` is not an MPEG audio stream (WAV, FLAC, OGG, ... or garbage)."""
    if data[:4] in _OTHER_CONTAINERS:  # PCM or other codecs' bytes can happen to look like two MPEG frames
        return None
    b = memoryview(data)
    start, end = _id3v2_end(b), _stream_end(b)
    found = _first_frame(b, start, end)
    if found is None:
        return None
    pos, head = found
    declared, delay, padding = None, 0, 0
    vbr = _vbr_header(b, pos, head)
    if vbr is not None:
        declared, delay, padding = vbr
        pos += head.length
    frames, partial = 0, False
    while pos < end:
        frame = parse_header(b, pos)
        if frame is None:  # junk inside the stream: go on from the next real frame, if there is one
            if end - pos < 4:
                partial = b[pos] == 0xFF  # cut inside a frame's header
                break
            again = _first_frame(b, pos + 1, end)
            if again is None:
                break
            pos = again[0]
            continue
        if pos + frame.length > end:
            partial = True  # the stream ends inside this frame
            break
        frames += 1
        pos += frame.length
    return Mp3Stream(head.sample_rate, head.samples, frames, declared, end - pos, partial, delay, padding)
