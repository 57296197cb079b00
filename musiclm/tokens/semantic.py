"""Semantic tokens: a HuBERT-architecture encoder (MERT-v0) at 16 kHz, hidden layer 7, k-means ids at 50 Hz.

As open-musiclm: the waveform is normalized to zero mean / unit variance and cut to a multiple of 320
samples; with ``normalize_embeds`` each feature frame is normalized to zero mean / unit variance too.
Not yet as open-musiclm: it normalizes over the whole file at the original sample rate, before cropping and
before torchaudio's sinc resampling to 16 kHz; here each 16 kHz clip (resampled with soxr) is normalized.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import HubertKmeansConfig
from .kmeans import nearest


def _zero_mean_unit_var(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, keepdim=True) + 1e-7)


class SemanticTokenizer:
    def __init__(self, hubert, centers: torch.Tensor | None, cfg: HubertKmeansConfig,
                 device: str | torch.device = "cpu"):
        self.hubert, self.centers, self.cfg = hubert, centers, cfg
        self.sample_rate = cfg.target_sample_hz
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, audio: np.ndarray) -> torch.Tensor:
        """Layer features (T, D) for 1-D audio or (B, T, D) for a batch (B, N) of equal-length 16 kHz clips."""
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        single = x.ndim == 1
        x = x[None] if single else x
        n = (x.shape[-1] // self.cfg.seq_len_multiple_of) * self.cfg.seq_len_multiple_of
        if n == 0:
            raise ValueError(f"audio of {x.shape[-1]} samples is shorter than one semantic frame "
                             f"({self.cfg.seq_len_multiple_of} samples at {self.sample_rate} Hz)")
        x = _zero_mean_unit_var(x[:, :n]).to(self.device)
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
        """k-means ids (T,) at 50 Hz, or (B, T) for a batch."""
        return self.tokens_of_features(self.features(audio))
