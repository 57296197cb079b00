"""open-musiclm's released files, as its own code writes them (tests/data/open_musiclm_files/, made by open-musiclm
commit 8e2c6a8 with vector_quantize_pytorch 1.2.2 and 1.32.0 and scikit-learn 1.2.2; its README says how):
- the three stage state dicts of `musiclm_large_small_context.json` at their real size, key by key;
- the CLAP RVQ as `ClapRVQTrainer` saves it, fitted by open-musiclm's `ClapQuantized` on the audio embeddings of
  laion_clap's HTSAT-tiny (the narrow fixture of tests/data/laion_clap): imported here, the token system gives the
  clap token ids open-musiclm's `ClapQuantized` gave for the same clips and captions;
- the k-means joblib as `learn_kmeans` writes it with the scikit-learn of the release's time.
(The stage transformers' function is tested against open-musiclm's logits in test_import.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from musiclm.interop.open_musiclm import convert_rvq, convert_transformer, load_kmeans_centers, load_torch_state

DATA = Path(__file__).parent / "data"
FILES = DATA / "open_musiclm_files"
LAION = DATA / "laion_clap"
RELEASED_JSON = DATA / "open_musiclm_large_small_context.json"
VQP = ("1.2.2", "1.32.0")  # open-musiclm's minimum vector_quantize_pytorch, and the newest


def layout_tensors(keys: dict, real=lambda key: False) -> dict[str, torch.Tensor]:
    """Tensors of a layout.json entry: on the meta device (shapes only), zeros where ``real(key)``."""
    return {k: (torch.zeros if real(k) else lambda s, dtype: torch.empty(s, dtype=dtype, device="meta"))(
        e["shape"], dtype=getattr(torch, e["dtype"])) for k, e in keys.items()}


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_the_released_stage_layouts_convert_at_their_real_size(stage):
    from musiclm.config import load_model_config

    layout = json.loads((FILES / "layout.json").read_text())
    cfg = load_model_config(RELEASED_JSON)
    theirs = layout_tensors(layout[stage], real=lambda k: k.endswith(".beta"))  # betas are checked to be zero
    ours = convert_transformer(theirs, stage, cfg, f"{stage}.transformer.pt")
    params = sum(v.numel() for v in ours.values())
    # open-musiclm's own counts for the released stages (REFERENCE.md: 283M / 289M / 297M)
    assert round(params / 1e6) == {"semantic": 283, "coarse": 289, "fine": 298}[stage], params


@pytest.fixture(scope="module")
def laion_system(tmp_path_factory, tiny_system_dir):
    """A token system whose CLAP is the laion_clap fixture's HTSAT-tiny, with an RVQ of the fixture's sizes."""
    from jobs.init_token_system import main as init_main
    from musiclm.tokens.system import TokenSystem

    out = tmp_path_factory.mktemp("released") / "ts"
    encoders = Path(tiny_system_dir) / "encoders"
    init_main(["--out", str(out), "--clap-checkpoint", str(LAION / "htsat_tiny.pt"),
               "--semantic-encoder", str(encoders / "semantic"), "--encodec", str(encoders / "encodec"),
               "--clap-tokenizer", str(LAION / "tokenizer"),
               "--set", "clap_rvq_cfg.dim=64", "clap_rvq_cfg.codebook_size=64", "clap_rvq_cfg.text_max_tokens=77"])
    return TokenSystem.load(out)


@pytest.mark.parametrize("version", VQP)
def test_an_imported_rvq_gives_the_clap_tokens_open_musiclm_gives(version, laion_system):
    from musiclm.tokens.system import new_rvq

    expected = load_file(str(FILES / f"rvq.vqp-{version}.safetensors"))
    c = laion_system.config.clap_rvq_cfg
    state = load_torch_state(FILES / f"clap.rvq.vqp-{version}.pt", "--rvq")
    rvq = new_rvq(laion_system.config)
    rvq.load_tensors(convert_rvq(state, c.rq_num_quantizers, c.codebook_size, c.dim), "fixture")
    # the RVQ alone, on the 1,024 CLAP embeddings it was fitted on: every id as vector_quantize_pytorch gave it
    ids = rvq.encode(torch.from_numpy(expected["embeddings"])).numpy()
    assert ids.shape == expected["ids"].shape == (1024, 12)
    assert np.array_equal(ids, expected["ids"]), (ids != expected["ids"]).mean()
    # the whole path: audio and captions -> our converted CLAP -> the imported RVQ, as open-musiclm's ClapQuantized
    laion_system.set_rvq(rvq)
    audio = load_file(str(LAION / "audio.safetensors"))
    captions = json.loads((LAION / "summary.json").read_text())["captions"]
    clap = laion_system.clap
    for i in range(len(audio)):
        wave = audio[f"clip_{i}"].astype(np.float32) * np.float32(1.37) / np.float32(32767.0)
        assert np.array_equal(clap.audio_tokens(wave)[0], expected["audio_ids"][i]), i
    assert np.array_equal(clap.text_tokens(captions), expected["text_ids"])
    assert len(np.unique(expected["audio_ids"][:, 0])) > 1  # the clips do not all share their first code


@pytest.mark.parametrize("version", VQP)
def test_the_released_rvq_layout_converts_at_its_real_size(version):
    layout = json.loads((FILES / f"rvq_layout.vqp-{version}.json").read_text())["keys"]
    tensors = convert_rvq(layout_tensors(layout, real=lambda k: True), 12, 1024, 512, "clap.rvq.950_no_fusion.pt")
    assert tuple(tensors["codebooks"].shape) == (12, 1024, 512)


def test_a_release_era_kmeans_joblib_loads_and_assigns_as_scikit_learn_predicts():
    expected = load_file(str(FILES / "kmeans.sklearn-1.2.2.safetensors"))
    with pytest.warns(Warning):  # scikit-learn says the pickle is from another version; we read its centers only
        centers = load_kmeans_centers(FILES / "kmeans.sklearn-1.2.2.joblib", trust_pickle=True)
    assert np.array_equal(centers, expected["centers"])
    from musiclm.tokens.kmeans import nearest

    ids = nearest(torch.from_numpy(expected["features"]), torch.from_numpy(centers)).numpy()
    assert np.array_equal(ids, expected["ids"])


def test_check_clap_rvq_names_the_clap_an_rvq_was_fitted_on(tmp_path):
    """The released RVQ does not say which CLAP it belongs to (docs/importing-open-musiclm.md, "Which CLAP"). The fixture's RVQs were fitted
    by open-musiclm's ClapQuantized on the HTSAT-tiny CLAP's embeddings: `musiclm check-clap-rvq` must tell that
    CLAP from the HTSAT-base one by how well the RVQ reconstructs each one's embeddings of the same music."""
    import soundfile as sf

    from jobs.check_clap_rvq import main

    audio = load_file(str(LAION / "audio.safetensors"))
    (tmp_path / "music").mkdir()
    for name, pcm in audio.items():
        sf.write(tmp_path / "music" / f"{name}.wav", pcm, 48000, subtype="PCM_16")
    for version in VQP:
        residuals = main(["--rvq", str(FILES / f"clap.rvq.vqp-{version}.pt"), "--audio", str(tmp_path / "music"),
                          "--candidate", f"tiny={LAION / 'htsat_tiny.pt'}",
                          "--candidate", f"base={LAION / 'htsat_base.pt'}", "--json", str(tmp_path / "r.json")])
        assert json.loads((tmp_path / "r.json").read_text()) == residuals
        assert residuals["tiny"] * 3 < residuals["base"], (version, residuals)
