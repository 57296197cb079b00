"""Semantic tokens as open-musiclm makes them, on a fixture made by its own code
(tests/data/open_musiclm_semantic/README.md): its preprocessing dataset (`SoundDatasetForPreprocessing`, with
torchaudio's resampler) and `HfHubertWithKmeans` on the same audio, HuBERT weights and k-means centers.

Our side runs as preprocessing runs it: `decode_track` (decode, pad, `tokenizer_inputs`) then the tokenizer
actor's `Tokenizer.tokens`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

FIXTURE = Path(__file__).parent / "data" / "open_musiclm_semantic"
CASES = ("track_44k_mono", "short_22k_stereo")


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def fixture_system(tmp_path_factory, tiny_system_dir):
    """A token system with the fixture's HuBERT and k-means centers (CLAP and EnCodec: the session's tiny)."""
    import torch

    from jobs.init_token_system import main as init_main
    from musiclm.tokens.system import TokenSystem

    out = tmp_path_factory.mktemp("oml_semantic") / "ts"
    encoders = Path(tiny_system_dir) / "encoders"
    init_main(["--out", str(out), "--clap", str(encoders / "clap"), "--encodec", str(encoders / "encodec"),
               "--semantic-encoder", str(FIXTURE / "hubert"), "--set", "hubert_kmeans_cfg.codebook_size=256"])
    system = TokenSystem.load(out)
    system.set_rvq(TokenSystem.load(tiny_system_dir).rvq)
    system.set_kmeans(torch.from_numpy(load_file(str(FIXTURE / "kmeans.safetensors"))["centers"]))
    system.save()
    return out


@pytest.fixture(scope="module")
def rows(fixture_system) -> dict[str, dict]:
    """Each fixture file as preprocessing's decode task turns it into a row (one 30 s clip per track)."""
    from musiclm.config import DataConfig
    from musiclm.data.preprocess import decode_local, prepare
    from musiclm.data.sources import open_source

    job = prepare(open_source(FIXTURE / "audio"), fixture_system, fixture_system.parent / "dataset", DataConfig(),
                  log=lambda m: None)
    return {Path(track.path).stem: row for track in job.pending for row in decode_local(job, track)}


def test_fixture_covers_a_full_track_and_a_short_stereo_one():
    summary = json.loads((FIXTURE / "summary.json").read_text())
    cases = summary["cases"]
    assert cases["track_44k_mono.flac"]["ids"] == 1499 and cases["track_44k_mono.flac"]["seconds"] >= 29.5
    assert cases["short_22k_stereo.flac"]["channels"] == 2 and cases["short_22k_stereo.flac"]["seconds"] < 10
    assert summary["open_musiclm_commit"].startswith("8e2c6a8")


def test_each_tokenizer_reads_the_waveform_open_musiclm_gives_it(rows, expected):
    """Normalized over the whole padded track at its own rate, then torchaudio's sinc resampling (semantic);
    resampled then quantized to int16 (CLAP at 48 kHz, EnCodec at 24 kHz)."""
    for case in CASES:
        wave, ours = expected[f"wave.{case}"], rows[case]["audio_semantic"]
        assert ours.shape == wave.shape, case
        assert np.abs(ours - wave).max() < 1e-5, (case, float(np.abs(ours - wave).max()))  # measured: 7.2e-7
    from musiclm.audio.io import decode_audio
    from musiclm.data.clips import pad_clip
    from musiclm.tokens.system import tokenizer_inputs

    audio, rate = decode_audio(FIXTURE / "audio" / "short_22k_stereo.flac")
    # the rows carry CLAP's features, not its waveform: that comes from the function decode_track calls
    clap = tokenizer_inputs(pad_clip(audio, rate, 10), rate, {"clap": 48000, "semantic": 16000, "acoustic": 24000})["clap"]
    for field, wave in (("clap_pcm", clap), ("acoustic_pcm", rows["short_22k_stereo"]["audio_acoustic"])):
        pcm = expected[f"{field}.short_22k_stereo"]
        ours = np.round(wave * 32767).astype(np.int64)
        assert ours.shape == pcm.shape, field
        off = np.abs(ours - pcm)
        # measured: 99.99 % equal, the rest one step apart (float32 rounding before the truncation to int16)
        assert off.max() <= 1 and (off == 0).mean() >= 0.999, (field, int(off.max()), float((off == 0).mean()))


def test_semantic_ids_equal_open_musiclms_on_30_s_of_audio(fixture_system, rows, expected):
    from musiclm.data.preprocess import Tokenizer
    from musiclm.tokens.system import read_meta

    tokenizer = Tokenizer(str(fixture_system), read_meta(fixture_system)[0]["fingerprint"], "cpu", 0)
    for case in CASES:
        ids = tokenizer.tokens(rows[case])["semantic"].astype(np.int64)
        want = expected[f"ids.{case}"]
        assert ids.shape == want.shape, case
        assert (ids == want).mean() >= 0.999, (case, float((ids == want).mean()))  # measured: 1.0 on both


def test_the_semantic_features_match_before_the_k_means(fixture_system, expected):
    """The encoder itself (transformers' HubertModel, layer 7, per-frame normalization) given open-musiclm's
    waveform: a failure here is the model, above it the waveform handling."""
    from musiclm.tokens.system import TokenSystem

    semantic = TokenSystem.load(fixture_system).semantic
    for case in CASES:
        feats = semantic.features(expected[f"wave.{case}"]).numpy()
        assert np.abs(feats - expected[f"embed.{case}"]).max() < 1e-4, case  # measured: 5.1e-6


def test_soxr_and_per_clip_normalization_would_not_be_open_musiclms(fixture_system, expected):
    """What the tokenizer did before: the same audio resampled with soxr and normalized per 16 kHz clip gives
    another ~1 % of ids. The fixture tells the two apart."""
    from musiclm.audio.io import decode_audio, resample
    from musiclm.data.clips import pad_clip
    from musiclm.tokens.system import TokenSystem

    semantic = TokenSystem.load(fixture_system).semantic
    audio, rate = decode_audio(FIXTURE / "audio" / "short_22k_stereo.flac")
    x = resample(pad_clip(audio, rate, 10), rate, 16000)
    ids = semantic.tokens((x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-7))
    assert (ids == expected["ids.short_22k_stereo"]).mean() < 0.995
