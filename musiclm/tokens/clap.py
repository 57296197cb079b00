"""CLAP conditioning tokens: audio (10 s windows at 48 kHz, with a hop) and text both go through CLAP's
towers to a normalized 512-d embedding, then through the same residual VQ to 12 tokens."""
from __future__ import annotations

import numpy as np
import torch

from ..audio import crop_or_pad, window_starts
from ..config import ClapRVQConfig
from .rvq import ResidualVQ


def _pooled(output) -> torch.Tensor:
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClapTokenizer:
    def __init__(self, model, processor, rvq: ResidualVQ, cfg: ClapRVQConfig, window_seconds: float,
                 device: str | torch.device = "cpu", batch_size: int = 16):
        self.model, self.processor, self.rvq, self.cfg = model, processor, rvq, cfg
        self.sample_rate = cfg.sample_rate
        self.window = int(round(window_seconds * cfg.sample_rate))
        self.hop = int(round(cfg.hop_seconds * cfg.sample_rate))
        self.device, self.batch_size = torch.device(device), batch_size

    def windows(self, audio: np.ndarray) -> np.ndarray:
        """(n_windows, window) crops of 48 kHz audio every ``hop``; audio shorter than a window gives one."""
        if audio.shape[-1] < self.window:  # CLAP's own "repeatpad" fills a short window by repetition
            return audio[None].astype(np.float32)
        return np.stack([crop_or_pad(audio, self.window, s) for s in window_starts(audio.shape[-1], self.window, self.hop)])

    @torch.no_grad()
    def audio_embeddings(self, audio: np.ndarray) -> torch.Tensor:
        """Embeddings (n_windows, dim) of 48 kHz mono ``audio``."""
        crops = list(self.windows(audio))
        out = []
        for i in range(0, len(crops), self.batch_size):
            feats = self.processor.feature_extractor(crops[i: i + self.batch_size], sampling_rate=self.sample_rate,
                                                     truncation="rand_trunc", padding="repeatpad", return_tensors="pt")
            feats = {k: v.to(self.device) for k, v in feats.items()}
            out.append(_pooled(self.model.get_audio_features(**feats)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (len(texts), dim) of captions or prompts."""
        enc = self.processor.tokenizer(list(texts), padding=True, truncation=True,
                                       max_length=self.cfg.text_max_tokens, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.model.get_text_features(**enc)).float().cpu()

    def tokens(self, embeddings: torch.Tensor) -> np.ndarray:
        """RVQ tokens (n, rq_num_quantizers) of embeddings (n, dim)."""
        return self.rvq.encode(embeddings.to(self.rvq.codebooks.device)).cpu().numpy()

    def audio_tokens(self, audio: np.ndarray) -> np.ndarray:
        return self.tokens(self.audio_embeddings(audio))

    def text_tokens(self, texts: list[str]) -> np.ndarray:
        return self.tokens(self.text_embeddings(texts))
