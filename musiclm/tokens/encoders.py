"""The three pretrained encoders: loading them, building offline ``tiny`` stand-ins, and naming their weights.

Real weights come from a local directory or a model-hub id, in transformers' format:
``ClapModel`` + ``ClapProcessor`` (e.g. ``laion/clap-htsat-unfused``), ``HubertModel`` (``m-a-p/MERT-v0``
loads as one), ``EncodecModel`` (``facebook/encodec_24khz``). We use the transformers ports rather than the
``laion-clap`` and ``encodec`` packages: those pull torchaudio/torchvision and pin numpy < 2 (docs/configuration.md).

``tiny`` builds the same architectures at small sizes with seeded random weights, offline (the semantic one's
chosen so that its frames follow the music: ``build_tiny_hubert``); the token system saves them with
``save_pretrained`` and from then on loads them through the same code as real weights.
A random EnCodec has all-zero codebooks (every frame codes to 0), so the tiny one gets codebooks fitted by
residual k-means on its own encoder's latents of rendered synthetic music.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..audio import synth
from ..audio.io import resample
from .kmeans import nearest
from .rvq import ResidualVQ


class EncoderLoadError(RuntimeError):
    """Encoder weights could not be loaded from the given source."""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(kind: str, source: str, loader):
    _quiet_transformers()
    try:
        return loader(source)
    except Exception as e:  # OSError (missing files, no network), ValueError (wrong model type), ...
        hint = {"clap": "a transformers ClapModel with its processor files (e.g. laion/clap-htsat-unfused)",
                "semantic": "a transformers HubertModel (e.g. m-a-p/MERT-v0)",
                "encodec": "a transformers EncodecModel (e.g. facebook/encodec_24khz)"}[kind]
        raise EncoderLoadError(
            f"cannot load the {kind} encoder from {source!r}: {str(e).splitlines()[0][:300]}. Give a local "
            f"directory or a reachable hub id holding {hint}, or use the 'tiny' preset for offline tests.") from None


def load_clap(source: str):
    from transformers import ClapModel, ClapProcessor

    def loader(src):
        model = ClapModel.from_pretrained(src).eval()
        if getattr(model.config.audio_config, "enable_fusion", False):
            raise ValueError("this CLAP uses feature fusion; open-musiclm's released set uses an unfused CLAP")
        return model, ClapProcessor.from_pretrained(src)

    return _load("clap", source, loader)


def load_clap_feature_extractor(source: str):
    from transformers import ClapFeatureExtractor

    return _load("clap", source, ClapFeatureExtractor.from_pretrained)


def load_hubert(source: str):
    from transformers import HubertModel

    return _load("semantic", source, lambda src: HubertModel.from_pretrained(src).eval())


def load_encodec(source: str):
    from transformers import EncodecModel

    return _load("encodec", source, lambda src: EncodecModel.from_pretrained(src).eval())


def load_encodec_config(source: str):
    from transformers import EncodecConfig

    return _load("encodec", source, EncodecConfig.from_pretrained)


def weights_identity(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): which weights these are."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- tiny builders

def _byte_level_tokenizer():
    """A RoBERTa tokenizer over the 256 byte symbols with no merges: CLAP's tokenizer class, built offline."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


def build_tiny_clap(seed: int = 0, projection_dim: int = 512):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    _quiet_transformers()
    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(seed)
    config = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=514, projection_dim=projection_dim),
        audio_config=dict(hidden_size=128, patch_embeds_hidden_size=16, depths=[1, 1, 1, 1],
                          num_attention_heads=[1, 1, 2, 4], projection_dim=projection_dim, enable_fusion=False),
        projection_dim=projection_dim,
    )
    model = ClapModel(config).eval()
    features = ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="rand_trunc")  # laion_clap's
    processor = ClapProcessor(feature_extractor=features, tokenizer=tokenizer)
    return model, processor


TINY_HUBERT_BANDS = 48  # band-pass filters of the tiny semantic encoder, 80 Hz to 6 kHz
TINY_HUBERT_KERNEL = 240  # their length: 15 ms at 16 kHz


def build_tiny_hubert(seed: int = 0, embed_layer: int = 7):
    """A small ``HubertModel`` (MERT-v0's kind: group-norm convolutional front end, 320-sample hop, post-norm
    layers) whose weights are chosen so that its frames follow the music, as a trained encoder's do: a random one's
    frames are noise (its convolutions see the waveform's phase: adjacent 20 ms frames were as alike as any two,
    cosine 0.34, and k-means ids of one frame said nothing of the next), so a semantic stage trained on its ids
    could not get below chance. Here the first convolution is a bank of Hann-windowed band-pass filters
    (``TINY_HUBERT_BANDS``, log-spaced), the GELUs after it rectify, the next six (kernel 2, stride 2, each channel
    to itself) average the rectified bands over 20 ms: a phase-free band-energy envelope per frame, projected
    (seeded random linear) to the model's width; positional convolution, attention and feed-forward outputs are
    zero, so every layer passes that on (through its LayerNorms). Adjacent frames: cosine 0.85 against 0.34 for
    random pairs; 31 % of ids (k = 1024) repeat the previous one (0.9 % with the random encoder). The receptive
    field (555 samples) keeps HuBERT's frame count: n / 320 - 1 frames for n a multiple of 320."""
    from transformers import HubertConfig, HubertModel

    _quiet_transformers()
    torch.manual_seed(seed)
    bands = TINY_HUBERT_BANDS
    config = HubertConfig(hidden_size=64, num_hidden_layers=max(embed_layer, 2), num_attention_heads=2,
                          intermediate_size=128, conv_dim=(bands,) * 7, conv_kernel=(TINY_HUBERT_KERNEL,) + (2,) * 6,
                          conv_stride=(5,) + (2,) * 6, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    model = HubertModel(config).eval()
    rate = 16_000
    t = (np.arange(TINY_HUBERT_KERNEL) - (TINY_HUBERT_KERNEL - 1) / 2) / rate
    filters = np.stack([np.hanning(TINY_HUBERT_KERNEL) * np.cos(2 * np.pi * f * t) for f in np.geomspace(80, 6000, bands)])
    filters /= np.linalg.norm(filters, axis=1, keepdims=True)
    with torch.no_grad():
        model.feature_extractor.conv_layers[0].conv.weight.copy_(torch.tensor(filters, dtype=torch.float32)[:, None])
        for layer in model.feature_extractor.conv_layers[1:]:
            layer.conv.weight.zero_()
            layer.conv.weight[torch.arange(bands), torch.arange(bands)] = 0.5
        position = model.encoder.pos_conv_embed.conv
        position.parametrizations.weight.original0.zero_()  # weight norm's gain: the weight is 0
        position.bias.zero_()
        for layer in model.encoder.layers:
            for out in (layer.attention.out_proj, layer.feed_forward.output_dense):
                out.weight.zero_()
                out.bias.zero_()
    return model


def build_tiny_encodec(seed: int = 0, bandwidth: float = 6.0, codebook_size: int = 1024,
                       num_clips: int = 12, clip_seconds: float = 6.0):
    """Random small EnCodec whose first codebooks are fitted on its latents of synthetic music."""
    from transformers import EncodecConfig, EncodecModel

    _quiet_transformers()
    torch.manual_seed(seed)
    # the bandwidth a codebook size needs for a given count of codebooks is one of the model's own (encode asks it)
    bandwidths = sorted({1.5, 3.0, 6.0, 12.0, 24.0, float(bandwidth)})
    model = EncodecModel(EncodecConfig(num_filters=8, hidden_size=32, codebook_dim=32, num_lstm_layers=1,
                                       codebook_size=codebook_size, target_bandwidths=bandwidths)).eval()
    rate = model.config.sampling_rate
    clips = [resample(synth.render(synth.sample_params(i, seed, clip_seconds)).mean(axis=1), synth.SAMPLE_RATE, rate)
             for i in range(num_clips)]
    with torch.no_grad():
        latents = model.encoder(torch.from_numpy(np.stack(clips))[:, None])  # (B, D, T)
    kmeans_codebooks(model, latents, model.quantizer.get_num_quantizers_for_bandwidth(bandwidth), seed)
    return model


@torch.no_grad()
def kmeans_codebooks(model, latents: torch.Tensor, num_quantizers: int, seed: int = 0) -> None:
    """The first ``num_quantizers`` codebooks of EncodecModel ``model`` fitted by k-means on the residuals of its
    encoder's ``latents`` (B, D, T) (``ResidualVQ.init_kmeans``, 8 iterations, seeded), in place: each codebook's
    ``embed`` and ``embed_avg`` are its centers, ``cluster_size`` the count of latents whose residual it
    quantizes, and it is marked initialized."""
    vectors = latents.transpose(1, 2).reshape(-1, latents.shape[1])
    size = model.config.codebook_size
    rvq = ResidualVQ(num_quantizers=num_quantizers, codebook_size=size, dim=vectors.shape[1])
    rvq.init_kmeans(vectors, iters=8, generator=torch.Generator().manual_seed(seed))
    for q, layer in enumerate(model.quantizer.layers[:num_quantizers]):
        book, centers = layer.codebook, rvq.codebooks[q]
        book.embed.copy_(centers)
        book.embed_avg.copy_(centers)
        idx = nearest(vectors, centers)
        book.cluster_size.copy_(torch.bincount(idx, minlength=size).float())
        book.inited.fill_(1.0)
        vectors = vectors - centers[idx]


def save_clap(model, processor, out: Path) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)
