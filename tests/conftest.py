"""Shared fixtures: a small synthetic corpus and a fitted tiny token system (built once per test session)."""
from __future__ import annotations

import pytest

from musiclm import synth
from musiclm.audio import list_audio_files
from musiclm.config import model_preset
from musiclm.tokens.fit import fit_local
from musiclm.tokens.system import TokenSystem


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth.write_corpus(root, num_tracks=6, seconds=11.0, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_system_dir(corpus, tmp_path_factory):
    """A tiny token system, RVQ and k-means fitted in-process on the corpus (the Ray path has its own test)."""
    out = tmp_path_factory.mktemp("ts") / "tiny"
    fit_local(TokenSystem.create(model_preset("tiny").token_system(), out), list_audio_files(corpus))
    return out


@pytest.fixture(scope="session")
def tiny_system(tiny_system_dir):
    return TokenSystem.load(tiny_system_dir)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def token_dataset_dir(corpus, tiny_system_dir, tmp_path_factory):
    """The synthetic corpus tokenized by the tiny token system, in-process (``preprocess.run_local``)."""
    from musiclm.config import DataConfig
    from musiclm.data.preprocess import prepare, run_local
    from musiclm.data.sources import open_source

    out = tmp_path_factory.mktemp("tokens") / "dataset"
    cfg = DataConfig(clip_seconds=11, valid_frac=0.34, seed=4)
    run_local(prepare(open_source(corpus), tiny_system_dir, out, cfg, log=lambda m: None), log=lambda m: None)
    return out
