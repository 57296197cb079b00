import dataclasses
import json

import numpy as np
import pytest
import torch

from musiclm.audio.io import list_audio_files, load_audio, resample
from musiclm.config import model_preset
from musiclm.tokens import encoders
from musiclm.tokens.system import KMEANS_FILE, RVQ_FILE, TokenSystem, TokenSystemError


@pytest.fixture(scope="module")
def ten_seconds(corpus):
    return load_audio(list_audio_files(corpus)[1], 44100)[: 10 * 44100]


def test_token_shapes_and_rates_for_ten_seconds(tiny_system, ten_seconds):
    tokens = tiny_system.tokenize(ten_seconds, 44100)
    assert tokens["clap"].shape == (1, 12)
    assert tokens["semantic"].shape == (499,)  # 50 Hz
    assert tokens["coarse"].shape == (750, 3) and tokens["fine"].shape == (750, 5)  # 75 Hz
    for name, t in tokens.items():
        assert t.min() >= 0 and t.max() < 1024, name
    # the tiny EnCodec's codebooks were fitted, so codes vary (a random EnCodec gives 0 everywhere)
    assert all(len(np.unique(tokens["coarse"][:, q])) > 50 for q in range(3))
    assert len(np.unique(tokens["semantic"])) > 20


def test_clap_windows_follow_the_hop(tiny_system, corpus):
    audio = load_audio(list_audio_files(corpus)[0], 48000)  # 11 s: 10 s windows every 1 s -> 2 windows
    assert tiny_system.clap.audio_tokens(audio).shape == (2, 12)
    assert tiny_system.clap.audio_tokens(audio[:48000 * 3]).shape == (1, 12)  # short audio: one window


def test_text_goes_through_the_same_rvq(tiny_system):
    texts = ["an upbeat rock track", "a melancholic ambient pad"]
    tokens = tiny_system.clap.text_tokens(texts)
    assert tokens.shape == (2, 12)
    assert np.array_equal(tokens, tiny_system.rvq.encode(tiny_system.clap.text_embeddings(texts)).numpy())


def test_decode_of_encode_has_the_right_length(tiny_system, ten_seconds):
    wav24 = resample(ten_seconds, 44100, 24000)
    codes = tiny_system.acoustic.encode(wav24)
    out = tiny_system.acoustic.decode(codes)
    assert out.shape == (240000,) and np.isfinite(out).all()
    # A batch runs other convolution kernels than one clip, so its floats differ in the last bits, and the
    # residual quantizer turns a near-tie into another code (every later level of that frame follows): batched
    # codes are not bit-identical to single-clip codes on every CPU (here 98.1-99.9 % of frames equal). What
    # holds is asserted; preprocessing encodes each track on its own, so its tokens do not depend on the batch
    # (tests/test_preprocess.py::test_a_tracks_tokens_do_not_depend_on_its_batch).
    batch = tiny_system.acoustic.encode(np.stack([wav24, wav24]))
    assert batch.shape == (2, 750, 8)
    for one in batch:
        assert (one == codes).all(axis=1).mean() >= 0.9


def test_save_load_round_trip_is_identical(tiny_system, tiny_system_dir, ten_seconds, tmp_path):
    copy = tmp_path / "copy"
    tiny_system.save(copy)
    (copy / "encoders").symlink_to(tiny_system_dir / "encoders")
    again = TokenSystem.load(copy)
    assert again.fingerprint == tiny_system.fingerprint
    a, b = tiny_system.tokenize(ten_seconds, 44100), again.tokenize(ten_seconds, 44100)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert json.loads((copy / "token_system.json").read_text())["fingerprint"] == again.fingerprint


@pytest.mark.parametrize("victim,tensor,part", [
    (RVQ_FILE, "codebooks", "clap_rvq"), (KMEANS_FILE, "centers", "semantic_kmeans"),
    ("encoders/semantic/model.safetensors", None, "semantic_weights")])
def test_altered_files_change_the_fingerprint(tiny_system_dir, tmp_path, victim, tensor, part):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "altered"
    shutil.copytree(tiny_system_dir, copy)
    tensors = load_file(str(copy / victim))
    name = tensor or sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(copy / victim))
    with pytest.raises(TokenSystemError, match=rf"modified after it was written: .*{part}"):
        TokenSystem.load(copy)
    assert TokenSystem.load(copy, verify=False).fingerprint != TokenSystem.load(tiny_system_dir).fingerprint


def test_real_loading_path_from_save_pretrained_weights(tmp_path):
    """Weights saved with save_pretrained into a directory load through the same code as hub weights."""
    clap_dir, hubert_dir, encodec_dir = tmp_path / "clap", tmp_path / "mert", tmp_path / "encodec"
    clap, processor = encoders.build_tiny_clap(seed=5)
    clap.save_pretrained(clap_dir)
    processor.save_pretrained(clap_dir)
    hubert = encoders.build_tiny_hubert(seed=5)
    hubert.save_pretrained(hubert_dir)
    encodec = encoders.build_tiny_encodec(seed=5, num_clips=4, clip_seconds=4.0)
    encodec.save_pretrained(encodec_dir)
    config = model_preset("tiny").token_system()
    config = dataclasses.replace(
        config, clap_rvq_cfg=dataclasses.replace(config.clap_rvq_cfg, model_name=str(clap_dir)),
        hubert_kmeans_cfg=dataclasses.replace(config.hubert_kmeans_cfg, model_name=str(hubert_dir)),
        encodec_cfg=dataclasses.replace(config.encodec_cfg, model_name=str(encodec_dir)))
    system = TokenSystem.create(config, tmp_path / "ts")
    parts = system.fingerprint_parts()
    assert parts["semantic_weights"] == encoders.weights_identity(hubert)
    assert parts["encodec_weights"] == encoders.weights_identity(encodec)
    assert parts["clap_weights"] == encoders.weights_identity(clap)
    assert not (tmp_path / "ts" / "encoders").exists()  # nothing copied: the directories are referenced
    loaded = TokenSystem.load(tmp_path / "ts")
    assert loaded.fingerprint == system.fingerprint
    assert loaded.config.hubert_kmeans_cfg.model_name == str(hubert_dir)


def test_bad_sources_and_settings_are_refused(tmp_path):
    config = model_preset("tiny").token_system()
    missing = dataclasses.replace(config, encodec_cfg=dataclasses.replace(config.encodec_cfg,
                                                                          model_name=str(tmp_path / "nothing")))
    with pytest.raises(encoders.EncoderLoadError, match=r"encodec encoder from .*nothing"):
        TokenSystem.create(missing, tmp_path / "a")
    hubert_dir = tmp_path / "mert"
    encoders.build_tiny_hubert(seed=1).save_pretrained(hubert_dir)  # 7 layers
    deep = dataclasses.replace(config, hubert_kmeans_cfg=dataclasses.replace(
        config.hubert_kmeans_cfg, model_name=str(hubert_dir), embed_layer=9))
    with pytest.raises(TokenSystemError, match="embed_layer is 9 but the semantic encoder has 7 layers"):
        TokenSystem.create(deep, tmp_path / "b")
    with pytest.raises(TokenSystemError, match="not a token system"):
        TokenSystem.load(tmp_path / "empty")


def test_unfitted_and_existing_systems_are_refused(tmp_path, ten_seconds):
    system = TokenSystem.create(model_preset("tiny").token_system(), tmp_path / "ts")
    with pytest.raises(TokenSystemError, match="fit-rvq and fit-kmeans"):
        system.tokenize(ten_seconds, 44100)
    with pytest.raises(TokenSystemError, match="already holds a token system"):
        TokenSystem.create(model_preset("tiny").token_system(), tmp_path / "ts")
    with pytest.raises(TokenSystemError, match=r"centers have shape \(3, 64\)"):
        system.set_kmeans(torch.zeros(3, 64))


def test_clap_features_equal_the_feature_extractor_per_window(tiny_system, corpus):
    """The shared-frame CLAP featurizer gives exactly the transformers extractor's per-window features (of the
    int16-quantized waveform, as laion_clap quantizes it)."""
    from musiclm.tokens.clap import int16_round_trip

    featurizer = tiny_system.clap.featurizer
    audio = load_audio(list_audio_files(corpus)[0], 48000)
    fast = featurizer(audio)
    slow = featurizer.feature_extractor(list(featurizer.windows(int16_round_trip(audio))), sampling_rate=48000,
                                        truncation="rand_trunc", padding="repeatpad", return_tensors="np")
    assert fast.shape == (2, 1, 1001, 64)
    np.testing.assert_allclose(fast, slow["input_features"], rtol=0, atol=1e-4)
