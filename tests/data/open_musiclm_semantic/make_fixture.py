"""Semantic token ids as open-musiclm computes them, made by open-musiclm's own code (see README.md).

Runs in a scratch environment, never in the project's venv: it imports open-musiclm's `open_musiclm.data`
(`SoundDatasetForPreprocessing`, configured as its `DataPreprocessor` configures it) and
`open_musiclm.hf_hubert_kmeans` (`HfHubertWithKmeans`), which need torchaudio, transformers and scikit-learn.
Nothing from this project is imported.

    PYTHONPATH=OPEN_MUSICLM_CHECKOUT:TORCHAUDIO_DIR python make_fixture.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

HERE = Path(__file__).resolve().parent
TRACK_RATE = 44100
CASES = {  # file -> (sample rate, seconds, channels): a full FMA-like track and a short stereo one
    "track_44k_mono.flac": (44100, 29.5, 1),  # padded to 30 s, no crop: 1,499 semantic frames
    "short_22k_stereo.flac": (22050, 4.3, 2),  # repeated twice and zero-padded to 10 s: 499 frames
}
EXTRA_FOR_KMEANS = 3  # more synthetic clips, used for fitting the k-means only (not stored)


def synth(seed: int, rate: int, seconds: float, channels: int) -> np.ndarray:
    """Notes of a few harmonics, a bass line, hi-hat noise reaching past 8 kHz, a DC offset: (n, channels)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    out = np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rate * rng.uniform(0.15, 0.6))
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        seg = t[pos: pos + length] - t[pos]
        env = np.exp(-seg * rng.uniform(1, 6)) * np.minimum(1, seg * 200)
        tone = sum(rng.uniform(0.2, 1) / h * np.sin(2 * np.pi * f0 * h * seg + rng.uniform(0, 6)) for h in range(1, 6))
        out[pos: pos + length] += 0.3 * env * tone
        pos += length
    out += 0.2 * np.sin(2 * np.pi * 55 * 2 ** (np.floor(t * 2) % 5 / 12) * t)
    hats = rng.standard_normal(n) * (np.sin(2 * np.pi * 4 * t) > 0.6) * 0.08
    out += hats - np.convolve(hats, np.ones(3) / 3, mode="same")  # high-passed: energy near and above 8 kHz
    out += 0.01
    chans = [out * g for g in (1.0, 0.8)[:channels]]
    return np.clip(np.stack(chans, axis=1), -0.99, 0.99)


def load_with_soundfile(path, *args, **kwargs):
    """What `torchaudio.load` returns for 16-bit PCM: float32 in [-1, 1), (channels, frames), and the rate."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()

    import sklearn
    import torchaudio
    import transformers
    from safetensors.torch import save_file
    from transformers import HubertConfig, HubertModel

    import open_musiclm
    from open_musiclm import data as oml_data
    from open_musiclm.hf_hubert_kmeans import HfHubertWithKmeans, get_kmeans_model

    # torchaudio 2.9+ reads files through torchcodec; the fixture's files are 16-bit FLAC, read the same way.
    torchaudio.load = load_with_soundfile
    oml_data.torchaudio.load = load_with_soundfile

    out = args.out
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for i, (name, (rate, seconds, channels)) in enumerate(CASES.items()):
        sf.write(out / "audio" / name, synth(i, rate, seconds, channels), rate, subtype="PCM_16")
    extra = Path("/tmp/open_musiclm_semantic_extra")
    extra.mkdir(exist_ok=True)
    for old in extra.glob("*.flac"):
        old.unlink()
    for i in range(EXTRA_FOR_KMEANS):
        sf.write(extra / f"extra_{i}.flac", synth(100 + i, TRACK_RATE, 20.0, 2), TRACK_RATE, subtype="PCM_16")

    # A small random HuBERT of MERT-v0's kind (group-normed conv front end, 320-sample hop, post-norm layers).
    torch.manual_seed(0)
    config = HubertConfig(hidden_size=64, num_hidden_layers=8, num_attention_heads=2, intermediate_size=128,
                          conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    hubert = HubertModel(config).eval()
    with torch.no_grad():  # perturb norms and biases so that they matter
        for name, p in hubert.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hubert.save_pretrained(out / "hubert", safe_serialization=True)

    def dataset(folder):
        # exactly as open-musiclm's DataPreprocessor builds it (train_fma_preprocess.json: 30 s, random crop),
        # with CLAP at 48 kHz, the semantic encoder at 16 kHz (multiple of 320), EnCodec at 24 kHz
        return oml_data.SoundDatasetForPreprocessing(
            folder, pad_to_seconds=10, max_length_seconds=(30, 30, 30), random_crop=True,
            normalize=(False, True, False), target_sample_hz=(48000, 16000, 24000),
            seq_len_multiple_of=(None, 320, None), ignore_load_errors=False)

    def all_waves(folder):  # file name -> (CLAP's, the semantic encoder's, EnCodec's waveform)
        ds = dataset(folder)
        return {Path(ds[i]["file_path"]).name: ds[i]["data"] for i in range(len(ds))}

    def semantic_waves(folder):
        return {name: data[1] for name, data in all_waves(folder).items()}

    waves_all = all_waves(out / "audio")
    waves = {name: data[1] for name, data in waves_all.items()}
    embedder = HfHubertWithKmeans(hubert=hubert, kmeans=None, embed_layer=7)
    fit_waves = [*waves.values(), *semantic_waves(extra).values()]
    feats = torch.cat([embedder(w[None], return_embed=True)[0] for w in fit_waves]).numpy()
    np.random.seed(0)
    kmeans = get_kmeans_model(n_clusters=256, init="k-means++", max_iter=100, batch_size=10000, tol=0.0,
                              max_no_improvement=100, n_init=3, reassignment_ratio=0.0)
    kmeans.fit(feats)
    save_file({"centers": torch.from_numpy(np.ascontiguousarray(kmeans.cluster_centers_, np.float32))},
              str(out / "kmeans.safetensors"))

    tokenizer = HfHubertWithKmeans(hubert=hubert, kmeans=kmeans, embed_layer=7, codebook_size=256)
    expected, summary = {}, {}
    for name, wave in waves.items():
        key = Path(name).stem
        # as open-musiclm's get_or_compute_semantic_token_ids: a batch of one (from its DataLoader), not flattened
        ids = tokenizer(wave[None], flatten=False)[0]
        expected[f"ids.{key}"] = ids.to(torch.int64).contiguous()
        expected[f"wave.{key}"] = wave.float().contiguous()
        expected[f"embed.{key}"] = embedder(wave[None], return_embed=True)[0].float().contiguous()
        if key.startswith("short"):  # CLAP's and EnCodec's inputs, on the int16 grid (int16 / 32767): exact as int16
            for field, data in (("clap_pcm", waves_all[name][0]), ("acoustic_pcm", waves_all[name][2])):
                pcm = torch.round(data.double() * 32767)
                assert torch.equal((pcm / 32767).float(), data.float())
                expected[f"{field}.{key}"] = pcm.to(torch.int16).contiguous()
        summary[name] = {"sample_rate": CASES[name][0], "seconds": CASES[name][1], "channels": CASES[name][2],
                         "semantic_samples": int(wave.shape[-1]), "ids": int(ids.shape[-1]),
                         "distinct_ids": int(ids.unique().numel())}
    save_file(expected, str(out / "expected.safetensors"))

    repo = Path(open_musiclm.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = {"open_musiclm_commit": commit or "unknown (not a git checkout)",
               "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                            "torchaudio": torchaudio.__version__, "transformers": transformers.__version__,
                            "scikit-learn": sklearn.__version__, "numpy": np.__version__},
               "kmeans": {"n_clusters": 256, "fit_frames": int(len(feats)), "embed_layer": 7},
               "cases": summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
