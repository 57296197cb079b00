"""Make the fixture of open-musiclm's released files as its own code lays them out (see README.md).

Runs in a scratch environment, never in the project's venv, with open-musiclm's code (commit 8e2c6a8) and the
package versions named on the command line's PYTHONPATH. Nothing from this project is imported. Three parts:

``--part stages``: ``layout.json``, every key, shape and dtype of the state dicts open-musiclm's trainer saves
    (``accelerator.get_state_dict(transformer)``, the plain ``TokenConditionedTransformer`` state dict) for the
    three transformers built by ``create_{semantic,coarse,fine}_transformer_from_config`` from the released model
    JSON ``musiclm_large_small_context.json``: the layout of ``semantic.transformer.14000.pt`` & co.
``--part rvq``: with the vector_quantize_pytorch on the path, open-musiclm's ``ClapQuantized`` (made by
    ``create_clap_quantized_from_config``) around its vendored laion_clap ``CLAP_Module`` loaded with
    ``tests/data/laion_clap/htsat_tiny.pt`` (HTSAT-tiny's architecture, narrow): the RVQ is fitted as
    ``ClapRVQTrainer.train_step`` fits it (``quantize(embeds, return_rvq_loss=True)`` with ``learn_rvq``) on the CLAP
    audio embeddings of synthetic clips and saved as the trainer saves ``clap.rvq.<step>.pt`` (its state dict).
    Then, in inference mode, the clap token ids ``ClapQuantized`` returns for the laion_clap fixture's 8 clips
    (``audio_input``) and 8 captions (``text_input``), and for the training embeddings. Also the full-size RVQ
    layout (12 quantizers x 1024 codes x 512, as the released JSON configures it).
``--part kmeans``: with the scikit-learn on the path, open-musiclm's ``learn_kmeans`` (its MiniBatchKMeans settings,
    ``joblib.dump``) on synthetic features, and the ids ``MiniBatchKMeans.predict`` gives held-out features (what
    ``HfHubertWithKmeans`` calls).

    PYTHONPATH=/tmp/open-musiclm:/tmp/ta/x:/tmp/vqp_1.2.2 python make_fixture.py --part stages
    PYTHONPATH=/tmp/open-musiclm:/tmp/ta/x:/tmp/vqp_1.2.2 python make_fixture.py --part rvq
    PYTHONPATH=/tmp/open-musiclm:/tmp/ta/x:/tmp/vqp_1.32.0 python make_fixture.py --part rvq
    PYTHONPATH=/tmp/open-musiclm:/tmp/ta/x:/tmp/vqp_1.2.2:/tmp/sk122 python make_fixture.py --part kmeans
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import types
from importlib import metadata
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
LAION = HERE.parent / "laion_clap"  # the laion_clap fixture: its narrow HTSAT-tiny checkpoint, tokenizer, clips
RELEASED_JSON = HERE.parent / "open_musiclm_large_small_context.json"  # open-musiclm's configs/model file
CODES = 64  # codes per RVQ level in the fitted fixture (1,024 in the released RVQ)
SR = 48000


def stand_in(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


def open_musiclm_config():
    """open-musiclm's ``config`` module (imports its whole package: torchvision, unused here, stood in for)."""
    import transformers  # noqa: F401  (probes for torchvision before the stand-in exists)

    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.datasets",
                 "torchvision.transforms"):
        stub = sys.modules.setdefault(name, types.ModuleType(name))
        stub.__getattr__ = stand_in
    from open_musiclm import config

    return config


def layout(state) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()}


def part_stages() -> None:
    import torch

    config = open_musiclm_config()
    model_config = config.load_model_config(str(RELEASED_JSON))
    out = {"config": RELEASED_JSON.name, "open_musiclm": "8e2c6a8"}
    for stage in ("semantic", "coarse", "fine"):
        create = getattr(config, f"create_{stage}_transformer_from_config")
        transformer = create(model_config, None, "cpu")
        out[stage] = layout(transformer.state_dict())
        print(stage, len(out[stage]), "tensors", sum(p.numel() for p in transformer.parameters()) / 1e6, "M")
        del transformer
    (HERE / "layout.json").write_text(json.dumps(out, indent=1) + "\n")


def synthetic_clips(n: int, seed: int):
    """n clips of 0.5-3 s at 48 kHz: a few harmonics of a random pitch, a tremolo, noise, a random level."""
    import numpy as np

    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        t = np.arange(int(SR * rng.uniform(0.5, 3.0))) / SR
        f0 = 55 * 2 ** rng.uniform(0, 6)
        x = sum(rng.uniform(0, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 7))
        x *= 1 + rng.uniform(0, 0.9) * np.sin(2 * np.pi * rng.uniform(0.5, 8) * t)
        x += rng.normal(0, rng.uniform(0.001, 0.3), t.shape)
        clips.append((x / np.abs(x).max() * rng.uniform(0.05, 0.9)).astype(np.float32))
    return clips


def part_rvq() -> None:
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    version = metadata.version("vector-quantize-pytorch")
    config = open_musiclm_config()
    # what CLAP_Module would fetch from the hub: the laion_clap fixture's tokenizer and one-layer RoBERTa
    tokenizer = transformers.RobertaTokenizer(str(LAION / "tokenizer" / "vocab.json"),
                                              str(LAION / "tokenizer" / "merges.txt"))
    summary = json.loads((LAION / "summary.json").read_text())
    for cls in (transformers.RobertaTokenizer, transformers.BertTokenizer, transformers.BartTokenizer):
        cls.from_pretrained = classmethod(lambda cls, *a, **k: tokenizer)
    text_config = transformers.RobertaConfig(vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0,
                                             eos_token_id=2, **summary["roberta"])
    transformers.RobertaModel.from_pretrained = classmethod(lambda cls, *a, **k: cls(text_config))
    from clap_module import factory, htsat  # open-musiclm's vendored laion_clap (its package puts it on the path)

    narrow = summary["variants"]["htsat_tiny"]["htsat"]
    swin_init = htsat.HTSAT_Swin_Transformer.__init__
    htsat.HTSAT_Swin_Transformer.__init__ = lambda self, **kw: swin_init(self, **{**kw, **narrow})
    cfg = json.loads(json.dumps(factory._MODEL_CONFIGS["HTSAT-tiny"]))
    cfg["embed_dim"] = narrow["embed_dim"] * 2 ** (len(narrow["depths"]) - 1)
    cfg["joint_embed_shape"] = summary["joint_embed_shape"]
    cfg["audio_cfg"]["class_num"] = summary["class_num"]
    factory._MODEL_CONFIGS["HTSAT-tiny-narrow"] = cfg

    model_config = config.load_model_config(str(RELEASED_JSON))
    model_config.clap_rvq_cfg = dataclasses.replace(model_config.clap_rvq_cfg, codebook_size=CODES,
                                                    checkpoint_path=str(LAION / "htsat_tiny.pt"),
                                                    amodel_type="HTSAT-tiny-narrow")
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # load_ckpt prints every parameter name
        conditioner = config.create_clap_quantized_from_config(model_config, None, "cpu")

    # ClapRVQTrainer.train_step: embeddings with learn_rvq set, then quantize(embeds, return_rvq_loss=True)
    conditioner.learn_rvq = True
    train_embeds = []
    for step in range(4):
        clips = [torch.from_numpy(c) for c in synthetic_clips(256, seed=step)]
        embeds = conditioner.forward(audio_input=clips, return_embedding=True)
        loss = conditioner.quantize(embeds, return_rvq_loss=True)
        train_embeds.append(embeds)
        print(f"step {step}: rvq loss {loss:.5f}")
    rvq_state = conditioner.rq.state_dict()
    torch.save(rvq_state, HERE / f"clap.rvq.vqp-{version}.pt")

    conditioner.learn_rvq = False
    audio = load_file(str(LAION / "audio.safetensors"))
    waves = [torch.from_numpy(audio[f"clip_{i}"].astype(np.float32) * np.float32(1.37) / np.float32(32767.0))
             for i in range(len(summary["clip_seconds"]))]  # the laion_clap fixture's input (its waveform())
    embeddings = torch.cat(train_embeds)
    with torch.no_grad():
        audio_ids = conditioner.forward(audio_input=waves)
        text_ids = conditioner.forward(text_input=summary["captions"])
        ids = conditioner.quantize(embeddings)
    save_file({"embeddings": embeddings.numpy().astype(np.float32), "ids": ids[..., 0].numpy().astype(np.int64),
               "audio_ids": audio_ids[..., 0].numpy().astype(np.int64),
               "text_ids": text_ids[..., 0].numpy().astype(np.int64)}, HERE / f"rvq.vqp-{version}.safetensors")

    # the released RVQ's layout: the same ClapQuantized configuration at the released sizes (dimension 512, the
    # joint embedding of a released CLAP; 1,024 codes)
    from vector_quantize_pytorch import ResidualVQ

    released = config.load_model_config(str(RELEASED_JSON)).clap_rvq_cfg
    full = ResidualVQ(dim=512, num_quantizers=released.rq_num_quantizers, codebook_size=released.codebook_size,
                      commitment_weight=0, decay=released.rq_ema_decay, kmeans_init=True,
                      threshold_ema_dead_code=released.threshold_ema_dead_code)
    assert set(full.state_dict()) == set(rvq_state), "the fitted RVQ and the full-size one differ in layout"
    (HERE / f"rvq_layout.vqp-{version}.json").write_text(json.dumps(
        {"vector_quantize_pytorch": version, "keys": layout(full.state_dict())}, indent=1) + "\n")
    print(f"vector_quantize_pytorch {version}: {len(rvq_state)} tensors; audio ids {audio_ids[..., 0].tolist()}")


def part_kmeans() -> None:
    import numpy as np
    import sklearn
    from safetensors.numpy import save_file

    open_musiclm_config()
    from open_musiclm.hf_hubert_kmeans import learn_kmeans

    version = sklearn.__version__
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(48, 16)) * 3
    def sample(n):
        return (centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, 16))).astype(np.float32)
    train, held_out = sample(4000), sample(500)
    path = HERE / f"kmeans.sklearn-{version}.joblib"
    with contextlib.redirect_stdout(io.StringIO()):  # MiniBatchKMeans(verbose=1) prints every step
        learn_kmeans(train, 0, str(path), n_clusters=32, batch_size=1000)
    import joblib

    model = joblib.load(path)
    save_file({"features": held_out, "ids": model.predict(held_out).astype(np.int64),
               "centers": model.cluster_centers_.astype(np.float32)}, HERE / f"kmeans.sklearn-{version}.safetensors")
    print(f"scikit-learn {version}: {type(model).__name__} {model.cluster_centers_.shape} -> {path.name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("stages", "rvq", "kmeans"), required=True)
    args = p.parse_args()
    {"stages": part_stages, "rvq": part_rvq, "kmeans": part_kmeans}[args.part]()


if __name__ == "__main__":
    main()
