"""Shared fixtures: a small synthetic corpus and a fitted tiny token system (built once per test session)."""
from __future__ import annotations

import os

import pytest

from musiclm.audio import synth
from musiclm.audio.io import list_audio_files
from musiclm.config import model_preset
from musiclm.tokens.fit import fit_local
from musiclm.tokens.system import TokenSystem

# Ray Train's controller polls its workers every 2 s, so it sees a run end (or a worker die) up to 2 s late and
# then takes as long again to tear the group down: measured 4.5 s from the last checkpoint to the result, 1.1 s
# polling every 0.25 s. The suite starts about fifteen training runs. Set before any Ray starts, so that every
# Ray process (and the clusters the tests start in subprocesses) inherits it; real runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


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


class ObjectStore:
    """An S3-compatible server on 127.0.0.1 (moto's, from PyPI: pure Python, starts in a second in this process,
    speaks the S3 REST protocol that pyarrow's C++ S3 client, Ray's storage and boto3 use). Its endpoint and
    credentials are in the ``AWS_*`` variables of this process and of every process started after it (Ray's
    workers included), the way credentials reach the nodes of a real cluster."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": "musiclm-test", "AWS_SECRET_ACCESS_KEY": "musiclm-test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self._buckets = 0

    def bucket(self) -> str:
        """A new, empty bucket: its URI."""
        import pyarrow.fs as pafs

        self._buckets += 1
        name = f"musiclm-test-{self._buckets}"
        pafs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def close(self) -> None:
        self.server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    pytest.importorskip("moto")
    os.environ.setdefault("MUSICLM_CACHE", str(tmp_path_factory.mktemp("remote-cache")))  # not the user's cache
    store = ObjectStore()
    yield store
    store.close()


@pytest.fixture(scope="session")
def local_ray(object_store):
    """One local Ray for every test that needs one (starting Ray and its worker processes costs 5-10 s each
    time). The dashboard (on 127.0.0.1) serves the State API, which Ray Train's placement-group cleaner needs
    between Tune trials. Tests that must own a Ray of their own (a cluster, a killed driver) start it in a
    subprocess. The object store starts first, so that Ray's workers inherit its endpoint."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
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


def train_tiny_stage(stage: str, dataset, fingerprint: str, out, steps: int = 8, seed: int = 0,
                     cond_drop_prob: float = 0.0):
    """A tiny stage trained in-process for a few steps on crops of the token dataset, saved as a checkpoint
    (for the plumbing of generation and evaluation; whether a stage learns is tests/test_models.py's job), with
    conditioning dropout when ``cond_drop_prob`` (it then learned the null condition guidance needs)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from musiclm.data.shards import CropSpec, open_manifest, split_files
    from musiclm.models import build_stage, split_batch
    from musiclm.models.stages import loss_and_metrics
    from musiclm.train.checkpoint import save_stage

    cfg = model_preset("tiny")
    rows = [r for f in split_files(dataset, "train") for r in pq.read_table(f).to_pylist()]
    spec = CropSpec.make(stage, cfg.global_cfg, open_manifest(dataset, fingerprint))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_stage(stage, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    from musiclm.data.shards import crop_row

    for _ in range(steps):
        crops = [crop_row(rows[i], spec, rng) for i in rng.integers(0, len(rows), 4)]
        cond, target = split_batch(model, {k: np.stack([c[k] for c in crops]) for k in crops[0]})
        null = torch.rand(target.shape[0]) < cond_drop_prob if cond_drop_prob else None
        loss, _ = loss_and_metrics(model(cond, target, null=null), target, model.target.num_quantizers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_stage(out, model.state_dict(), stage, cfg, steps, fingerprint, {"train/loss": loss.item()},
                      null_condition_steps=steps if cond_drop_prob else 0)


@pytest.fixture(scope="session")
def tiny_model_set(token_dataset_dir, tiny_system_dir, tmp_path_factory):
    """A model-set folder (semantic/, coarse/, fine/, token_system/) of tiny stages trained in the session."""
    from musiclm.tokens.system import read_meta

    root = tmp_path_factory.mktemp("models") / "set"
    fingerprint = read_meta(tiny_system_dir)[0]["fingerprint"]
    for stage in ("semantic", "coarse", "fine"):
        train_tiny_stage(stage, token_dataset_dir, fingerprint, root / stage)
    (root / "token_system").symlink_to(tiny_system_dir, target_is_directory=True)
    return root
