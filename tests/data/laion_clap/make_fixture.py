"""Make the laion_clap parity fixture: a small unfused HTSAT/RoBERTa CLAP with random weights, saved the way
laion_clap's training saves checkpoints, and the embeddings laion_clap's own code computes with it.

Runs in a scratch environment beside the project's, never in it (laion-clap pins numpy < 2); see README.md.
Nothing here reimplements laion_clap: the model, the checkpoint loading (``CLAP_Module.load_ckpt``) and the
embeddings (``get_audio_embedding_from_data``, ``get_text_embedding``) are its code. Only the sizes are
changed (a four-stage HTSAT with one block per stage, a one-layer RoBERTa) so the checkpoint fits in the
test data, and what it would fetch from the model hub is built offline:

- ``RobertaModel.from_pretrained('roberta-base')`` returns a randomly initialized one-layer RoBERTa of
  width 768 (laion's text projection expects 768);
- the RoBERTa tokenizer is a byte-level RoBERTa tokenizer with no merges (the one the project builds for
  its offline ``tiny`` system), saved to ``tokenizer/`` so the test tokenizes with the same files.

Writes, next to this file: ``clap_random.pt`` ({'state_dict': {'module.<name>': tensor}}, float16 values,
as laion's released checkpoints hold their state dict), ``tokenizer/``, ``audio.safetensors`` (int16 PCM at
48 kHz, one tensor per clip), ``expected.safetensors`` (audio_<i> and text embeddings) and ``summary.json``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
SR = 48000
FRONT_END = ("audio_branch.spectrogram_extractor.", "audio_branch.logmel_extractor.")
CAPTIONS = ["slow ambient pads", "fast techno beat with a heavy kick", "a solo piano ballad",
            "distorted electric guitar riff", "jazz trio, brushed drums, upright bass", "", "choir",
            "lo-fi hip hop beat to study to, vinyl crackle and a mellow rhodes piano, at 80 beats per minute, "
            "with rain sounds in the background and a long fade out at the end of the track"]
# clip lengths in seconds: shorter than CLAP's 10 s window (repeat-padded), exactly 10 s
LENGTHS = [0.25, 1.0, 2.5, 3.0, 5.0, 7.5, 10.0, 10.0]


def byte_level_tokenizer():
    """vocab.json + merges.txt of a byte-level RoBERTa tokenizer with no merges, in tokenizer/, loaded."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    folder = HERE / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def waveform(pcm):
    """The float32 waveform given to CLAP: the stored PCM scaled by 1.37, so that it lies off the int16 grid
    (laion_clap's int16 round trip changes it) and the loud clip exceeds full scale (clamped). Each step is one
    correctly rounded float32 operation, so the test recomputes exactly these samples."""
    import numpy as np

    return pcm.astype(np.float32) * np.float32(1.37) / np.float32(32767.0)


def stand_in(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


def clips():
    """Deterministic test audio (int16): chords, noise, a clipped loud tone, a very quiet one."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i, seconds in enumerate(LENGTHS):
        t = np.arange(int(round(seconds * SR))) / SR
        f0 = 110.0 * 2 ** (i / 3)
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3, 5))
        x = x * (0.5 + 0.5 * np.sin(2 * np.pi * (0.5 + i) * t)) + rng.normal(0, 0.05, t.shape)
        gain = {3: 0.9, 4: 0.002}.get(i, 0.3)  # clip 3 exceeds full scale once scaled, clip 4 is near silence
        out.append(np.clip(np.round(x * gain * 32767), -32768, 32767).astype(np.int16))
    return out


def main() -> None:
    import numpy as np
    import torch
    import transformers

    # torchvision is imported by laion_clap but unused by an unfused model: stand-in modules, made after
    # transformers is imported (it probes for torchvision)
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.datasets",
                 "torchvision.transforms"):
        stub = sys.modules.setdefault(name, types.ModuleType(name))
        stub.__getattr__ = stand_in
    tokenizer = byte_level_tokenizer()
    for cls in (transformers.RobertaTokenizer, transformers.BertTokenizer, transformers.BartTokenizer):
        cls.from_pretrained = classmethod(lambda cls, *a, **k: tokenizer)
    # roberta-base's configuration, but one layer, a narrow feed-forward, the tokenizer's vocabulary and
    # positions for CLAP's 77 tokens
    text_config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=1,
                                             num_attention_heads=12, intermediate_size=64,
                                             max_position_embeddings=80, type_vocab_size=1, layer_norm_eps=1e-5,
                                             pad_token_id=1, bos_token_id=0, eos_token_id=2)
    transformers.RobertaModel.from_pretrained = classmethod(lambda cls, *a, **k: cls(text_config))

    import laion_clap
    from clap_module import factory, htsat

    small = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4])
    swin_init = htsat.HTSAT_Swin_Transformer.__init__
    htsat.HTSAT_Swin_Transformer.__init__ = lambda self, **kw: swin_init(self, **{**kw, **small})
    cfg = json.loads(json.dumps(factory._MODEL_CONFIGS["HTSAT-tiny"]))
    cfg["embed_dim"] = small["embed_dim"] * 2 ** (len(small["depths"]) - 1)  # HTSAT's output width
    cfg["joint_embed_shape"] = 64
    cfg["audio_cfg"]["class_num"] = 8  # HTSAT's classification head (unused for embeddings), kept small
    factory._MODEL_CONFIGS["HTSAT-mini"] = cfg

    torch.manual_seed(0)
    module = laion_clap.CLAP_Module(enable_fusion=False, device="cpu", amodel="HTSAT-mini", tmodel="roberta")
    state = module.model.state_dict()
    for name, value in state.items():
        # Perturb every learned tensor (norm gains 1 and biases 0 at initialization would hide swapped names);
        # keep the fixed STFT and mel matrices of the audio front end exact.
        if value.is_floating_point() and not name.startswith(FRONT_END):
            noisy = value + 0.05 * torch.randn_like(value)
            value.copy_(noisy.abs() if name.endswith("running_var") else noisy)
    state["text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # as released checkpoints have it
    # float16 values (stored as float16, loaded into the float32 model exactly) keep the file small
    saved = {f"module.{k}": (v.half() if v.is_floating_point() and not k.startswith(FRONT_END) else v)
             for k, v in state.items()}
    checkpoint = {"epoch": 1, "name": "laion_clap parity fixture (random weights)", "state_dict": saved}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint, Path(tmp) / "full.pt")
        module.load_ckpt(str(Path(tmp) / "full.pt"), verbose=False)  # laion's own loader
    # The committed copy leaves out the front end's fixed STFT and mel matrices (4 MB of constants that
    # every HTSAT has and that converters do not read); everything else is as laion_clap loaded it.
    checkpoint["state_dict"] = {k: v for k, v in saved.items() if not k.startswith(tuple("module." + f for f in FRONT_END))}
    torch.save(checkpoint, HERE / "clap_random.pt")

    audio = clips()
    emb_audio = module.get_audio_embedding_from_data([waveform(a) for a in audio])
    ids = [tokenizer(c, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
           for c in CAPTIONS]
    emb_text = module.get_text_embedding(CAPTIONS, tokenizer=lambda x: tokenizer(
        x, padding="max_length", truncation=True, max_length=77, return_tensors="pt"))
    assert len(ids) == len(emb_text)

    from safetensors.numpy import save_file

    save_file({f"clip_{i}": a for i, a in enumerate(audio)}, HERE / "audio.safetensors")
    save_file({"audio": np.asarray(emb_audio, np.float32), "text": np.asarray(emb_text, np.float32)},
              HERE / "expected.safetensors")
    versions = {m: sys.modules[m].__version__ for m in ("torch", "numpy", "transformers")}
    versions["laion_clap"] = "1.1.7"
    (HERE / "summary.json").write_text(json.dumps({
        "made_by": "make_fixture.py (laion_clap's CLAP_Module, random weights)", "versions": versions,
        "audio_input": "float32 clip_i * float32(1.37) / float32(32767), mono 48 kHz, passed to "
                       "get_audio_embedding_from_data",
        "clip_seconds": LENGTHS, "captions": CAPTIONS,
        "text_tokenization": "tokenizer/ with padding='max_length', truncation, max_length=77",
        "sizes": {"htsat": small, "roberta": {"hidden_size": 768, "num_hidden_layers": 1,
                                              "num_attention_heads": 12, "intermediate_size": 64,
                                              "max_position_embeddings": 80,
                                              "type_vocab_size": 1, "layer_norm_eps": 1e-5},
                  "joint_embed_shape": 64, "class_num": 8},
    }, indent=2) + "\n")
    print("wrote", sorted(p.name for p in HERE.iterdir()))


if __name__ == "__main__":
    main()
