"""CLAP parity with laion_clap, on fixtures made by laion_clap's own code (tests/data/laion_clap/README.md): its
checkpoints at the released architectures (HTSAT-tiny, HTSAT-base: every block, head and saved buffer; narrow
widths), converted by `init-token-system --clap-checkpoint`, must embed audio and text as laion_clap did, and the
key layout of the released full-size files must convert."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from musiclm.interop.laion_clap import (LaionClapError, check_conversion, clap_config, convert_laion_clap,
                                        read_laion_state)

FIXTURE = Path(__file__).parent / "data" / "laion_clap"
VARIANTS = ("htsat_tiny", "htsat_base")  # 630k-audioset-best.pt's architecture; LAION's music CLAPs'


def fixture_waveform(pcm: np.ndarray) -> np.ndarray:
    """The float32 samples make_fixture.py gave laion_clap (see its ``waveform``)."""
    return pcm.astype(np.float32) * np.float32(1.37) / np.float32(32767.0)


@pytest.fixture(scope="module", params=VARIANTS)
def converted_system(request, tmp_path_factory, tiny_system_dir):
    from jobs.init_token_system import main as init_main
    from musiclm.tokens.system import TokenSystem

    out = tmp_path_factory.mktemp("laion") / request.param
    encoders = Path(tiny_system_dir) / "encoders"  # the session's tiny encoders: nothing else to build
    init_main(["--out", str(out), "--clap-checkpoint", str(FIXTURE / f"{request.param}.pt"),
               "--semantic-encoder", str(encoders / "semantic"), "--encodec", str(encoders / "encodec"),
               "--clap-tokenizer", str(FIXTURE / "tokenizer"),
               "--set", "clap_rvq_cfg.dim=64", "clap_rvq_cfg.text_max_tokens=77"])  # laion_clap: 77 tokens
    return request.param, TokenSystem.load(out)


def test_converted_laion_clap_checkpoint_embeds_audio_and_text_as_laion_clap(converted_system):
    variant, system = converted_system
    clap = system.clap
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    audio = load_file(str(FIXTURE / "audio.safetensors"))
    summary = json.loads((FIXTURE / "summary.json").read_text())
    assert len(audio) == len(summary["clip_seconds"]) >= 8 and len(summary["captions"]) >= 8
    # the fixture has the shifted-window blocks whose saved masks the converter once refused
    assert len(summary["variants"][variant]["shifted_window_masks"]) == {"htsat_tiny": 5, "htsat_base": 8}[variant]
    for i, seconds in enumerate(summary["clip_seconds"]):
        ours = clap.audio_embeddings(fixture_waveform(audio[f"clip_{i}"]))
        assert ours.shape[0] == 1, seconds  # clips up to 10 s are one CLAP window
        cos = F.cosine_similarity(ours[0], torch.from_numpy(expected[f"{variant}.audio"][i]), dim=0)
        assert cos >= 0.9999, (variant, i, seconds, float(cos))  # measured: 1 - cos <= 6e-8 (both variants)
    ours = clap.text_embeddings(summary["captions"])
    cos = F.cosine_similarity(ours, torch.from_numpy(expected[f"{variant}.text"]), dim=1)
    assert bool((cos >= 0.9999).all()), (variant, cos)


def test_without_the_int16_round_trip_a_clipped_waveform_embeds_differently(converted_system, monkeypatch):
    """laion_clap clamps to [-1, 1] and quantizes to int16 before its features; the fixture's clip 3 exceeds full
    scale, so skipping that step is visible (shows the parity test can fail)."""
    import musiclm.tokens.clap as clap_module

    variant, system = converted_system
    monkeypatch.setattr(clap_module, "int16_round_trip", lambda x: np.asarray(x, np.float32))
    expected = load_file(str(FIXTURE / "expected.safetensors"))[f"{variant}.audio"][3]
    clip = load_file(str(FIXTURE / "audio.safetensors"))["clip_3"]
    ours = system.clap.audio_embeddings(fixture_waveform(clip))
    assert F.cosine_similarity(ours[0], torch.from_numpy(expected), dim=0) < 0.999


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_released_full_size_layouts_convert(variant):
    """Every key of the released files (630k-audioset-best.pt; the music CLAPs), as laion_clap's code lays them out
    at their real sizes, maps onto a transformers ClapModel of the sizes read from the shapes (built on the meta
    device: shapes, no weights)."""
    from transformers import ClapModel

    layout = json.loads((FIXTURE / "layout.json").read_text())[variant]
    state = {k: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
             for k, e in layout["keys"].items()}
    config = clap_config(state)
    audio, text = config.audio_config, config.text_config
    real = {"htsat_tiny": (96, [2, 2, 6, 2], 768), "htsat_base": (128, [2, 2, 12, 2], 1024)}[variant]
    assert (audio.patch_embeds_hidden_size, audio.depths, audio.hidden_size) == real
    assert (audio.num_attention_heads, audio.window_size, audio.num_mel_bins) == ([4, 8, 16, 32], 8, 64)
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, config.projection_dim) == (768, 12, 50265, 512)
    with torch.device("meta"):
        model = ClapModel(config)
    converted = check_conversion(state, model, variant)
    assert set(converted) | {k for k in model.state_dict() if k.endswith(("_ids", "relative_position_index"))} \
        == set(model.state_dict())


def test_a_saved_window_mask_that_transformers_would_not_compute_is_refused(tmp_path):
    """The converter drops laion_clap's saved shifted-window masks only after checking them against the ones
    transformers computes; a checkpoint of another window layout is refused by name, not loaded wrongly."""
    data = torch.load(FIXTURE / "htsat_tiny.pt", weights_only=True)
    state = data["state_dict"]
    state["module.audio_branch.layers.2.blocks.3.attn_mask"] = torch.zeros_like(
        state["module.audio_branch.layers.2.blocks.3.attn_mask"])
    torch.save(data, tmp_path / "bad_mask.pt")
    with pytest.raises(LaionClapError, match=r"layers\.2\.blocks\.3\.attn_mask"):
        convert_laion_clap(tmp_path / "bad_mask.pt", str(FIXTURE / "tokenizer"))
    del state["module.audio_branch.layers.2.blocks.3.attn_mask"]
    torch.save(data, tmp_path / "no_mask.pt")
    with pytest.raises(LaionClapError, match=r"layers\.2\.blocks\.3\.attn_mask is missing"):
        convert_laion_clap(tmp_path / "no_mask.pt", str(FIXTURE / "tokenizer"))


def test_a_checkpoint_that_is_not_plain_tensors_needs_trust_pickle(tmp_path):
    import argparse

    state = read_laion_state(FIXTURE / "htsat_tiny.pt")
    assert "text_branch.embeddings.word_embeddings.weight" in state  # the "module." prefix is gone
    # training scripts save their arguments beside the weights; weights_only loading refuses them
    torch.save({"state_dict": {"module.x": torch.ones(1)}, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "pickled.pt")
    with pytest.raises(LaionClapError, match="--trust-pickle"):
        read_laion_state(tmp_path / "pickled.pt")
    assert list(read_laion_state(tmp_path / "pickled.pt", trust_pickle=True)) == ["x"]

    with pytest.raises(LaionClapError, match="lacks"):
        clap_config({"x": torch.zeros(1)})
    with pytest.raises(LaionClapError, match="fusion"):
        clap_config({**state, "audio_branch.fusion_model.local_att.0.weight": torch.zeros(1)})
