"""Typed configuration: token system, the three stage models, training and data.

``ModelConfig`` has exactly the sections and keys of open-musiclm's model JSON (``configs/model/*.json``:
``global_cfg``, ``clap_rvq_cfg``, ``hubert_kmeans_cfg``, ``encodec_cfg``, ``semantic_cfg``, ``coarse_cfg``,
``fine_cfg``), so those files load as they are; fields that open-musiclm does not have are ours and have
defaults. ``Config`` bundles model, training and data settings and is what jobs and Tune read and override.

Presets: ``tiny`` (CPU tests, seconds; random small encoders built offline), ``small`` (open-musiclm's
``musiclm_small``: depth 6, 8 heads) and ``large`` (``musiclm_large_small_context``: depth 24, 16 heads,
the released checkpoints' shape).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config_io import (ConfigError, apply_overrides, check, check_finite, from_dict, load_json, overlay, save_json,
                        to_dict)

Stage = Literal["semantic", "coarse", "fine"]
STAGES: tuple[str, ...] = ("semantic", "coarse", "fine")
MAX_STEPS = 10 ** 9  # more optimizer steps than anyone runs (a 30 ms step: a year): a larger count is a typo
TINY = "tiny"  # model_name value meaning "random weights of the same architecture at a small size, built offline"


@dataclass
class GlobalConfig:
    """Window lengths per stage and the split of EnCodec's codebooks (open-musiclm ``global_cfg``)."""

    semantic_audio_length_seconds: float = 10.0
    coarse_audio_length_seconds: float = 4.0
    fine_audio_length_seconds: float = 2.0
    clap_audio_length_seconds: float = 10.0
    num_coarse_quantizers: int = 3
    num_fine_quantizers: int = 5

    def __post_init__(self):
        check_finite(self)
        for name in ("semantic", "coarse", "fine", "clap"):
            check(getattr(self, f"{name}_audio_length_seconds") > 0, f"{name}_audio_length_seconds", "must be > 0")
        check(self.num_coarse_quantizers >= 1, "num_coarse_quantizers", "must be >= 1")
        check(self.num_fine_quantizers >= 1, "num_fine_quantizers", "must be >= 1")


@dataclass
class ClapRVQConfig:
    """CLAP encoder and the residual VQ over its embedding (open-musiclm ``clap_rvq_cfg`` plus ours)."""

    rq_num_quantizers: int = 12
    codebook_size: int = 1024
    enable_fusion: bool = False
    rq_ema_decay: float = 0.95
    threshold_ema_dead_code: float = 0.5
    checkpoint_path: str | None = None  # open-musiclm's laion_clap .pt; we load transformers-format weights instead
    amodel_type: str = "HTSAT-tiny"
    # ours
    model_name: str = "laion/clap-htsat-unfused"  # hub id, local directory, or "tiny"
    dim: int = 512
    sample_rate: int = 48000
    hop_seconds: float = 1.0  # hop between 10 s CLAP windows when tokenizing a track
    text_max_tokens: int = 77  # CLAP's text context (the tiny byte-level tokenizer uses one token per byte)

    def __post_init__(self):
        check_finite(self)
        check(self.rq_num_quantizers >= 1, "rq_num_quantizers", "must be >= 1")
        check(self.codebook_size >= 2, "codebook_size", "must be >= 2")
        check(0.0 < self.rq_ema_decay < 1.0, "rq_ema_decay", "must be in (0, 1)")
        check(self.threshold_ema_dead_code >= 0, "threshold_ema_dead_code", "must be >= 0")
        check(self.hop_seconds > 0, "hop_seconds", "must be > 0")
        check(self.dim >= 1, "dim", "must be >= 1")
        check(self.sample_rate >= 1, "sample_rate", "must be >= 1 (Hz)")
        check(self.text_max_tokens >= 1, "text_max_tokens", "must be >= 1")


@dataclass
class HubertKmeansConfig:
    """Semantic encoder (MERT/HuBERT) layer + k-means (open-musiclm ``hubert_kmeans_cfg``)."""

    model_name: str = "m-a-p/MERT-v0"  # hub id, local directory, or "tiny"
    normalize_embeds: bool = True  # per-frame zero mean / unit variance of the layer features, as open-musiclm
    embed_layer: int = 7
    target_sample_hz: int = 16000
    seq_len_multiple_of: int = 320
    codebook_size: int = 1024
    output_hz: int = 50

    def __post_init__(self):
        check_finite(self)
        check(self.embed_layer >= 1, "embed_layer", "must be >= 1")
        check(self.codebook_size >= 2, "codebook_size", "must be >= 2")
        check(self.seq_len_multiple_of >= 1, "seq_len_multiple_of", "must be >= 1 (samples)")
        check(self.target_sample_hz >= 1 and self.output_hz >= 1, "output_hz",
              "and target_sample_hz must be >= 1 (Hz)")
        check(self.target_sample_hz % self.output_hz == 0, "output_hz",
              "must divide target_sample_hz")


@dataclass
class EncodecConfig:
    """Acoustic codec (open-musiclm ``encodec_cfg``): EnCodec 24 kHz at 6 kbps = 8 codebooks at 75 Hz."""

    bandwidth: float = 6.0
    codebook_size: int = 1024
    output_hz: int = 75
    model_name: str = "facebook/encodec_24khz"  # hub id, local directory, or "tiny"

    def __post_init__(self):
        check_finite(self)
        check(self.bandwidth > 0, "bandwidth", "must be > 0")
        check(self.codebook_size >= 2, "codebook_size", "must be >= 2")
        check(self.output_hz >= 1, "output_hz", "must be >= 1 (Hz)")


@dataclass
class TransformerConfig:
    """One stage's decoder (open-musiclm ``semantic_cfg`` / ``coarse_cfg`` / ``fine_cfg``)."""

    dim: int = 1024
    depth: int = 6
    heads: int = 8
    attn_dropout: float = 0.0
    ff_dropout: float = 0.1
    use_conv_ff: bool = True
    grad_shrink_alpha: float = 0.1
    non_causal_prefix_size: int = 0
    relative_position_bias_type: Literal["continuous", "t5", "none"] = "continuous"
    use_memory_efficient_attention: bool = False
    use_absolute_position_embeddings: bool = False
    max_absolute_position_embeddings: int = 262
    # ours
    dim_head: int = 64

    def __post_init__(self):
        check_finite(self)
        check(self.dim >= 8, "dim", "must be >= 8")
        check(self.depth >= 1, "depth", "must be >= 1")
        check(self.heads >= 1, "heads", "must be >= 1")
        check(self.dim_head >= 1, "dim_head", "must be >= 1")
        check(self.heads * self.dim_head <= 8 * self.dim, "heads",
              f"x dim_head = {self.heads * self.dim_head} is more than 8 x dim ({8 * self.dim}): an attention that "
              f"wide is a typo (open-musiclm: 16 heads x 64 at dim 1024)")
        check(self.max_absolute_position_embeddings >= 1, "max_absolute_position_embeddings", "must be >= 1")
        check(0.0 <= self.attn_dropout < 1.0, "attn_dropout", "must be in [0, 1)")
        check(0.0 <= self.ff_dropout < 1.0, "ff_dropout", "must be in [0, 1)")


@dataclass
class TokenSystemConfig:
    """Everything that determines the tokens: the three tokenizers' settings and the CLAP window/hop."""

    clap_rvq_cfg: ClapRVQConfig = field(default_factory=ClapRVQConfig)
    hubert_kmeans_cfg: HubertKmeansConfig = field(default_factory=HubertKmeansConfig)
    encodec_cfg: EncodecConfig = field(default_factory=EncodecConfig)
    clap_audio_length_seconds: float = 10.0
    num_coarse_quantizers: int = 3
    num_fine_quantizers: int = 5

    def __post_init__(self):
        check_finite(self)
        check(self.clap_audio_length_seconds > 0, "clap_audio_length_seconds", "must be > 0")


@dataclass
class ModelConfig:
    """open-musiclm's model config, key for key (``MusicLMModelConfig``)."""

    global_cfg: GlobalConfig = field(default_factory=GlobalConfig)
    clap_rvq_cfg: ClapRVQConfig = field(default_factory=ClapRVQConfig)
    hubert_kmeans_cfg: HubertKmeansConfig = field(default_factory=HubertKmeansConfig)
    encodec_cfg: EncodecConfig = field(default_factory=EncodecConfig)
    semantic_cfg: TransformerConfig = field(default_factory=TransformerConfig)
    coarse_cfg: TransformerConfig = field(default_factory=lambda: TransformerConfig(max_absolute_position_embeddings=712))
    fine_cfg: TransformerConfig = field(default_factory=lambda: TransformerConfig(max_absolute_position_embeddings=1212))

    def token_system(self) -> TokenSystemConfig:
        g = self.global_cfg
        return TokenSystemConfig(
            clap_rvq_cfg=self.clap_rvq_cfg,
            hubert_kmeans_cfg=self.hubert_kmeans_cfg,
            encodec_cfg=self.encodec_cfg,
            clap_audio_length_seconds=g.clap_audio_length_seconds,
            num_coarse_quantizers=g.num_coarse_quantizers,
            num_fine_quantizers=g.num_fine_quantizers,
        )

    def stage(self, name: str) -> TransformerConfig:
        check(name in STAGES, "stage", f"{name!r} is not one of {', '.join(STAGES)}")
        return getattr(self, f"{name}_cfg")


@dataclass
class TrainConfig:
    """One stage's training run. Names follow open-musiclm's trainer config where it has them."""

    stage: Stage = "semantic"
    lr: float = 3e-4
    lr_warmup: int = 3000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    batch_size: int = 4  # per worker
    grad_accum_every: int = 8
    wd: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    max_grad_norm: float = 0.5
    num_train_steps: int = 200_000
    save_results_every: int = 250  # validation interval (steps)
    save_model_every: int = 1000
    keep_best: int = 3
    valid_batches: int = 8
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # workers: a number, or "MIN:MAX" for an elastic run (starts once MIN fit, grows to MAX as resources come, shrinks
    # when a node is lost; each resize restarts the workers from the latest checkpoint, docs/training.md)
    num_workers: int | str = 1
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs when the cluster has them at the start (logged)
    cpus_per_worker: float = 0.0  # 0: 1 with GPUs; on CPUs 3/4 of the cluster's CPUs shared by the workers
    mask_prob: float = 0.15  # open-musiclm's forgetful causal mask: fraction of keys hidden in training
    # Conditioning dropout: the fraction of training examples whose CLAP tokens are replaced by the null condition
    # (hidden from attention, the CLAP start vector alone in their place), so that the stage also learns the
    # unconditional distribution classifier-free guidance needs (MusicGen: 0.2-0.3). 0: open-musiclm's training.
    cond_drop_prob: float = 0.0
    lr_min_ratio: float = 0.1  # cosine schedule ends at lr * lr_min_ratio
    log_every: int = 10  # steps between train/* reports
    max_failures: int = 3  # worker failures Ray Train recovers from (restarting from the last checkpoint)
    # A train split whose shards total at most this many MB is read once into Ray's object store and held by
    # every worker, which permutes and crops it anew each epoch (train.data.HeldRows): a Ray Data execution per
    # epoch costs seconds, which dominates when an epoch is a few batches. Larger splits stream from storage
    # every epoch. 0 = always stream.
    cache_train_mb: float = 256.0
    seed: int = 0
    peak_tflops: float = 0.0  # the device's peak dense bf16 TFLOP/s for train/mfu; 0: by GPU name (known GPUs)
    # how training attends: dense (SDPA with a float bias mask), flex (FlexAttention: bias as score_mod, causal
    # block mask; needs a GPU for the backward), auto: dense until flex is measured on the GPU (docs/training.md)
    attention: Literal["auto", "dense", "flex"] = "auto"
    compile: bool = False  # torch.compile the stage (DeepSpeed's engine.compile): first steps compile (minutes)
    # Pad the feed-forward's inner width (2,730 at dim 1,024: rows not whole multiples of 16 bytes) to a multiple of
    # this in each training forward, with zero weights: the same function, and checkpoints keep open-musiclm's shapes
    # (models.layers.FeedForward). 1: the real width. For GPU GEMM kernels; benchmarks/train_step_gpu.py --ff-aligns
    ff_align: int = 1
    # Keep each block's input only and recompute its activations in the backward (same gradients). A large stage's
    # fine window (1,217 positions) keeps 6.4 GiB of activations per example on a CPU (dense attention: 16 heads x
    # 1,217^2 per layer), 1.4 GiB with it (benchmarks/train_memory.py; docs/training.md).
    activation_checkpointing: bool = False
    # A run resumed with another number of workers than saved its checkpoint scales gradient accumulation so that the
    # batch per optimizer step stays (when the counts divide it); false: the batch follows the worker count
    keep_global_batch: bool = True
    # an elastic run (num_workers "MIN:MAX") looks for more resources this often while it trains (Ray Train's
    # elastic_resize_monitor_interval_s); a resize costs a restart from the latest checkpoint
    resize_interval_s: float = 60.0

    def __post_init__(self):
        check_finite(self)
        check(self.lr > 0, "lr", "must be > 0")
        check(self.lr_warmup >= 0, "lr_warmup", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.grad_accum_every >= 1, "grad_accum_every", "must be >= 1")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
              "must be two numbers in [0, 1) (open-musiclm: [0.9, 0.99])")
        check(self.wd >= 0, "wd", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)")
        self.num_workers = parse_workers(self.num_workers)
        check(self.resize_interval_s >= 0, "resize_interval_s", "must be >= 0")
        check(1 <= self.num_train_steps <= MAX_STEPS, "num_train_steps", f"must be between 1 and {MAX_STEPS:,}")
        check(self.lr_warmup <= MAX_STEPS, "lr_warmup", f"must be at most {MAX_STEPS:,}")
        check(self.save_results_every >= 1, "save_results_every", "must be >= 1")
        check(self.save_model_every >= 1, "save_model_every", "must be >= 1")
        check(self.keep_best >= 1, "keep_best", "must be >= 1")
        check(self.valid_batches >= 1, "valid_batches", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(0.0 <= self.mask_prob < 1.0, "mask_prob", "must be in [0, 1)")
        check(0.0 <= self.cond_drop_prob < 1.0, "cond_drop_prob", "must be in [0, 1) (0: no conditioning dropout)")
        check(0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio", "must be in [0, 1]")
        check(self.cpus_per_worker >= 0, "cpus_per_worker", "must be >= 0 (0 = automatic)")
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        check(self.cache_train_mb >= 0, "cache_train_mb", "must be >= 0 (0 = always stream)")
        check(self.peak_tflops >= 0, "peak_tflops", "must be >= 0 (0 = by the GPU's name)")
        check(self.ff_align >= 1, "ff_align", "must be >= 1 (1: the feed-forward's real inner width; 64 aligns it)")
        check(self.attention in ("auto", "dense", "flex"), "attention", "must be auto, dense or flex")
        # ZeRO-3 gathers a partitioned parameter when the code reads it outside its module's forward (the start
        # tokens, output weights, position-bias MLP, convolution weights) only in eager mode: under torch.compile
        # the graph read them empty and the first step failed in every worker (tried on CPUs, DeepSpeed 0.19.8).
        check(not (self.compile and self.zero_stage == 3), "compile",
              "is not supported with zero_stage 3; use zero_stage 2 (or lower) with compile, or compile false")

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


def worker_range(num_workers: int | str) -> tuple[int, int]:
    """(min, max) workers of ``train.num_workers`` as ``parse_workers`` leaves it: N, or "MIN:MAX"."""
    if isinstance(num_workers, int):
        return num_workers, num_workers
    low, high = num_workers.split(":")
    return int(low), int(high)


def parse_workers(value: int | str) -> int | str:
    """``train.num_workers`` checked and normalized: a count (an int, or a string of one) stays a count; "MIN:MAX"
    with MIN < MAX stays that string (an elastic run); "N:N" is the count N."""
    what = (f"{value!r} is neither a number of workers (>= 1) nor a range MIN:MAX of them (1 <= MIN <= MAX, "
            f"e.g. 2:4: an elastic run)")
    if isinstance(value, bool):
        raise ConfigError(f"num_workers: {what}")
    text = str(value).strip()
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"num_workers: {what}")
    low, high = int(parts[0]), int(parts[-1])
    if not 1 <= low <= high:
        raise ConfigError(f"num_workers: {what}")
    return low if low == high else f"{low}:{high}"


@dataclass
class DataConfig:
    """How audio becomes token rows (preprocessing) and how rows are split into train and valid.

    Each track gives ``crops`` rows of at most ``clip_seconds`` (one row from the start of the track when
    ``crops`` is 1). As open-musiclm, a clip shorter than ``pad_to_seconds`` (its semantic window) is filled
    by repeating it and then zero-padded to exactly that length; a longer clip is zero-padded to a whole
    number of seconds. Tracks shorter than ``min_seconds`` are recorded as errors instead: repeating a
    fragment that short would train on a loop, not on music.
    """

    clip_seconds: int = 30  # longest stretch of a track tokenized as one row
    crops: int = 1  # rows per track: 1 = the first clip_seconds; N > 1 = N clips at seeded random offsets
    min_seconds: float = 2.0  # shorter tracks become error rows (default: the fine stage's window)
    pad_to_seconds: int = 10  # shorter clips are repeat-padded to this (open-musiclm: the semantic window)
    valid_frac: float = 0.05
    seed: int = 0  # seeds the train/valid split and the crop offsets
    rows_per_shard: int = 128
    # what the CLAP tokens every stage is conditioned on are made of: "audio", each CLAP window's audio embedding
    # (MusicLM and open-musiclm: no text needed, and a prompt's text embedding stands in for it when generating);
    # "caption", the track's caption's text embedding for every window, for a corpus whose captions describe it
    # (a prompt's tokens are then made as the training's were: no gap between CLAP's towers to cross)
    clap_from: str = "audio"

    def __post_init__(self):
        check_finite(self)
        check(self.clip_seconds >= 1, "clip_seconds", "must be a whole number of seconds >= 1")
        check(self.clap_from in ("audio", "caption"), "clap_from", "must be audio or caption")
        check(self.crops >= 1, "crops", "must be >= 1")
        check(0 < self.min_seconds <= self.clip_seconds, "min_seconds",
              f"must be > 0 and at most clip_seconds ({self.clip_seconds}): longer would make every track an error")
        check(1 <= self.pad_to_seconds <= self.clip_seconds, "pad_to_seconds",
              f"must be a whole number of seconds between 1 and clip_seconds ({self.clip_seconds})")
        check(0.0 <= self.valid_frac < 1.0, "valid_frac", "must be in [0, 1)")
        check(self.rows_per_shard >= 1, "rows_per_shard", "must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------- presets

STAGE_TRAIN_DEFAULTS = {  # open-musiclm's per-stage trainer settings (REFERENCE.md)
    "semantic": dict(lr_warmup=3000, batch_size=4),
    "coarse": dict(lr_warmup=6000, batch_size=2),
    "fine": dict(lr_warmup=0, batch_size=2),
}
PRESETS = ("tiny", "small", "large")


def _stages(**kw) -> dict:
    return dict(
        semantic_cfg=TransformerConfig(**kw, max_absolute_position_embeddings=262),
        coarse_cfg=TransformerConfig(**kw, max_absolute_position_embeddings=712),
        fine_cfg=TransformerConfig(**kw, max_absolute_position_embeddings=1212),
    )


def model_preset(name: str) -> ModelConfig:
    if name == "tiny":
        return ModelConfig(
            clap_rvq_cfg=ClapRVQConfig(model_name=TINY, text_max_tokens=256),
            hubert_kmeans_cfg=HubertKmeansConfig(model_name=TINY),
            encodec_cfg=EncodecConfig(model_name=TINY),
            **_stages(dim=64, depth=2, heads=2, dim_head=32, ff_dropout=0.0),
        )
    if name == "small":  # open-musiclm configs/model/musiclm_small.json
        return ModelConfig(**_stages(dim=1024, depth=6, heads=8))
    if name == "large":  # open-musiclm configs/model/musiclm_large_small_context.json (released checkpoints)
        return ModelConfig(**_stages(dim=1024, depth=24, heads=16))
    raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def preset(name: str, stage: str = "semantic") -> Config:
    """A full Config for preset ``name`` with the training defaults of ``stage``."""
    check(stage in STAGES, "train.stage", f"{stage!r} is not one of {', '.join(STAGES)}")
    train = TrainConfig(stage=stage, **STAGE_TRAIN_DEFAULTS[stage])
    if name == "tiny":
        train = dataclasses.replace(train, lr_warmup=10, batch_size=4, grad_accum_every=1, num_train_steps=200,
                                    save_results_every=50, save_model_every=100, zero_stage=2)
    return Config(model=model_preset(name), train=train, data=DataConfig())


def load_model_config(path: str | Path) -> ModelConfig:
    """Load a model config JSON: open-musiclm's files or ours (same keys)."""
    return load_json(ModelConfig, path)


def _file_kind(path: str | Path) -> tuple[str, dict | None]:
    """What a config file holds: ``model`` (an open-musiclm model JSON), ``sweep`` (a sweep's best.json, whose
    ``config`` section is a full Config) or ``config`` (anything else: a Config, whole or in part)."""
    from .infra import storage

    try:
        data = json.loads(storage.read_text(path)) if storage.exists(path) else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON ({e}): give a JSON object of settings, e.g. "
                          f'{{"train": {{"lr": 0.0003}}}}') from None
    if isinstance(data, dict) and "global_cfg" in data:
        return "model", data
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "checkpoint" in data:
        return "sweep", data
    return "config", data


def load_config(path: str | Path) -> Config:
    """Load a full Config JSON. A bare open-musiclm model JSON (no ``model`` section) is accepted too."""
    if _file_kind(path)[0] == "model":
        return Config(model=load_model_config(path))
    return load_json(Config, path)


def stage_config(stage: str, preset_name: str = "tiny", path: str | Path | None = None,
                 overrides: list[str] | dict | None = None) -> Config:
    """The Config of one stage's run: a preset (with that stage's training defaults), with a JSON file laid over
    it (a Config, whole or in part: what it leaves out stays the preset's; a sweep's best.json, whose ``config``
    section is a whole one; or an open-musiclm model JSON, the model on top of the preset's training settings),
    then dotted overrides."""
    cfg = preset(preset_name, stage)
    if path is not None:
        kind, data = _file_kind(path)
        if kind == "model":
            cfg = dataclasses.replace(cfg, model=load_model_config(path))
        elif kind == "sweep":
            cfg = from_dict(Config, data["config"], "config")
        elif data is None:
            cfg = load_json(Config, path)  # names the missing or unreadable file
        else:
            cfg = overlay(cfg, data, str(path))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=stage))
    return apply_overrides(cfg, model_section_keys(overrides or []))


MODEL_SECTIONS = tuple(f.name for f in dataclasses.fields(ModelConfig))  # open-musiclm's JSON sections


def given_settings(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> set[str]:
    """The dotted keys a user set: in a config file (an open-musiclm model JSON's under ``model.``; a sweep's
    best.json's ``config``) and in the overrides (open-musiclm's section names read as ``model.<section>``)."""
    def leaves(d: dict, prefix: str) -> set[str]:
        return {k for key, v in d.items()
                for k in (leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else {f"{prefix}{key}"})}

    given = set()
    if path is not None:
        kind, data = _file_kind(path)
        if isinstance(data, dict):
            given |= leaves(data, "model.") if kind == "model" else leaves(data["config"] if kind == "sweep" else data, "")
    items = model_section_keys(overrides or [])
    given |= set(items) if isinstance(items, dict) else {i.split("=", 1)[0].strip() for i in items}
    return given


def model_section_keys(overrides: list[str] | dict) -> list[str] | dict:
    """Overrides that name a section of open-musiclm's model JSON without ``model.`` (``coarse_cfg.depth=12``,
    ``hubert_kmeans_cfg.codebook_size=128``: the names its JSON uses) read as ``model.<section>...``."""
    def full(key: str) -> str:
        return f"model.{key}" if key.split(".", 1)[0] in MODEL_SECTIONS else key

    if isinstance(overrides, dict):
        return {full(k): v for k, v in overrides.items()}
    return [full(item.split("=", 1)[0].strip()) + "=" + item.split("=", 1)[1] if "=" in item else item
            for item in overrides]


__all__ = [
    "Config", "ConfigError", "DataConfig", "EncodecConfig", "GlobalConfig", "HubertKmeansConfig", "ClapRVQConfig",
    "ModelConfig", "TokenSystemConfig", "TrainConfig", "TransformerConfig", "STAGES", "PRESETS", "TINY",
    "apply_overrides", "from_dict", "to_dict", "load_json", "save_json", "load_config", "load_model_config",
    "model_preset", "preset", "stage_config", "given_settings",
]
