import json

import numpy as np
import pandas as pd

from musiclm.audio import synth
from musiclm.audio.io import load_audio


def test_same_seed_same_files_other_seed_other_music(tmp_path):
    a = synth.write_corpus(tmp_path / "a", 3, seconds=4.0, seed=11)
    b = synth.write_corpus(tmp_path / "b", 3, seconds=4.0, seed=11)
    c = synth.write_corpus(tmp_path / "c", 3, seconds=4.0, seed=12)
    assert a == b and a != c
    for p in a:
        pa, pb = synth.track_path(tmp_path / "a", p.track_id), synth.track_path(tmp_path / "b", p.track_id)
        assert pa.read_bytes() == pb.read_bytes()
    assert (tmp_path / "a" / "fma_metadata" / "tracks.csv").read_text() == \
        (tmp_path / "b" / "fma_metadata" / "tracks.csv").read_text()


def test_corpus_is_varied_and_captions_follow_parameters():
    tracks = [synth.sample_params(i, 0, 10.0) for i in range(1, 41)]
    assert len({t.genre for t in tracks}) >= 4
    assert len({t.instrument for t in tracks}) >= 5 and len({t.drums for t in tracks}) >= 4
    assert len({t.key for t in tracks}) >= 10 and len({t.tempo for t in tracks}) >= 20
    for t in tracks:
        caption = t.caption()
        assert f"{t.tempo} BPM" in caption and t.key in caption and t.instrument in caption
        assert t.genre.lower() in caption


def test_rendered_audio_differs_between_tracks_and_tempo_is_audible():
    rate = 16000
    fast = synth.TrackParams(1, 150, 0, "major", [0, 4, 5, 3], "piano", "none", "four-on-the-floor", 8.0)
    slow = synth.TrackParams(1, 75, 0, "major", [0, 4, 5, 3], "piano", "none", "four-on-the-floor", 8.0)

    def beat_hz(params):
        x = synth.render(params, rate).mean(1)
        env = np.abs(x).reshape(-1, 160).mean(1)  # 100 Hz envelope
        spec = np.abs(np.fft.rfft(env - env.mean()))
        freqs = np.fft.rfftfreq(len(env), 1 / 100)
        band = (freqs > 0.8) & (freqs < 4.0)
        return freqs[band][spec[band].argmax()]

    assert abs(beat_hz(fast) - 2.5) < 0.15  # kick on every beat: 150 BPM = 2.5 Hz
    assert abs(beat_hz(slow) - 1.25) < 0.15
    a, b = synth.render(synth.sample_params(1, 0, 4.0), rate), synth.render(synth.sample_params(2, 0, 4.0), rate)
    assert abs(np.corrcoef(a[:, 0], b[:, 0])[0, 1]) < 0.5


def test_metadata_tables_in_fma_format(corpus):
    tracks = pd.read_csv(corpus / "fma_metadata" / "tracks.csv", index_col=0, header=[0, 1])
    assert tracks.index.name == "track_id" and len(tracks) == 6
    assert set(tracks[("track", "genre_top")]) <= set(synth.GENRES)
    genres = pd.read_csv(corpus / "fma_metadata" / "genres.csv")
    assert {"genre_id", "parent", "title", "top_level"} <= set(genres.columns)
    lines = [json.loads(l) for l in (corpus / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert (corpus / line["path"]).exists() and line["caption"].endswith(".")
        assert len(load_audio(corpus / line["path"], 8000)) > 8000 * 10
