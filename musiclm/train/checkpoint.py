"""Stage checkpoints for use: ``model.safetensors`` plus ``stage.json`` (DESIGN.md).

``stage.json`` holds the stage, the step, the token system's fingerprint, the whole model config (so the
token layout and windows travel with the weights) and how many steps it learned the null condition
(``null_condition_steps``: guidance needs it). Loading checks that the file is of the stage asked for,
of the same token system, and of the same model shape, and names both sides when it is not. A Ray Train
checkpoint directory of this project holds these two files next to the DeepSpeed shards, so it can be given
wherever a stage checkpoint is expected. Checkpoints are read from a folder or an object-store URI (a run kept
in ``s3://``); ``save_stage`` writes into a local folder (Ray Train uploads it with the rest of the checkpoint).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from ..config import ModelConfig, from_dict, to_dict
from ..infra import storage
from ..models import build_stage, stage_sequences
from ..models.transformer import TokenConditionedTransformer

MODEL_FILE = "model.safetensors"
STAGE_FILE = "stage.json"
# 2: attention keys/values projected from the block input before its LayerNorm, as open-musiclm. Format 1
# (before 2026-11-25) projected them from the normalized input: the same tensors compute another function.
FORMAT_VERSION = 2
SHAPE_KEYS = ("dim", "depth", "heads", "dim_head", "use_conv_ff", "relative_position_bias_type")
STAGING_PREFIX = "musiclm-ckpt-"  # + host-pid-: a worker's checkpoint folder before Ray Train persists it


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit what it is used for."""


@dataclass
class StageInfo:
    path: Path | str  # a folder, or an object-store URI
    stage: str
    step: int
    fingerprint: str
    model: ModelConfig
    metrics: dict
    # optimizer steps this stage was trained with conditioning dropout (train.cond_drop_prob), through --init-from:
    # 0 means it never saw the null condition, and guidance with it is refused
    null_condition_steps: int = 0


def save_stage(out: str | Path, state: dict[str, torch.Tensor], stage: str, model_cfg: ModelConfig, step: int,
               fingerprint: str, metrics: dict | None = None, null_condition_steps: int = 0) -> Path | str:
    """Write a stage checkpoint (``model.safetensors`` + ``stage.json``) to a folder or an object-store URI;
    each file is written whole or not at all (``storage.write_bytes``). Returns ``out``."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    loc = storage.location(out)
    storage.make_dirs(loc)
    storage.write_bytes(storage.join(loc, MODEL_FILE),
                        save(tensors, metadata={"stage": stage, "step": str(step), "fingerprint": fingerprint}))
    info = {"format": FORMAT_VERSION, "stage": stage, "step": step, "fingerprint": fingerprint,
            "model": to_dict(model_cfg), "metrics": metrics or {}, "null_condition_steps": null_condition_steps}
    storage.write_text(storage.join(loc, STAGE_FILE), json.dumps(info, indent=2, sort_keys=True))
    return loc if storage.is_remote(loc) else Path(loc)


def staging_dir() -> tempfile.TemporaryDirectory:
    """The local folder a training worker writes a checkpoint into before Ray Train persists it, removed after.
    A worker killed meanwhile (SIGKILL, the OOM killer) runs no cleanup and would leave a checkpoint's size on
    its node's disk (5.2 GB for a large stage) per crash: each save first removes such folders
    (``storage.process_tempdir``)."""
    return storage.process_tempdir(STAGING_PREFIX)


def read_stage(path: str | Path) -> StageInfo:
    path = storage.location(path)
    meta = storage.join(path, STAGE_FILE)
    try:
        text = storage.read_text(meta)
    except FileNotFoundError:
        text = None
    if text is None or not storage.exists(storage.join(path, MODEL_FILE)):
        raise CheckpointError(f"{path} is not a stage checkpoint (it needs {STAGE_FILE} and {MODEL_FILE}); give "
                              f"a checkpoint folder written by `musiclm train` or `musiclm import-open-musiclm`")
    try:
        data = json.loads(text)
        fmt = int(data.get("format", 1))
    except (ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{meta} is unreadable: {e}") from None
    if fmt < FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is in model format {fmt}, written by an earlier version of this project whose "
            f"attention projected keys and values from the layer-normalized input; open-musiclm, and this version, "
            f"project them from the block input, so its weights would compute a different function here. Retrain "
            f"the stage, or re-import open-musiclm's released files with `musiclm import-open-musiclm`.")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is in model format {fmt}, newer than this version reads "
                              f"({FORMAT_VERSION}): update musiclm")
    try:
        model = from_dict(ModelConfig, data["model"], "model")
        return StageInfo(Path(path) if not storage.is_remote(path) else path, data["stage"], int(data["step"]),
                         data["fingerprint"], model, data.get("metrics", {}), int(data.get("null_condition_steps", 0)))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{meta} is unreadable: {e}") from None


def sequence_layout(stage: str, model_cfg: ModelConfig) -> dict[str, str]:
    """Each token sequence of a stage as ``{name: "<codebooks>x<codebook size>"}``."""
    return {s.name: f"{s.num_quantizers}x{s.codebook_size}" for s in stage_sequences(stage, model_cfg)}


def shape_of(stage: str, model_cfg: ModelConfig) -> dict:
    """What decides the tensor shapes of a stage: its token sequences and the transformer's size."""
    cfg = model_cfg.stage(stage)
    return {"sequences": [f"{n}:{layout}" for n, layout in sequence_layout(stage, model_cfg).items()],
            **{k: getattr(cfg, k) for k in SHAPE_KEYS}}


def check_fits(info: StageInfo, stage: str | None = None, fingerprint: str | None = None,
               model_cfg: ModelConfig | None = None, what: str = "this run") -> None:
    """Refuse a checkpoint of another stage, token system or model shape, naming both sides."""
    if stage is not None and info.stage != stage:
        raise CheckpointError(f"checkpoint {info.path} is a {info.stage} stage checkpoint, but {what} needs the "
                              f"{stage} stage")
    if fingerprint is not None and info.fingerprint != fingerprint:
        raise CheckpointError(
            f"checkpoint {info.path} was trained on token system {info.fingerprint[:12]}, but {what} uses token "
            f"system {fingerprint[:12]}: the same token ids would mean different sounds (a model fine-tuned across "
            f"token systems stays at chance level). Use the token system the checkpoint was trained with.")
    if model_cfg is not None:
        theirs, ours = shape_of(info.stage, info.model), shape_of(info.stage, model_cfg)
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {info.path} does not fit the model config of {what} ({detail}). "
                                  f"Use the config the checkpoint was trained with (its {STAGE_FILE} holds it).")


def _unreadable(file: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{file} cannot be read ({reason}): the checkpoint is truncated or corrupt (an interrupted "
                           f"copy or upload?). Copy it again, or use another checkpoint (an earlier checkpoint_* of "
                           f"the run)")


def check_weights(path: str | Path) -> None:
    """A checkpoint's ``model.safetensors`` is whole: its header parses and its size is what the header lays out
    (the header and 8 bytes read, not the weights). For a driver, before workers load it (each of them would fail,
    and Ray Train retry them, with a traceback)."""
    import struct

    file = storage.join(path, MODEL_FILE)
    fs, inner = storage.resolve(file)
    try:
        with fs.open_input_file(inner) as f:
            size = f.size()
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a stage checkpoint: it has no {MODEL_FILE}") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise _unreadable(file, f"its header does not parse: {e}") from None
    if not isinstance(header, dict):
        raise _unreadable(file, f"{size} bytes, fewer than its header needs")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise _unreadable(file, f"{size} bytes where its header lays out {8 + n + end}")


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    file = storage.join(path, MODEL_FILE)
    try:
        return load_safetensors(storage.read_bytes(file))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' SafetensorError ("incomplete metadata", ...) names no file
        raise _unreadable(file, str(e).splitlines()[0][:200]) from None


def load_into(model: TokenConditionedTransformer, state: dict[str, torch.Tensor], path) -> None:
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or extra or wrong:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()})


def load_stage(path: str | Path, stage: str | None = None, fingerprint: str | None = None,
               device: str | torch.device = "cpu") -> tuple[TokenConditionedTransformer, StageInfo]:
    """A model built from the checkpoint's own config, with its weights, in eval mode."""
    info = read_stage(path)
    check_fits(info, stage, fingerprint)
    model = build_stage(info.stage, info.model)
    load_into(model, load_state(path), path)
    return model.to(device).eval(), info


__all__ = ["CheckpointError", "StageInfo", "MODEL_FILE", "STAGE_FILE", "save_stage", "read_stage", "check_fits",
           "check_weights", "load_stage", "load_state", "load_into", "shape_of", "sequence_layout", "staging_dir"]
