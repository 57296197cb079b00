import numpy as np
import pytest
import soundfile as sf

from musiclm.audio.io import (AudioDecodeError, crop_or_pad, decode_audio, list_audio_files, load_audio, window_starts,
                              write_wav)


@pytest.fixture(scope="module")
def mp3(corpus):
    return list_audio_files(corpus)[0]


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_synthetic_mp3_decodes_at_requested_rate(mp3, rate):
    audio = load_audio(mp3, rate)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 11.0 * rate) <= 0.01 * rate  # the corpus tracks are 11 s long
    assert 0.01 < np.abs(audio).max() <= 1.0


def test_max_seconds_keeps_the_start(mp3):
    full = load_audio(mp3, 16000)
    head = load_audio(mp3, 16000, max_seconds=4.0)
    assert abs(len(head) - 64000) <= 16
    assert np.allclose(head[:60000], full[:60000], atol=1e-3)


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_other_formats_decode(tmp_path, fmt, ext):
    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1).astype(np.float32) * 0.5
    path = tmp_path / f"x.{ext}"
    sf.write(str(path), stereo, 44100, format=fmt)
    audio, rate = decode_audio(path)
    assert rate == 44100 and audio.ndim == 1 and abs(len(audio) - len(t)) < 2000
    assert abs(len(load_audio(path, 24000)) - 48000) < 1200


def test_bytes_input_names_the_path(mp3):
    data = open(mp3, "rb").read()
    audio, _ = decode_audio(data, 16000, path=mp3)
    assert len(audio) > 16000
    with pytest.raises(AudioDecodeError, match="tracks/bad.mp3"):
        decode_audio(b"", 16000, path="tracks/bad.mp3")


def _bad_files(tmp_path, mp3):
    data = open(mp3, "rb").read()
    (tmp_path / "truncated.mp3").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "text.mp3").write_text("this is not audio\n" * 50)
    return {"truncated.mp3": "truncated", "empty.mp3": "empty", "text.mp3": "not a decodable audio file"}


def test_bad_files_raise_one_clear_error(tmp_path, mp3):
    for name, reason in _bad_files(tmp_path, mp3).items():
        with pytest.raises(AudioDecodeError) as info:
            load_audio(tmp_path / name, 16000)
        assert info.value.path == str(tmp_path / name)
        assert reason in info.value.reason and str(tmp_path / name) in str(info.value)
    with pytest.raises(AudioDecodeError, match="cannot read file"):
        load_audio(tmp_path / "missing.mp3", 16000)


def test_crop_pad_and_windows():
    x = np.arange(10, dtype=np.float32)
    assert crop_or_pad(x, 4, offset=3).tolist() == [3, 4, 5, 6]
    assert crop_or_pad(x, 6, offset=7).tolist() == [7, 8, 9, 0, 0, 0]
    assert window_starts(100, 40, 20) == [0, 20, 40, 60]
    assert window_starts(30, 40, 20) == [0]


def test_write_wav_round_trip(tmp_path):
    x = (0.5 * np.sin(np.arange(24000) / 10)).astype(np.float32)
    path = write_wav(tmp_path / "sub" / "a.wav", x, 24000)
    y, rate = decode_audio(path)
    assert rate == 24000 and np.allclose(x, y, atol=1e-4)


def test_as_written_is_exactly_what_the_wav_file_holds(tmp_path):
    """Generation scores the audio as written: loud samples too must survive the 16-bit round trip."""
    from musiclm.audio.io import as_written

    x = np.random.default_rng(0).uniform(-1.2, 1.2, 24000).astype(np.float32)  # includes clipping
    scored = as_written(x)
    back, _ = sf.read(write_wav(tmp_path / "a.wav", scored, 24000), dtype="float32")
    assert np.array_equal(back, scored) and np.abs(scored - np.clip(x, -1, 1)).max() <= 1 / 32768 + 1e-7


def test_intact_mp3s_of_every_kind_decode_and_cut_ones_are_caught_or_shorter(tmp_path):
    """A small corpus from musiclm.audio.mp3_corpus (FFmpeg and libsndfile encoders, CBR/VBR, 8-44.1 kHz, with and
    without a Xing header, ID3 tags, digital silence, a WAV named .mp3), each intact and cut at 33/50/90/99 % of
    its bytes and at a frame boundary. benchmarks/truncation.py runs the full corpus."""
    from musiclm.audio import mp3_corpus

    files = mp3_corpus.write(tmp_path, mp3_corpus.small_variants(seconds=4.0))
    kept_cut = []
    for f in files:
        if not f.cut:
            audio, rate = decode_audio(f.path)  # never rejected
            assert abs(len(audio) / rate - f.intact_seconds) < 0.1, f.path.name
            continue
        try:
            audio, rate = decode_audio(f.path)
        except AudioDecodeError as e:
            assert e.kind == "truncated", (f.path.name, e.reason)
            continue
        assert len(audio) / rate < f.intact_seconds - 0.01, f.path.name  # kept: its real, shorter length
        kept_cut.append(f.path.name)
    # only a cut exactly between two frames of an MP3 without a Xing header passes as a shorter file
    assert all(name.endswith(".cutframe.mp3") and "noxing" in name for name in kept_cut), kept_cut


def test_the_length_libsndfile_estimates_for_an_mp3_without_xing_header_is_not_truncation(tmp_path):
    """libsndfile estimates an MP3's length from its size when no Xing/VBRI header gives it, and overshoots:
    an intact file must not be rejected for that."""
    import soundfile as sf

    from musiclm.audio import mp3, mp3_corpus

    v = mp3_corpus.Variant("silence-22k-mono-noxing", "ffmpeg", 22050, 1, kbps=64, xing=False, id3v1=True,
                           content="silence", seconds=30.0)
    path = mp3_corpus.write(tmp_path, [v], cuts=(), frame_cut=False)[0].path
    stream = mp3.inspect(path.read_bytes())
    assert stream.declared_frames is None and stream.truncation() is None and stream.tail_bytes == 0
    audio, rate = decode_audio(path)
    assert abs(len(audio) / rate - 30.0) < 0.1
    assert sf.info(str(path)).frames > len(audio)  # what libsndfile declares exceeds what decodes
