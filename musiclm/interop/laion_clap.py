"""laion_clap checkpoints (the ``630k-audioset-best.pt`` that open-musiclm loads) as a transformers ``ClapModel``.

open-musiclm embeds with laion_clap's unfused HTSAT + RoBERTa CLAP; its released RVQ was fitted on those
embeddings. transformers' ``ClapModel`` is the same architecture under other parameter names, so a laion_clap
state dict converts by renaming (and splitting HTSAT's fused ``qkv`` projections into query, key and value):

    laion_clap                                  transformers ClapModel
    text_branch.*                               text_model.*   (the same RoBERTa names)
    audio_branch.bn0                            audio_model.audio_encoder.batch_norm
    audio_branch.<...>.norm1 / norm2            ....layernorm_before / layernorm_after
    audio_branch.<...>.attn.qkv                 ....attention.self.query / key / value
    audio_branch.<...>.attn.proj                ....attention.output.dense
    audio_branch.<...>.attn.relative_position_bias_table   ....attention.self.relative_position_bias_table
    audio_branch.<...>.mlp.fc1 / fc2            ....intermediate.dense / output.dense
    audio_branch.* (the rest)                   audio_model.audio_encoder.*
    {text,audio}_projection.0 / .2              {text,audio}_projection.linear1 / linear2

What else a laion_clap checkpoint holds, tensor by tensor (``layout.json`` in the test data lists every key of the
released HTSAT-tiny and HTSAT-base files, made by laion_clap's own code):

- buffers that are a fixed function of the architecture, which transformers computes itself: each shifted-window
  block's ``attn_mask`` (every second block of a stage whose resolution exceeds the window: five in HTSAT-tiny,
  eight in HTSAT-base; transformers builds it at run time in ``ClapAudioLayer.get_attn_mask``) and every block's
  ``attn.relative_position_index``. Each is compared with transformers' own for that block (same blocks shifted,
  same values) and then dropped; a difference means another architecture and the file is refused;
- ``text_branch.embeddings.position_ids``: RoBERTa's ``arange`` positions, saved by the transformers releases
  laion_clap trained with (laion_clap itself deletes it before loading, since transformers 4.31);
- the audio front end's fixed STFT and mel matrices (``audio_branch.spectrogram_extractor.*``,
  ``audio_branch.logmel_extractor.*``): ``ClapFeatureExtractor`` computes the same log-mel;
- HTSAT's classification head (``tscam_conv``, ``head``) and the ``{text,audio}_transform`` MLPs: used only by
  laion_clap's training loss, never for embeddings.
Carried over besides the renamed parameters: the BatchNorm's running statistics (``bn0.running_mean`` /
``running_var`` / ``num_batches_tracked``) and ``logit_scale_a`` / ``logit_scale_t``. The architecture sizes are
read from the tensors' shapes (so HTSAT-tiny, ``630k-audioset-best.pt``, and HTSAT-base, LAION's music CLAPs,
both convert); every parameter of the new model must be filled, or the conversion is refused.

The processor pairs laion_clap's audio settings (48 kHz, 1024-point FFT, hop 480, 64 Slaney mel bins from
50 Hz to 14 kHz, 10 s windows, ``rand_trunc`` / ``repeatpad``) with the RoBERTa tokenizer laion_clap uses
(``roberta-base``), loaded from a hub id or a folder.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

IGNORED = ("audio_branch.spectrogram_extractor.", "audio_branch.logmel_extractor.", "audio_branch.tscam_conv.",
           "audio_branch.head.", "text_transform.", "audio_transform.", "text_branch.embeddings.position_ids")
# buffers that are fixed functions of the architecture: compared with transformers' own (check_derived_buffers)
DERIVED = re.compile(r"audio_branch\.layers\.(\d+)\.blocks\.(\d+)\.(attn_mask|attn\.relative_position_index)")
FUSION = ("audio_branch.mel_conv2d.", "audio_branch.fusion_model.")
BLOCK_RENAMES = (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
                 ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
                 ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "intermediate.dense."),
                 ("mlp.fc2.", "output.dense."))
TOKENIZER = "roberta-base"  # laion_clap's text tokenizer


class LaionClapError(ValueError):
    """A laion_clap checkpoint that cannot be converted."""


def read_laion_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict (without DDP's ``module.`` prefix) of a laion_clap ``.pt``: ``{'state_dict': ...}`` as its
    training saves them, or a bare state dict. Loaded with ``weights_only=True`` unless ``trust_pickle``."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise LaionClapError(f"CLAP checkpoint {path} does not exist") from None
    except Exception as e:
        if not trust_pickle and "Weights only load failed" in str(e):
            raise LaionClapError(f"CLAP checkpoint {path} holds more than tensors (objects whose loading runs code), "
                                 f"so it was not read. If you trust the file, --trust-pickle {path} loads it as a "
                                 f"full pickle (it can run code).") from None
        raise LaionClapError(f"cannot read CLAP checkpoint {path}: {str(e).splitlines()[0][:300]}") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LaionClapError(f"{path} holds no laion_clap state dict (expected {{'state_dict': {{name: tensor}}}})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def clap_config(state: dict[str, torch.Tensor]):
    """The transformers ``ClapConfig`` of a laion_clap state dict (unfused HTSAT audio tower, RoBERTa text)."""
    from transformers import ClapConfig

    if any(k.startswith(FUSION) for k in state):
        raise LaionClapError("this laion_clap checkpoint uses feature fusion (630k-*fusion-best.pt); open-musiclm's "
                             "released RVQ belongs to the unfused 630k-audioset-best.pt")
    try:
        words = state["text_branch.embeddings.word_embeddings.weight"]
        text_layers = _count(state, r"text_branch\.encoder\.layer\.(\d+)\.")
        patch = state["audio_branch.patch_embed.proj.weight"]
        n_stages = _count(state, r"audio_branch\.layers\.(\d+)\.")
        depths = [_count(state, rf"audio_branch\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_stages)]
        tables = [state[f"audio_branch.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(n_stages)]
        fc1 = state["audio_branch.layers.0.blocks.0.mlp.fc1.weight"]
        projection = state["audio_projection.0.weight"].shape[0]
        text_config = dict(
            vocab_size=words.shape[0], hidden_size=words.shape[1], num_hidden_layers=text_layers,
            num_attention_heads=words.shape[1] // 64,  # RoBERTa's 64-wide heads (roberta-base: 768 / 12)
            intermediate_size=state["text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["text_branch.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["text_branch.embeddings.token_type_embeddings.weight"].shape[0],
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,  # roberta-base's
            projection_dim=projection, projection_hidden_act="relu")
        audio_config = dict(
            patch_embeds_hidden_size=patch.shape[0], patch_size=patch.shape[-1], patch_stride=[patch.shape[-1]] * 2,
            depths=depths, num_attention_heads=[t.shape[1] for t in tables],
            window_size=(int(round(tables[0].shape[0] ** 0.5)) + 1) // 2,
            hidden_size=state["audio_branch.norm.weight"].shape[0], mlp_ratio=fc1.shape[0] / fc1.shape[1],
            num_mel_bins=state["audio_branch.bn0.weight"].shape[0], enable_fusion=False,
            projection_dim=projection, projection_hidden_act="relu")
    except KeyError as e:
        raise LaionClapError(f"not a laion_clap HTSAT/RoBERTa checkpoint: it lacks {e.args[0]}") from None
    return ClapConfig(text_config=text_config, audio_config=audio_config, projection_dim=projection)


def convert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """laion_clap parameter names -> transformers ``ClapModel`` names (see the module docstring)."""
    out = {}
    for key, value in state.items():
        if key.startswith(IGNORED) or DERIVED.fullmatch(key):
            continue
        new = re.sub(r"^(text|audio)_projection\.([02])\.",
                     lambda m: f"{m.group(1)}_projection.linear{1 if m.group(2) == '0' else 2}.", key)
        if new.startswith("text_branch."):
            new = "text_model." + new.removeprefix("text_branch.")
        elif new.startswith("audio_branch."):
            new = "audio_model.audio_encoder." + new.removeprefix("audio_branch.")
            new = new.replace("audio_encoder.bn0.", "audio_encoder.batch_norm.")
            if ".blocks." in new:
                for old, renamed in BLOCK_RENAMES:
                    new = new.replace(f".{old}", f".{renamed}")
                if ".attn.qkv." in new:
                    for part, name in zip(value.chunk(3, dim=0), ("query", "key", "value")):
                        out[new.replace(".attn.qkv.", f".attention.self.{name}.")] = part.clone()
                    continue
        out[new] = value
    return out


def check_derived_buffers(state: dict[str, torch.Tensor], model) -> None:
    """Refuse a checkpoint whose fixed buffers (shifted-window ``attn_mask``, ``relative_position_index``) are not
    what transformers computes for the same blocks of ``model`` (a ``ClapModel``): another window, shift or
    spectrogram size. Values are compared unless either side is on the meta device (shapes only then)."""
    blocks = model.audio_model.audio_encoder.layers
    problems = []

    def differ(key, theirs, ours) -> bool:
        if ours is None or tuple(theirs.shape) != tuple(ours.shape):
            return True
        return not (theirs.is_meta or ours.is_meta) and not torch.equal(theirs.to(ours.dtype), ours)

    saved_masks = set()
    for key, value in state.items():
        match = DERIVED.fullmatch(key)
        if not match:
            continue
        stage, index, kind = int(match.group(1)), int(match.group(2)), match.group(3)
        if stage >= len(blocks) or index >= len(blocks[stage].blocks):
            problems.append(f"{key} belongs to no block of the model its weights describe")
            continue
        block = blocks[stage].blocks[index]
        if kind == "attn_mask":
            saved_masks.add((stage, index))
            ours = _shifted_window_mask(block, value.device if value.is_meta else torch.device("cpu"))
            if differ(key, value, ours):
                problems.append(f"{key} {tuple(value.shape)} is not transformers' shifted-window mask of that block "
                                f"({'none: the block is not shifted' if ours is None else tuple(ours.shape)})")
        elif differ(key, value, block.attention.self.relative_position_index):
            problems.append(f"{key} differs from transformers' relative position index of that block")
    for stage, layer in enumerate(blocks):
        for index, block in enumerate(layer.blocks):
            if (stage, index) not in saved_masks and _shifted_window_mask(block, torch.device("meta")) is not None:
                problems.append(f"audio_branch.layers.{stage}.blocks.{index}.attn_mask is missing, but transformers "
                                f"shifts that block's windows")
    if problems:
        raise LaionClapError(f"the checkpoint's windowed attention is not HTSAT's as transformers builds it "
                             f"(spectrogram size 256, window 8, half-window shifts): {'; '.join(problems[:4])}")


def _shifted_window_mask(block, device):
    """transformers' attention mask for a ``ClapAudioLayer`` at its input resolution (None: not shifted)."""
    import copy

    block = copy.copy(block)  # set_shift_and_window_size changes the block's attributes; keep the model's own
    block.set_shift_and_window_size(block.input_resolution)
    return block.get_attn_mask(*block.input_resolution, dtype=torch.float32, device=device)


def check_conversion(state: dict[str, torch.Tensor], model, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """laion_clap ``state`` converted onto ``model`` (a ``ClapModel`` of ``clap_config(state)``, on any device, meta
    included), or a ``LaionClapError`` naming what does not fit: missing, unexpected or misshapen tensors, fixed
    buffers that are not transformers' own."""
    converted = convert_state(state)
    own = model.state_dict()
    computed = {k for k in own if k.endswith(("position_ids", "token_type_ids", "relative_position_index"))}
    missing = sorted(set(own) - set(converted) - computed)
    unexpected = sorted(set(converted) - set(own))
    wrong = sorted(k for k in set(own) & set(converted) if own[k].shape != converted[k].shape)
    if missing or unexpected or wrong:
        raise LaionClapError(f"{source} does not convert to a transformers ClapModel: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    check_derived_buffers(state, model)
    return converted


def laion_clap_audio(path: str | Path, trust_pickle: bool = False):
    """The converted float32 ``ClapModel`` (eval mode) of the laion_clap checkpoint at ``path`` and a
    ``ClapFeatureExtractor`` with laion_clap's audio settings: what embedding audio needs (no tokenizer)."""
    from transformers import ClapFeatureExtractor, ClapModel

    from ..tokens.encoders import _quiet_transformers

    _quiet_transformers()
    state = read_laion_state(path, trust_pickle)
    model = ClapModel(clap_config(state)).eval()
    converted = check_conversion(state, model, str(path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in converted.items()},
                          strict=False)
    features = ClapFeatureExtractor(feature_size=model.config.audio_config.num_mel_bins, sampling_rate=48000,
                                    hop_length=480, fft_window_size=1024, max_length_s=10, frequency_min=50,
                                    frequency_max=14000, truncation="rand_trunc", padding="repeatpad")
    return model, features


def convert_laion_clap(path: str | Path, tokenizer: str = TOKENIZER, trust_pickle: bool = False):
    """A float32 transformers ``ClapModel`` (eval mode) and ``ClapProcessor`` equal to laion_clap's unfused CLAP
    loaded from ``path``."""
    from transformers import ClapProcessor, RobertaTokenizer

    from ..tokens.encoders import EncoderLoadError

    model, features = laion_clap_audio(path, trust_pickle)
    try:
        text_tokenizer = RobertaTokenizer.from_pretrained(tokenizer)
    except Exception as e:
        raise EncoderLoadError(f"cannot load CLAP's RoBERTa tokenizer from {tokenizer!r}: "
                               f"{str(e).splitlines()[0][:300]}. Give a folder or hub id holding roberta-base's "
                               f"tokenizer files (--clap-tokenizer)") from None
    return model, ClapProcessor(feature_extractor=features, tokenizer=text_tokenizer)


__all__ = ["convert_laion_clap", "laion_clap_audio", "read_laion_state", "clap_config", "convert_state", "check_conversion",
           "check_derived_buffers", "LaionClapError", "TOKENIZER"]
