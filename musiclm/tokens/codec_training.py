"""Training the token system's EnCodec to reconstruct a corpus (``musiclm fit-codec``), on Ray Train.

For the offline world: the `tiny` EnCodec starts random, and its decoder turns any tokens into the same
stationary comb, so nothing generated sounds like the corpus. Real systems keep the pretrained EnCodec. The model
stays transformers' ``EncodecModel`` (same class and files: every consumer is unchanged) and is trained as
EnCodec is, less its adversarial losses: encoder -> residual VQ at the token system's bandwidth (the number of
codebooks the tokens use) -> decoder, with

- an L1 waveform loss (``wave_weight``) and a multi-scale log-mel L1 loss (FFT sizes 512, 1024, 2048; 64 mels);
- the quantizer's straight-through gradient and a commitment loss (``commitment_weight``) on the encoder;
- codebooks learned by exponential moving averages of the latents assigned to them (``ema_decay``, the statistics
  summed over every worker), and a code whose average use falls below ``dead_code_threshold`` replaced by a latent
  of the batch, so that codebooks stay in use.

A random codec (the ``tiny`` preset's) is re-initialized from the corpus first (``init``): its latents barely move
in time (their std over time is 3 % of their std: convolutions' biases outweigh the signal after a few layers of
PyTorch's default initialization), and trained from there its codes collapse to under 1 % of each codebook while the
decoder learns the corpus's mean spectrum. ``data_init`` zeroes the encoder's biases, scales each convolution to
unit-order output on a batch of training segments (layer-sequential unit variance, Mishkin & Matas 2016) and k-means
the codebooks on the new latents. ``init="auto"`` does so only when the latents' variation over time is below
``STATIC_LATENTS`` of their whole variation (a pretrained EnCodec's is far above it); ``"data"`` always, ``"keep"``
never.

Rows are ``segment_seconds`` crops of each track at EnCodec's rate (``segments_per_track`` of them, seeded per
track). Held-out tracks are scored before the first step and at every checkpoint as the tokens see them: encoded
to codes at the token system's bandwidth and decoded back, ``valid/log_mel_distance`` (mean L1 between log-mel
spectrograms, FFT 1024) and ``valid/codes_used`` (the share of each codebook's codes the held-out audio uses).
The loop, checkpoints and the write into the token system are ``tuning``'s.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audio.io import AudioDecodeError, crop_or_pad, decode_audio
from ..config_io import check
from ..data.clips import stable_fraction
from .kmeans import nearest
from .rvq import ema_update
from .system import encoder_source, read_meta, tokenizer_input, writable_root
from .tuning import (Task, TuneSettings, fit, held_out_rows, run_loop, run_report, save_tuned, scores, split_tracks,
                     track_dataset)

REPORT = "fit_codec.report.json"
STATIC_LATENTS = 0.1  # latents' std over time / their std, below which init="auto" re-initializes the encoder
INIT_SEGMENTS = 256  # training segments data_init fits the codebooks on (about 19,000 latents of 1 s segments)
INIT_SCALE_SEGMENTS = 32  # of which it scales the convolutions on
MEL_FFTS = (512, 1024, 2048)
EVAL_FFT = 1024
MELS = 64


@dataclass
class CodecTrainConfig(TuneSettings):
    """fit-codec's settings (``TuneSettings``: steps, batch size, lr, ...)."""
    lr: float = 1e-3
    batch_size: int = 16
    warmup: int = 10
    valid_tracks: int = 32
    segment_seconds: float = 1.0
    segments_per_track: int = 8
    wave_weight: float = 0.1
    mel_weight: float = 1.0
    commitment_weight: float = 1.0
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.1  # EMA uses below which a code takes a latent of the batch
    init: str = "auto"  # "auto", "data" (data_init before the first step) or "keep" (the codec as it is)

    def __post_init__(self):
        super().__post_init__()
        check(self.init in ("auto", "data", "keep"), "init", f"must be auto, data or keep, not {self.init!r}")
        check(self.segment_seconds > 0 and self.segments_per_track >= 1, "segment_seconds",
              "segment_seconds must be > 0 and segments_per_track >= 1")
        check(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")


# ---------------------------------------------------------------------------------------------- data

def _segments(row: dict, rate: int, seconds: float, count: int, hop: int, max_seconds: float, seed: int) -> list[dict]:
    """Rows of one track: ``count`` crops of ``seconds`` (a whole number of codec frames) at EnCodec's ``rate``,
    as the tokenizer reads audio; one row with ``error`` set when it cannot be decoded."""
    try:
        audio, source_rate = decode_audio(row["path"], max_seconds=max_seconds)
    except AudioDecodeError as e:
        return [{"id": row["id"], "audio": np.zeros(0, np.float32), "error": e.reason}]
    wave = tokenizer_input("acoustic", audio, source_rate, rate)
    length = max(hop, int(round(seconds * rate / hop)) * hop)
    rng = np.random.default_rng([seed, int(stable_fraction(seed, row["id"]) * 2 ** 32)])
    starts = rng.integers(0, max(1, len(wave) - length + 1), count)
    return [{"id": row["id"], "audio": crop_or_pad(wave, length, int(s)).astype(np.float32), "error": ""}
            for s in sorted(starts)]


# ---------------------------------------------------------------------------------------------- losses

class LogMel(torch.nn.Module):
    """log(mel spectrogram + 1e-5) of (B, N) audio at one FFT size (Hann window, hop n_fft / 4)."""

    def __init__(self, rate: int, n_fft: int, mels: int = MELS):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=mels, min_frequency=0.0,
                               max_frequency=rate / 2, sampling_rate=rate, norm="slaney", mel_scale="slaney")
        self.n_fft = n_fft
        self.register_buffer("bank", torch.tensor(bank, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, self.n_fft // 4, window=self.window, return_complex=True).abs()
        return torch.log(spec.transpose(1, 2) @ self.bank + 1e-5)


class CodecAutoencoder(torch.nn.Module):
    """EnCodec as it is trained: encoder, residual VQ over ``num_quantizers`` codebooks with a straight-through
    gradient and EMA codebooks (in training mode), decoder. ``forward`` gives the reconstruction of (B, N) audio and
    the commitment loss. The codebooks are ``codec``'s own buffers, updated in place."""

    def __init__(self, codec, num_quantizers: int, decay: float, threshold: float):
        super().__init__()
        self.codec, self.num_quantizers, self.decay, self.threshold = codec, num_quantizers, decay, threshold

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.codec.encoder(audio[:, None])  # (B, D, T)
        flat = latents.transpose(1, 2).reshape(-1, latents.shape[1])
        residual, quantized, commitment = flat, torch.zeros_like(flat), flat.new_zeros(())
        for layer in self.codec.quantizer.layers[: self.num_quantizers]:
            book = layer.codebook
            r = residual.detach()
            idx = nearest(r, book.embed)
            if self.training:
                self._ema(book, r, idx)
            q = book.embed[idx]
            commitment = commitment + F.mse_loss(residual, q.detach())
            quantized = quantized + q
            residual = residual - q
        quantized = flat + (quantized - flat).detach()  # straight-through to the encoder
        out = self.codec.decoder(quantized.reshape(latents.shape[0], latents.shape[2], -1).transpose(1, 2))
        return out[:, 0, : audio.shape[-1]], commitment

    @torch.no_grad()
    def _ema(self, book, r: torch.Tensor, idx: torch.Tensor) -> None:
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        ema_update(book.embed, book.cluster_size, book.embed_avg, r, idx, self.decay, 1e-5,
                   reduce=torch.distributed.all_reduce if distributed else None)  # every worker's batch
        dead = book.cluster_size < self.threshold
        if dead.any():  # a code hardly used takes a latent of the batch (rank 0's: DDP broadcasts buffers)
            pick = torch.randint(0, len(r), (int(dead.sum()),), device=r.device)
            book.embed[dead] = r[pick]
            book.embed_avg[dead] = r[pick] * self.threshold
            book.cluster_size[dead] = self.threshold


def _encoder_convs(codec) -> list[torch.nn.Conv1d]:
    return [m for m in codec.encoder.modules() if isinstance(m, torch.nn.Conv1d)]


def latent_motion(codec, audio: np.ndarray) -> float:
    """How much the encoder's latents of (N, L) ``audio`` move in time: their std over time (mean over clips and
    channels) over their std overall. About 0.03 for a random tiny EnCodec; a codec whose latents carry the audio
    has most of their variation in time."""
    with torch.no_grad():
        latents = codec.encoder(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[:, None])
    return float(latents.std(-1).mean() / latents.std().clamp_min(1e-12))


class _Reached(Exception):
    pass


@torch.no_grad()
def data_init(codec, audio: np.ndarray, num_quantizers: int, seed: int = 0, target_std: float = 0.5,
              scale_on: int = INIT_SCALE_SEGMENTS) -> None:
    """Re-initialize ``codec``'s encoder and codebooks from (N, L) training ``audio``, in place: the encoder's
    convolution biases zeroed, then each convolution in turn scaled so that its output's std on the first
    ``scale_on`` clips is ``target_std`` (one pass each is exact: without a bias a convolution's output scales with
    its weight; weight-normed ones are scaled through their magnitude), then the first ``num_quantizers`` codebooks
    fitted by k-means on the residuals of the latents of all of ``audio`` (their EMA statistics restarted: each code
    counted once, so that the first batches move them)."""
    from torch.nn.utils import parametrize

    from .encoders import kmeans_codebooks

    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[:, None]
    convs = _encoder_convs(codec)
    for conv in convs:
        if conv.bias is not None:
            conv.bias.zero_()
    for conv in convs:
        seen = {}

        def stop(mod, inputs, out):  # the layers after this one need not run
            seen["out"] = out
            raise _Reached

        hook = conv.register_forward_hook(stop)
        try:
            codec.encoder(x[:scale_on])
        except _Reached:
            pass
        finally:
            hook.remove()
        factor = target_std / float(seen["out"].std().clamp_min(1e-12))
        if parametrize.is_parametrized(conv, "weight"):
            conv.parametrizations.weight.original0.mul_(factor)
        else:
            conv.weight.mul_(factor)
    kmeans_codebooks(codec, codec.encoder(x), num_quantizers, seed)
    for layer in codec.quantizer.layers[:num_quantizers]:
        layer.codebook.cluster_size.fill_(1.0)


def log_mel_distance(codec, audio: np.ndarray, bandwidth: float, device, batch: int = 16) -> tuple[float, np.ndarray]:
    """Mean L1 distance between the log-mel spectrograms (FFT 1024) of (N, L) audio and of its reconstruction
    through codes at ``bandwidth`` (encode, then decode: what tokens give back); and the codes, (N, Q, T)."""
    mel = LogMel(int(codec.config.sampling_rate), EVAL_FFT).to(device)
    total, codes = 0.0, []
    with torch.no_grad():
        for i in range(0, len(audio), batch):
            x = torch.from_numpy(np.array(audio[i: i + batch], dtype=np.float32)).to(device)  # (a read-only ray.get)
            c = codec.encode(x[:, None], bandwidth=bandwidth).audio_codes  # (1, B, Q, T)
            y = codec.decode(c, [None]).audio_values[:, 0, : x.shape[-1]]
            total += float((mel(y) - mel(x)).abs().mean()) * len(x)
            codes.append(c[0].cpu().numpy())
    return total / len(audio), np.concatenate(codes)


# ---------------------------------------------------------------------------------------------- the loop

class CodecTask(Task):
    name, unit = "fit-codec", "segments"

    def __init__(self, loop_cfg: dict, cfg: CodecTrainConfig, device: torch.device, held: dict | None):
        from .encoders import load_encodec

        self.cfg, self.device, self.held = cfg, device, held
        self.model = load_encodec(loop_cfg["encodec"])
        if loop_cfg.get("initial") is not None:  # data_init's weights, the same on every rank (a resume loads its own)
            import ray

            self.model.load_state_dict(ray.get(loop_cfg["initial"]))
        self.model.to(device)
        self.bandwidth = float(loop_cfg["bandwidth"])
        n_q = int(self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))
        self.autoencoder = CodecAutoencoder(self.model, n_q, cfg.ema_decay, cfg.dead_code_threshold)
        rate = int(self.model.config.sampling_rate)
        self.mels = torch.nn.ModuleList(LogMel(rate, n) for n in MEL_FFTS).to(device)

    def trained_module(self) -> torch.nn.Module:
        return self.autoencoder

    def train_mode(self) -> None:
        self.autoencoder.train()

    def loss(self, net, batch: dict) -> torch.Tensor | None:
        if not len(batch["audio"]):
            return None
        x = torch.from_numpy(np.stack(batch["audio"]).astype(np.float32)).to(self.device)
        y, commitment = net(x)
        mel = sum((m(y) - m(x)).abs().mean() for m in self.mels) / len(self.mels)
        return self.cfg.wave_weight * (y - x).abs().mean() + self.cfg.mel_weight * mel \
            + self.cfg.commitment_weight * commitment

    def evaluate(self) -> dict[str, float]:
        distance, codes = log_mel_distance(self.model, self.held["audio"], self.bandwidth, self.device)
        return {"valid/log_mel_distance": distance, **_codes_used(codes, self.model.config.codebook_size),
                "valid/segments": float(len(self.held["audio"]))}

    def describe(self, scores: dict) -> str:
        return (f"held-out log-mel distance {scores['valid/log_mel_distance']:.4f} over "
                f"{int(scores['valid/segments'])} segments; codes used {scores['valid/codes_used']:.1%} per codebook "
                f"(least {scores['valid/codes_used_min']:.1%})")


codec_loop = functools.partial(run_loop, CodecTask, CodecTrainConfig)


# ---------------------------------------------------------------------------------------------- driver

def initialize(encodec: str, train_ds, bandwidth: float, held: np.ndarray, cfg: CodecTrainConfig,
               log) -> tuple[dict, dict | None]:
    """``cfg.init`` applied on the driver: what was measured and decided, and for "data", or "auto" with latents
    that barely move in time (``latent_motion`` of ``INIT_SCALE_SEGMENTS`` training segments below
    ``STATIC_LATENTS``), ``data_init``'s weights for the workers (else None) and the held-out scores of the codec
    as it was (``token_system_codec``). A resumed run computes them again and loads its checkpoint instead."""
    from .encoders import load_encodec

    if cfg.init == "keep":
        return {"mode": "keep", "reinitialized": False}, None
    codec = load_encodec(encodec)
    rows = train_ds.take_batch(INIT_SEGMENTS, batch_format="numpy")
    segments = [np.asarray(a, np.float32) for a, error in zip(rows["audio"], rows["error"]) if not error]
    if len(segments) < 2:
        raise ValueError("fit-codec: fewer than 2 training segments could be decoded to initialize the codec from")
    audio = np.stack(segments)
    motion = latent_motion(codec, audio[:INIT_SCALE_SEGMENTS])
    out = {"mode": cfg.init, "latent_motion": round(motion, 4), "reinitialized": False}
    if cfg.init == "auto" and motion >= STATIC_LATENTS:
        log(f"fit-codec: the codec's latents move in time ({motion:.3f} of their variation): trained as it is")
        return out, None
    n_q = int(codec.quantizer.get_num_quantizers_for_bandwidth(bandwidth))
    distance, codes = log_mel_distance(codec, held, bandwidth, "cpu")
    before = {"valid/log_mel_distance": distance, **_codes_used(codes, codec.config.codebook_size)}
    data_init(codec, audio, n_q, seed=cfg.seed)
    after = latent_motion(codec, audio[:INIT_SCALE_SEGMENTS])
    why = (f"the codec's latents hardly move in time ({motion:.3f} of their variation, below {STATIC_LATENTS})"
           if motion < STATIC_LATENTS else f"--init data (its latents' motion was {motion:.3f})")
    log(f"fit-codec: {why}: encoder and codebooks re-initialized from {len(audio)} training segments "
        f"(now {after:.3f}; --init keep trains it as it is)")
    return {**out, "reinitialized": True, "latent_motion_after": round(after, 4), "segments": len(audio),
            "token_system_codec": before}, codec.state_dict()


def _codes_used(codes: np.ndarray, size: int) -> dict[str, float]:
    """The share of each codebook's codes that (N, Q, T) ``codes`` use: mean and least over codebooks."""
    used = [len(np.unique(codes[:, q])) / size for q in range(codes.shape[1])]
    return {"valid/codes_used": float(np.mean(used)), "valid/codes_used_min": float(np.min(used))}


def fit_codec(token_system: str | Path, source, cfg: CodecTrainConfig, run_dir: str, cluster_cpus: float,
              log=print) -> dict:
    """Train the EnCodec of ``token_system`` to reconstruct ``source``'s tracks (a ``data.sources.Source``) in the
    run ``run_dir`` (resumed when it has a checkpoint), then write its weights into the token system. Needs a
    connected Ray."""
    from .encoders import load_encodec_config

    start = time.time()
    root = Path(writable_root(token_system))
    _, ts_cfg = read_meta(root)
    tracks = [t for t in source.tracks if not t.problem_kind]
    train, valid = split_tracks(tracks, cfg)
    if len(valid) < 2 or not train:
        raise ValueError(f"fit-codec needs at least 2 held-out tracks (a fifth of the tracks, at most "
                         f"--valid-tracks) and some to train on: {source.root} has {len(tracks)}")
    encodec = encoder_source(root, ts_cfg, "encodec_cfg")
    codec_cfg = load_encodec_config(encodec)
    rate, hop = int(codec_cfg.sampling_rate), int(np.prod(codec_cfg.upsampling_ratios))
    log(f"fit-codec: {len(train)} train and {len(valid)} held-out tracks of {source.describe()}; {cfg.steps} steps "
        f"of {cfg.batch_size} segments of {cfg.segment_seconds:g} s x {cfg.num_workers} workers at lr {cfg.lr:g}")
    kwargs = {"rate": rate, "seconds": cfg.segment_seconds, "count": cfg.segments_per_track, "hop": hop,
              "max_seconds": cfg.max_seconds, "seed": cfg.seed}
    train_ds, cached = track_dataset(train, _segments, kwargs, cfg,
                                     cfg.segments_per_track * 4 * int(cfg.segment_seconds * rate))
    rows, bad = held_out_rows(valid, _segments, {**kwargs, "seed": cfg.seed + 1}, cfg, "fit-codec", log)
    held = {"audio": np.stack([np.asarray(r["audio"], np.float32) for r in rows])}
    loop_cfg = {"encodec": encodec, "bandwidth": ts_cfg.encodec_cfg.bandwidth}
    init, weights = initialize(encodec, train_ds, ts_cfg.encodec_cfg.bandwidth, held["audio"], cfg, log)
    untrained = init.pop("token_system_codec", None)  # the codec as it was, when the loop starts from a new one
    if weights is not None:
        import ray

        loop_cfg["initial"] = ray.put(weights)
    state, before, after, checkpoint = fit(codec_loop, run_dir, loop_cfg, cfg, train_ds, cached, held, cluster_cpus)
    report = {**run_report("encodec", run_dir, checkpoint, source, train, valid, bad, after, cfg), "init": init,
              "reconstruction": {"untrained": untrained or scores(before),
                                 "initialized": scores(before) if init["reinitialized"] else None,
                                 "trained": scores(after["metrics"])}}
    save_tuned(root, "encodec_cfg", state, report, REPORT, start, log=log)
    b, a = report["reconstruction"]["untrained"], report["reconstruction"]["trained"]
    log(f"held-out reconstruction ({len(valid)} tracks): log-mel distance {b['valid/log_mel_distance']:.4f} -> "
        f"{a['valid/log_mel_distance']:.4f}; codes used per codebook {b['valid/codes_used']:.1%} -> "
        f"{a['valid/codes_used']:.1%}")
    return report


__all__ = ["CodecTrainConfig", "CodecTask", "CodecAutoencoder", "fit_codec", "data_init", "latent_motion",
           "log_mel_distance", "REPORT"]
