"""fit-codec: the token system's EnCodec trained to reconstruct a corpus, its codebooks kept in use."""
from __future__ import annotations

import numpy as np
import pytest


def _segments_of(corpus, ids, seconds: float = 0.5, per_track: int = 4, seed: int = 0) -> np.ndarray:
    from musiclm.audio import synth
    from musiclm.tokens.codec_training import _segments

    return np.stack([r["audio"] for i in ids for r in _segments(
        {"id": str(i), "path": str(synth.track_path(corpus, i))}, 24000, seconds, per_track, 320, 30, seed)])


def test_data_init_makes_a_random_codecs_latents_move_and_its_codes_spread(corpus, tiny_system):
    """The random tiny EnCodec's latents hardly move in time (biases outweigh the signal); data_init makes them
    carry it, and its k-means codebooks spread the codes of held-out audio over each codebook."""
    from musiclm.tokens.codec_training import data_init, latent_motion, log_mel_distance

    from musiclm.tokens.encoders import load_encodec

    codec = load_encodec(str(tiny_system.root / "encoders" / "encodec"))
    train, held = _segments_of(corpus, [1, 2, 3, 4], per_track=16), _segments_of(corpus, [5, 6], seed=1)
    assert latent_motion(codec, train) < 0.1
    _, codes = log_mel_distance(codec, held, 6.0, "cpu")
    before = [len(np.unique(codes[:, q])) for q in range(8)]
    data_init(codec, train, num_quantizers=8)
    assert latent_motion(codec, train) > 0.5
    distance, codes = log_mel_distance(codec, held, 6.0, "cpu")
    after = [len(np.unique(codes[:, q])) for q in range(8)]
    assert np.isfinite(distance) and min(after) >= 0.3 * len(codes) * codes.shape[-1] / 8, (before, after)


def test_fit_codec_options_are_its_settings_and_a_bad_init_is_refused(capsys):
    """`musiclm fit-codec`'s options build CodecTrainConfig (the job on Ray runs in the pipeline test: the demo trains
    its tiny EnCodec with it, and that test checks the report's reconstruction and codes in use)."""
    from jobs.common import settings_of
    from jobs.fit_codec import parser
    from musiclm.tokens.codec_training import CodecTrainConfig

    args = parser().parse_args(["--source", "corpus", "--token-system", "ts", "--steps", "7", "--init", "keep",
                                "--segment-seconds", "0.5"])
    cfg = settings_of(CodecTrainConfig, args)
    assert (cfg.steps, cfg.init, cfg.segment_seconds, cfg.lr) == (7, "keep", 0.5, CodecTrainConfig().lr)
    with pytest.raises(SystemExit):
        parser().parse_args(["--source", "corpus", "--token-system", "ts", "--init", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
