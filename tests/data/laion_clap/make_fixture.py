"""Make the laion_clap parity fixture: unfused HTSAT/RoBERTa CLAPs at the released architectures (every block,
every head, every saved buffer) with narrow widths and random weights, saved the way laion_clap's training saves
checkpoints, the embeddings laion_clap's own code computes with them, and the exact key layout of the released
full-size files.

Runs in a scratch environment beside the project's, never in it (laion-clap pins numpy < 2); see README.md.
Nothing here reimplements laion_clap: the models, the checkpoint loading (``CLAP_Module.load_ckpt``) and the
embeddings (``get_audio_embedding_from_data``, ``get_text_embedding``) are its code. Two audio towers, as LAION
releases them:

- ``htsat_tiny``: ``amodel='HTSAT-tiny'`` (``630k-audioset-best.pt``, the CLAP open-musiclm loads by default):
  depths 2, 2, 6, 2, heads 4, 8, 16, 32, window 8, so five shifted-window blocks that save ``attn_mask``;
- ``htsat_base``: ``amodel='HTSAT-base'`` (``music_audioset_epoch_15_esc_90.14.pt``,
  ``music_speech_audioset_epoch_15_esc_89.98.pt``): depths 2, 2, 12, 2, heads 4, 8, 16, 32.

Only the widths are narrowed (patch embedding 16 instead of 96 / 128, so every head is 4 wide; joint embedding 64;
8 classes in the unused classification head); the spectrogram size, patch and window sizes are laion's, so the
saved ``attn_mask`` buffers are exactly those of the released files. laion_clap's text tower is transformers'
``RobertaModel`` itself, so one layer (width 768, which laion's text projection requires) shows the mapping;
``layout.json`` has every key of the full-size files. What laion_clap would fetch from the hub is built offline:

- ``RobertaModel.from_pretrained('roberta-base')`` returns a randomly initialized RoBERTa (one layer of width 768
  for the fixtures; roberta-base's sizes for ``layout.json``);
- the RoBERTa tokenizer is a byte-level RoBERTa tokenizer with no merges (the one the project builds for its
  offline ``tiny`` system), saved to ``tokenizer/`` so the test tokenizes with the same files.

Writes, next to this file: ``<variant>.pt`` ({'epoch', 'name', 'state_dict': {'module.<name>': tensor}}, float16
values, the layout laion's training saves), ``tokenizer/``, ``audio.safetensors`` (int16 PCM at 48 kHz, one tensor
per clip), ``expected.safetensors`` (``<variant>.audio`` and ``<variant>.text`` embeddings), ``layout.json``
(per variant: every key of the released checkpoint's state dict with its shape and dtype, and which are buffers)
and ``summary.json``.
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
# variant -> (laion_clap amodel, the released files of that architecture, narrowed HTSAT sizes)
VARIANTS = {
    "htsat_tiny": ("HTSAT-tiny", ["630k-audioset-best.pt", "630k-best.pt"],
                   dict(embed_dim=16, depths=[2, 2, 6, 2], num_heads=[4, 8, 16, 32])),
    "htsat_base": ("HTSAT-base", ["music_audioset_epoch_15_esc_90.14.pt",
                                  "music_speech_audioset_epoch_15_esc_89.98.pt", "music_speech_epoch_15_esc_89.25.pt"],
                   dict(embed_dim=16, depths=[2, 2, 12, 2], num_heads=[4, 8, 16, 32])),
}
TEXT_SMALL = dict(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64,
                  max_position_embeddings=80, type_vocab_size=1, layer_norm_eps=1e-5)
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


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
    text_sizes = {}  # what RobertaModel.from_pretrained('roberta-base') builds (set per model below)
    transformers.RobertaModel.from_pretrained = classmethod(lambda cls, *a, **k: cls(transformers.RobertaConfig(
        pad_token_id=1, bos_token_id=0, eos_token_id=2, **text_sizes)))

    import laion_clap
    from clap_module import factory, htsat

    swin_init = htsat.HTSAT_Swin_Transformer.__init__
    htsat_sizes = {}  # HTSAT sizes laid over the factory's (set per model below)
    htsat.HTSAT_Swin_Transformer.__init__ = lambda self, **kw: swin_init(self, **{**kw, **htsat_sizes})

    audio = clips()
    expected, layouts, sizes = {}, {}, {}
    for variant, (amodel, released, small) in VARIANTS.items():
        # 1. The released checkpoint's layout: laion_clap's model at the real sizes (roberta-base, the factory's
        #    HTSAT), its state dict's keys, shapes and dtypes, plus the position_ids buffer that the released files
        #    hold (saved under transformers < 4.31; laion_clap's load_state_dict deletes it before loading).
        text_sizes.clear(), text_sizes.update(ROBERTA_BASE)
        htsat_sizes.clear()
        full = laion_clap.CLAP_Module(enable_fusion=False, device="cpu", amodel=amodel, tmodel="roberta").model
        buffers = {n for n, _ in full.named_buffers()}
        state = full.state_dict()
        state["text_branch.embeddings.position_ids"] = torch.arange(ROBERTA_BASE["max_position_embeddings"])[None]
        layouts[variant] = {"amodel": amodel, "released_as": released, "keys": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                **({"buffer": True} if k in buffers or k.endswith("position_ids") else {})}
            for k, v in state.items()}}
        del full, state

        # 2. The fixture: the same architecture with narrow widths (see the module docstring)
        text_sizes.clear(), text_sizes.update(TEXT_SMALL, vocab_size=len(tokenizer))
        htsat_sizes.clear(), htsat_sizes.update(small)
        cfg = json.loads(json.dumps(factory._MODEL_CONFIGS[amodel]))
        cfg["embed_dim"] = small["embed_dim"] * 2 ** (len(small["depths"]) - 1)  # HTSAT's output width
        cfg["joint_embed_shape"] = 64
        cfg["audio_cfg"]["class_num"] = 8  # HTSAT's classification head (unused for embeddings), kept small
        factory._MODEL_CONFIGS[f"{amodel}-narrow"] = cfg
        torch.manual_seed(0)
        module = laion_clap.CLAP_Module(enable_fusion=False, device="cpu", amodel=f"{amodel}-narrow",
                                        tmodel="roberta")
        state = module.model.state_dict()
        masks = sorted(k for k in state if k.endswith("attn_mask"))
        assert masks == sorted(k for k in layouts[variant]["keys"] if k.endswith("attn_mask")), masks
        for name, value in state.items():
            # Perturb every learned tensor (norm gains 1 and biases 0 at initialization would hide swapped
            # names); keep the fixed STFT and mel matrices of the audio front end and the attention masks exact.
            # Values on a grid of 1/128 compress (git stores the files at about a third of their size).
            if value.is_floating_point() and not name.startswith(FRONT_END) and not name.endswith("attn_mask"):
                noisy = torch.round((value + 0.05 * torch.randn_like(value)) * 128) / 128
                value.copy_(noisy.abs() if name.endswith("running_var") else noisy)
        state["text_branch.embeddings.position_ids"] = torch.arange(TEXT_SMALL["max_position_embeddings"])[None]
        # float16 values (stored as float16, loaded into the float32 model exactly) keep the file small
        saved = {f"module.{k}": (v.half() if v.is_floating_point() and not k.startswith(FRONT_END) else v)
                 for k, v in state.items()}
        checkpoint = {"epoch": 1, "name": f"laion_clap parity fixture ({amodel}, narrow, random weights)",
                      "state_dict": saved}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(checkpoint, Path(tmp) / "full.pt")
            module.load_ckpt(str(Path(tmp) / "full.pt"), verbose=False)  # laion's own loader
        # The committed copy leaves out the front end's fixed STFT and mel matrices (4 MB of constants that
        # every HTSAT has and that converters do not read); everything else is as laion_clap loaded it.
        checkpoint["state_dict"] = {k: v for k, v in saved.items()
                                    if not k.startswith(tuple("module." + f for f in FRONT_END))}
        torch.save(checkpoint, HERE / f"{variant}.pt")

        expected[f"{variant}.audio"] = np.asarray(
            module.get_audio_embedding_from_data([waveform(a) for a in audio]), np.float32)
        expected[f"{variant}.text"] = np.asarray(module.get_text_embedding(CAPTIONS, tokenizer=lambda x: tokenizer(
            x, padding="max_length", truncation=True, max_length=77, return_tensors="pt")), np.float32)
        sizes[variant] = {"amodel": amodel, "htsat": small, "shifted_window_masks": masks,
                          "parameters_and_buffers": len(state)}
        del module

    from safetensors.numpy import save_file

    save_file({f"clip_{i}": a for i, a in enumerate(audio)}, HERE / "audio.safetensors")
    save_file(expected, HERE / "expected.safetensors")
    (HERE / "layout.json").write_text(json.dumps(layouts, indent=1) + "\n")
    versions = {m: sys.modules[m].__version__ for m in ("torch", "numpy", "transformers")}
    versions["laion_clap"] = "1.1.7"
    (HERE / "summary.json").write_text(json.dumps({
        "made_by": "make_fixture.py (laion_clap's CLAP_Module, random weights)", "versions": versions,
        "audio_input": "float32 clip_i * float32(1.37) / float32(32767), mono 48 kHz, passed to "
                       "get_audio_embedding_from_data",
        "clip_seconds": LENGTHS, "captions": CAPTIONS,
        "text_tokenization": "tokenizer/ with padding='max_length', truncation, max_length=77",
        "variants": sizes, "roberta": TEXT_SMALL, "joint_embed_shape": 64, "class_num": 8,
    }, indent=2) + "\n")
    print("wrote", sorted(p.name for p in HERE.iterdir()))


if __name__ == "__main__":
    main()
