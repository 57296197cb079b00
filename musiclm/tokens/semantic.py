"""Semantic tokens: a HuBERT-architecture encoder (MERT-v0) at 16 kHz, hidden layer 7, k-means ids at 50 Hz.

As open-musiclm (its ``SoundDatasetForPreprocessing.process_audio`` and ``HfHubertWithKmeans``):
1. the track, mono, at its own sample rate and padded as ``data.clips.pad_clip`` pads, is normalized to zero
   mean and unit variance (unbiased variance + 1e-7) over all of it;
2. the clip to tokenize is cut from that and resampled to 16 kHz with torchaudio's sinc filter
   (``audio.io.sinc_resample``), then cut to a multiple of 320 samples;
3. the encoder's hidden layer 7 (all-ones attention mask), each feature frame normalized to zero mean and unit
   variance (``normalize_embeds``), and the nearest k-means center.
``prepare_waveform`` does 1-2, ``SemanticTokenizer`` 3. ``tests/test_open_musiclm_semantic.py`` checks the ids
against those open-musiclm's own code gives (``tests/data/open_musiclm_semantic``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..audio.io import sinc_resample
from ..config import HubertKmeansConfig
from .kmeans import nearest


def _zero_mean_unit_var(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, keepdim=True) + 1e-7)


def waveform_stats(track: np.ndarray) -> tuple[float, float]:
    """(mean, sqrt(unbiased variance + 1e-7)) of a whole (padded) track: what open-musiclm normalizes by."""
    x = np.asarray(track, dtype=np.float64)
    var = x.var(ddof=1) if len(x) > 1 else 0.0
    return float(x.mean()), float(np.sqrt(var + 1e-7))


def prepare_waveform(audio: np.ndarray, rate: int, target_rate: int,
                     stats: tuple[float, float] | None = None) -> np.ndarray:
    """The semantic encoder's input: ``audio`` normalized by ``stats`` (``waveform_stats`` of the track it was cut
    from; of ``audio`` itself when None), resampled to ``target_rate`` as open-musiclm resamples."""
    mean, std = waveform_stats(audio) if stats is None else stats
    x = (np.asarray(audio, dtype=np.float32) - np.float32(mean)) / np.float32(std)
    return sinc_resample(x, rate, target_rate)


class SemanticTokenizer:
    def __init__(self, hubert, centers: torch.Tensor | None, cfg: HubertKmeansConfig,
                 device: str | torch.device = "cpu"):
        self.hubert, self.centers, self.cfg = hubert, centers, cfg
        self.sample_rate = cfg.target_sample_hz
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, audio: np.ndarray) -> torch.Tensor:
        """Layer features (T, D) for a prepared 16 kHz waveform (``prepare_waveform``), or (B, T, D) for a batch
        (B, N) of equal-length ones."""
        a = np.asarray(audio, dtype=np.float32)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # read-only (Ray's object store): torch warns
        single = x.ndim == 1
        x = x[None] if single else x
        n = (x.shape[-1] // self.cfg.seq_len_multiple_of) * self.cfg.seq_len_multiple_of
        if n == 0:
            raise ValueError(f"audio of {x.shape[-1]} samples is shorter than one semantic frame "
                             f"({self.cfg.seq_len_multiple_of} samples at {self.sample_rate} Hz)")
        x = x[:, :n].to(self.device)
        out = self.hubert(input_values=x, attention_mask=torch.ones_like(x, dtype=torch.long),
                          output_hidden_states=True)
        feats = out.hidden_states[self.cfg.embed_layer]
        if self.cfg.normalize_embeds:
            feats = _zero_mean_unit_var(feats)
        feats = feats.float().cpu()
        return feats[0] if single else feats

    def tokens_of_features(self, feats: torch.Tensor) -> np.ndarray:
        if self.centers is None:
            raise RuntimeError("the semantic k-means has not been fitted yet: run `musiclm fit-kmeans` on this "
                               "token system first")
        flat = feats.reshape(-1, feats.shape[-1]).to(self.centers.device)
        return nearest(flat, self.centers).cpu().numpy().reshape(feats.shape[:-1])

    def tokens(self, audio: np.ndarray) -> np.ndarray:
        """k-means ids (T,) at 50 Hz of a prepared waveform, or (B, T) for a batch."""
        return self.tokens_of_features(self.features(audio))
