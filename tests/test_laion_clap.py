"""CLAP parity with laion_clap, on a fixture made by laion_clap's own code (tests/data/laion_clap/README.md):
its checkpoint converted by `init-token-system --clap-checkpoint` must embed audio and text as laion_clap did."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from musiclm.tokens.laion_clap import LaionClapError, read_laion_state

FIXTURE = Path(__file__).parent / "data" / "laion_clap"


def fixture_waveform(pcm: np.ndarray) -> np.ndarray:
    """The float32 samples make_fixture.py gave laion_clap (see its ``waveform``)."""
    return pcm.astype(np.float32) * np.float32(1.37) / np.float32(32767.0)


@pytest.fixture(scope="module")
def converted_system(tmp_path_factory, tiny_system_dir):
    from jobs.init_token_system import main as init_main
    from musiclm.tokens.system import TokenSystem

    out = tmp_path_factory.mktemp("laion") / "ts"
    encoders = Path(tiny_system_dir) / "encoders"  # the session's tiny encoders: nothing else to build
    init_main(["--out", str(out), "--clap-checkpoint", str(FIXTURE / "clap_random.pt"),
               "--semantic-encoder", str(encoders / "semantic"), "--encodec", str(encoders / "encodec"),
               "--clap-tokenizer", str(FIXTURE / "tokenizer"),
               "--set", "clap_rvq_cfg.dim=64", "clap_rvq_cfg.text_max_tokens=77"])  # laion_clap: 77 tokens
    return TokenSystem.load(out)


def test_converted_laion_clap_checkpoint_embeds_audio_and_text_as_laion_clap(converted_system):
    clap = converted_system.clap
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    audio = load_file(str(FIXTURE / "audio.safetensors"))
    summary = json.loads((FIXTURE / "summary.json").read_text())
    assert len(audio) == len(summary["clip_seconds"]) >= 8 and len(summary["captions"]) >= 8
    for i, seconds in enumerate(summary["clip_seconds"]):
        ours = clap.audio_embeddings(fixture_waveform(audio[f"clip_{i}"]))
        assert ours.shape[0] == 1, seconds  # clips up to 10 s are one CLAP window
        cos = F.cosine_similarity(ours[0], torch.from_numpy(expected["audio"][i]), dim=0)
        assert cos >= 0.9999, (i, seconds, float(cos))  # measured: 1 - cos < 2e-7
    ours = clap.text_embeddings(summary["captions"])
    cos = F.cosine_similarity(ours, torch.from_numpy(expected["text"]), dim=1)
    assert bool((cos >= 0.9999).all()), cos


def test_without_the_int16_round_trip_a_clipped_waveform_embeds_differently(converted_system, monkeypatch):
    """laion_clap clamps to [-1, 1] and quantizes to int16 before its features; the fixture's clip 3 exceeds full
    scale, so skipping that step is visible (shows the parity test can fail)."""
    import musiclm.tokens.clap as clap_module

    monkeypatch.setattr(clap_module, "int16_round_trip", lambda x: np.asarray(x, np.float32))
    expected = load_file(str(FIXTURE / "expected.safetensors"))["audio"][3]
    clip = load_file(str(FIXTURE / "audio.safetensors"))["clip_3"]
    ours = converted_system.clap.audio_embeddings(fixture_waveform(clip))
    assert F.cosine_similarity(ours[0], torch.from_numpy(expected), dim=0) < 0.999


def test_a_checkpoint_that_is_not_plain_tensors_needs_trust_pickle(tmp_path):
    import argparse

    state = read_laion_state(FIXTURE / "clap_random.pt")
    assert "text_branch.embeddings.word_embeddings.weight" in state  # the "module." prefix is gone
    # training scripts save their arguments beside the weights; weights_only loading refuses them
    torch.save({"state_dict": {"module.x": torch.ones(1)}, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "pickled.pt")
    with pytest.raises(LaionClapError, match="--trust-pickle"):
        read_laion_state(tmp_path / "pickled.pt")
    assert list(read_laion_state(tmp_path / "pickled.pt", trust_pickle=True)) == ["x"]

    from musiclm.tokens.laion_clap import clap_config

    with pytest.raises(LaionClapError, match="lacks"):
        clap_config({"x": torch.zeros(1)})
    with pytest.raises(LaionClapError, match="fusion"):
        clap_config({**state, "audio_branch.fusion_model.local_att.0.weight": torch.zeros(1)})
