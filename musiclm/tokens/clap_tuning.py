"""Tuning a token system's CLAP on captioned audio (``musiclm fit-clap``), contrastively, on Ray Train.

For a domain CLAP describes poorly (the seed blamed FMA's weak text), and for the offline world, where the
`tiny` CLAP starts random and embeds every clip alike. Data: a source with captions (``captions.jsonl``, FMA's
metadata captions) split by track into train and held-out tracks (a stable hash of the track id). Ray Data
decodes each track and turns up to ``windows_per_track`` of its CLAP windows (seeded per track) into CLAP's input
features; rows stream to the workers, or are kept in the object store across epochs when they fit
(``cache_gb``). Each worker runs CLAP's own symmetric contrastive loss (``ClapModel(return_loss=True)``, the
negatives being the other clips of its batch) on both towers or one (``train``: the other frozen), under DDP.

Rank 0 scores retrieval on the held-out tracks before the first step and every ``eval_every`` steps: each track's
audio embedding is the mean of its windows' (normalized), each caption is ranked against every held-out track
and every track against every caption; ``valid/recall@1`` and ``@5`` are the means of the two directions
(chance: k / tracks). A checkpoint (weights and AdamW state as safetensors, ``train_state.json``) is written at
every evaluation; running the same command again resumes from the latest. At the end the driver writes the
tuned weights into the token system (``encoders/clap``, the same transformers format), records what they were
tuned on in ``token_system.json`` (``history``) and ``fit_clap.report.json``, and drops a fitted RVQ, whose codes
the new embeddings no longer match (``--overwrite``; refused otherwise, before any work).

The loop, checkpoints and the write into the token system are ``tuning``'s, shared with fit-codec. The caller
connects to Ray; nothing here calls ``ray.init``.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..audio.io import AudioDecodeError, decode_audio
from ..config_io import check
from ..data.clips import stable_fraction
from .system import TokenSystemError, encoder_source, read_meta, tokenizer_input, writable_root
from .tuning import (Task, TuneSettings, fit, held_out_rows, run_loop, run_report, save_tuned, scores, split_tracks,
                     track_dataset)

REPORT = "fit_clap.report.json"
TOWERS = {"audio": ("audio_model", "audio_projection", "logit_scale_a"),
          "text": ("text_model", "text_projection", "logit_scale_t")}


@dataclass
class ClapTuneConfig(TuneSettings):
    """fit-clap's settings (``TuneSettings``: steps, batch size, lr, ...). ``lr`` 1e-5 suits a pretrained CLAP; the
    random tiny one learns at 3e-4 to 5e-4. The batch's other clips are the contrastive loss's negatives."""
    train: str = "both"  # the towers that learn: both, audio or text (the other frozen)
    windows_per_track: int = 4  # CLAP windows (clap_audio_length_seconds each) of a track, chosen per track

    def __post_init__(self):
        super().__post_init__()
        check(self.train in ("both", "audio", "text"), "train", "must be both, audio or text")
        check(self.windows_per_track >= 1, "windows_per_track", "must be >= 1")


# ---------------------------------------------------------------------------------------------- data

def _featurize(row: dict, token_system: str, windows: int, max_seconds: float, seed: int) -> list[dict]:
    """Rows of one track: up to ``windows`` of its CLAP windows as CLAP's input features (flattened), each with
    the track's caption; one row with ``error`` set when it cannot be decoded."""
    from .system import load_clap_featurizer

    featurizer = _FEATURIZERS.get(token_system) or _FEATURIZERS.setdefault(token_system,
                                                                             load_clap_featurizer(token_system))
    try:
        audio, rate = decode_audio(row["path"], max_seconds=max_seconds)
    except AudioDecodeError as e:
        return [{"id": row["id"], "caption": row["caption"], "features": np.zeros(0, np.float32), "error": e.reason}]
    feats = featurizer(tokenizer_input("clap", audio, rate, featurizer.sample_rate))
    if len(feats) > windows:  # a fixed subset per track, the same on every run
        rng = np.random.default_rng([seed, int(stable_fraction(seed, row["id"]) * 2 ** 32)])
        feats = feats[np.sort(rng.choice(len(feats), windows, replace=False))]
    return [{"id": row["id"], "caption": row["caption"], "features": f.reshape(-1), "error": ""} for f in feats]


_FEATURIZERS: dict = {}  # one per token system and Ray worker process


# ---------------------------------------------------------------------------------------------- metrics

def retrieval(audio: torch.Tensor, text: torch.Tensor, ids: list[str]) -> dict[str, float]:
    """Held-out retrieval of window embeddings ``audio`` (n, d) of tracks ``ids`` against each track's caption
    embedding ``text`` (n, d; the same for a track's windows): recall@1, recall@5 and the mean rank, averaged over
    text -> audio and audio -> text, with chance recall@1 for the number of tracks."""
    order = sorted(set(ids))
    position = {track: k for k, track in enumerate(order)}
    index = torch.tensor([position[i] for i in ids])
    a = torch.zeros(len(order), audio.shape[1]).index_add_(0, index, torch.nn.functional.normalize(audio, dim=-1))
    t = torch.zeros(len(order), text.shape[1]).index_copy_(0, index, text)
    sim = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(a, dim=-1).T
    out = {}
    for name, s in (("text_to_audio", sim), ("audio_to_text", sim.T)):
        ranks = (s >= s.diag()[:, None]).sum(1).float() - 1  # others scoring at least the true pair's (ties lose)
        out.update({f"{name}/recall@1": (ranks < 1).float().mean().item(),
                    f"{name}/recall@5": (ranks < 5).float().mean().item(), f"{name}/mean_rank": ranks.mean().item() + 1})
    metrics = {f"valid/{k}": v for k, v in out.items()}
    for k in ("recall@1", "recall@5", "mean_rank"):
        metrics[f"valid/{k}"] = (out[f"text_to_audio/{k}"] + out[f"audio_to_text/{k}"]) / 2
    metrics["valid/chance_recall@1"] = 1 / len(order)
    metrics["valid/caption_cosine"] = sim.diag().mean().item()  # each track's caption against its own audio
    metrics["valid/tracks"] = float(len(order))
    return metrics


@torch.no_grad()
def embed(model, processor, features: np.ndarray, captions: list[str], device, max_tokens: int,
          batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAP audio and text embeddings (unnormalized) of feature rows and their captions, in eval mode."""
    from .clap import _pooled, embed_audio_features

    audio = embed_audio_features(model, features, device, batch_size)
    text = []
    for i in range(0, len(captions), batch_size):
        enc = tokenize(processor, captions[i: i + batch_size], max_tokens, device)
        text.append(_pooled(model.get_text_features(**enc)).float().cpu())
    return audio, torch.cat(text)


def tokenize(processor, captions: list[str], max_tokens: int, device) -> dict:
    enc = processor.tokenizer(list(captions), padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


# ---------------------------------------------------------------------------------------------- the loop

class ClapTask(Task):
    name, unit = "fit-clap", "clips"

    def __init__(self, loop_cfg: dict, cfg: ClapTuneConfig, device: torch.device, held: dict | None):
        from .encoders import load_clap

        self.cfg, self.device, self.held = cfg, device, held
        self.model, self.processor = load_clap(loop_cfg["clap"])
        self.frozen = [] if self.cfg.train == "both" else list(TOWERS["text" if self.cfg.train == "audio" else "audio"])
        for name, p in self.model.named_parameters():
            p.requires_grad_(not any(name.startswith(f) for f in self.frozen))
        self.model.to(device)
        self.shape, self.max_tokens = tuple(loop_cfg["feature_shape"]), int(loop_cfg["text_max_tokens"])

    def train_mode(self) -> None:  # a frozen tower stays in eval mode: its batch norms keep their statistics
        self.model.train()
        for name in self.frozen:
            if isinstance(getattr(self.model, name), torch.nn.Module):
                getattr(self.model, name).eval()

    def loss(self, net, batch: dict) -> torch.Tensor | None:
        n = len(batch["caption"])
        if n < 2:  # a contrastive batch needs another clip
            return None
        x = torch.from_numpy(np.stack(batch["features"]).reshape(n, *self.shape)).to(self.device)
        enc = tokenize(self.processor, [str(c) for c in batch["caption"]], self.max_tokens, self.device)
        return net(**enc, input_features=x, is_longer=torch.zeros(n, 1, dtype=torch.bool, device=self.device),
                   return_loss=True).loss

    def evaluate(self) -> dict[str, float]:
        h = self.held
        audio, text = embed(self.model, self.processor, h["features"].reshape(-1, *self.shape), h["captions"],
                            self.device, self.max_tokens)
        return retrieval(audio, text, h["ids"])

    def describe(self, scores: dict) -> str:
        return (f"held-out retrieval over {int(scores['valid/tracks'])} tracks: recall@1 {scores['valid/recall@1']:.3f} "
                f"recall@5 {scores['valid/recall@5']:.3f} mean rank {scores['valid/mean_rank']:.2f} (chance recall@1 "
                f"{scores['valid/chance_recall@1']:.3f})")

    def train_scalars(self) -> dict[str, float]:
        return {"train/logit_scale_text": float(self.model.logit_scale_t.exp()),
                "train/logit_scale_audio": float(self.model.logit_scale_a.exp())}


clap_loop = functools.partial(run_loop, ClapTask, ClapTuneConfig)


# ---------------------------------------------------------------------------------------------- driver

def refuse_tuning(token_system: str | Path, overwrite: bool) -> None:
    """A token system whose RVQ is fitted (``token_system.json`` says) is refused unless ``overwrite``: its codes
    were fitted on the CLAP about to change. Checked before any work."""
    writable_root(token_system)
    meta, _ = read_meta(token_system)
    if meta.get("fitted", {}).get("clap_rvq") and not overwrite:
        raise TokenSystemError(
            f"the CLAP RVQ of {token_system} is fitted on its present CLAP: tuning CLAP changes every embedding, so "
            f"that RVQ, every conditioning token, every token dataset and every stage trained on them would no "
            f"longer match. Pass --overwrite to tune anyway: the RVQ is then dropped, and you re-fit it "
            f"(`musiclm fit-rvq`), re-make the token datasets (`musiclm preprocess`) and retrain the stages.")


def captioned(source, log=None) -> list:
    """The tracks of ``source`` that fit-clap can use: captioned and readable (the others counted in ``log``)."""
    tracks = [t for t in source.tracks if t.caption and not t.problem_kind]
    missing = len(source.tracks) - len(tracks)
    if missing and log:
        log(f"{missing} of {len(source.tracks)} tracks have no caption or cannot be read: left out")
    return tracks


def fit_clap(token_system: str | Path, source, cfg: ClapTuneConfig, run_dir: str, cluster_cpus: float,
             overwrite: bool = False, log=print) -> dict:
    """Tune the CLAP of ``token_system`` on ``source``'s captioned tracks (a ``data.sources.Source``) in the run
    ``run_dir`` (resumed when it has a checkpoint), then write the weights into the token system. Needs a
    connected Ray."""
    from .system import load_clap_featurizer

    start = time.time()
    refuse_tuning(token_system, overwrite)
    root = Path(token_system)
    _, ts_cfg = read_meta(root)
    tracks = captioned(source, log)
    train, valid = split_tracks(tracks, cfg)
    if len(valid) < 2 or len(train) < cfg.batch_size:
        raise ValueError(f"fit-clap needs captioned tracks for a batch ({cfg.batch_size}) and at least 2 held-out "
                         f"ones (a fifth of the tracks, at most --valid-tracks): {source.root} has {len(tracks)}")
    fe = load_clap_featurizer(root).feature_extractor
    frames = int(getattr(fe, "nb_max_samples", 480_000)) // int(getattr(fe, "hop_length", 480)) + 1
    log(f"fit-clap: {len(train)} train and {len(valid)} held-out tracks of {source.describe()}; "
        f"{cfg.steps} steps of {cfg.batch_size} clips x {cfg.num_workers} workers at lr {cfg.lr:g}, "
        f"training {'both towers' if cfg.train == 'both' else 'the ' + cfg.train + ' tower'}")
    kwargs = {"token_system": str(root), "windows": cfg.windows_per_track, "max_seconds": cfg.max_seconds,
              "seed": cfg.seed}
    train_ds, cached = track_dataset(train, _featurize, kwargs, cfg, cfg.windows_per_track * 4 * frames * fe.feature_size)
    rows, bad = held_out_rows(valid, _featurize, kwargs, cfg, "fit-clap", log)
    shape = (1, np.asarray(rows[0]["features"]).size // fe.feature_size, fe.feature_size)
    held = {"features": np.stack([np.asarray(r["features"], np.float32) for r in rows]),
            "captions": [str(r["caption"]) for r in rows], "ids": [str(r["id"]) for r in rows]}
    loop_cfg = {"clap": encoder_source(root, ts_cfg, "clap_rvq_cfg"), "feature_shape": list(shape),
                "text_max_tokens": ts_cfg.clap_rvq_cfg.text_max_tokens}
    state, before, after, checkpoint = fit(clap_loop, run_dir, loop_cfg, cfg, train_ds, cached, held, cluster_cpus)
    report = {**run_report("clap", run_dir, checkpoint, source, train, valid, bad, after, cfg),
              "retrieval": {"untuned": scores(before), "tuned": scores(after["metrics"])}}
    save_tuned(root, "clap_rvq_cfg", state, report, REPORT, start, drop_rvq=True, log=log)
    b, a = report["retrieval"]["untuned"], report["retrieval"]["tuned"]
    log(f"held-out retrieval ({len(valid)} tracks): recall@1 {b['valid/recall@1']:.3f} -> {a['valid/recall@1']:.3f}, "
        f"recall@5 {b['valid/recall@5']:.3f} -> {a['valid/recall@5']:.3f}, mean rank {b['valid/mean_rank']:.2f} -> "
        f"{a['valid/mean_rank']:.2f} (chance recall@1 {a['valid/chance_recall@1']:.3f})")
    return report


__all__ = ["ClapTuneConfig", "ClapTask", "captioned", "fit_clap", "refuse_tuning", "retrieval", "REPORT"]
