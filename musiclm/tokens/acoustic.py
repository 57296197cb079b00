"""Acoustic tokens: EnCodec 24 kHz at 6 kbps gives 8 codebooks at 75 Hz; coarse = the first 3, fine = the
other 5. Decoding turns codes back into audio."""
from __future__ import annotations

import numpy as np
import torch

from ..config import EncodecConfig


class AcousticCodec:
    def __init__(self, encodec, cfg: EncodecConfig, device: str | torch.device = "cpu"):
        self.model, self.cfg = encodec, cfg
        self.device = torch.device(device)
        self.sample_rate = int(encodec.config.sampling_rate)
        self.num_quantizers = int(encodec.quantizer.get_num_quantizers_for_bandwidth(cfg.bandwidth))
        self.hop = int(np.prod(encodec.config.upsampling_ratios))

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Codes (T, Q) for 1-D 24 kHz audio, or (B, T, Q) for a batch (B, N)."""
        a = np.asarray(audio, dtype=np.float32)
        # a read-only array (Ray's object store hands those out) made torch warn once per tokenizer: copied
        x = torch.from_numpy(a if a.flags.writeable else a.copy())
        single = x.ndim == 1
        x = (x[None] if single else x)[:, None].to(self.device)
        out = self.model.encode(x, bandwidth=self.cfg.bandwidth)
        codes = out.audio_codes  # (chunks, B, Q, T); one chunk for the 24 kHz model
        codes = codes.permute(1, 0, 3, 2).reshape(x.shape[0], -1, codes.shape[2]).cpu().numpy()
        return codes[0] if single else codes

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Audio (T * hop,) for codes (T, Q), or (B, T * hop) for (B, T, Q)."""
        c = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        single = c.ndim == 2
        c = (c[None] if single else c).permute(0, 2, 1)[None].to(self.device)  # (1, B, Q, T)
        audio = self.model.decode(c, [None]).audio_values[:, 0].float().cpu().numpy()
        return audio[0] if single else audio
