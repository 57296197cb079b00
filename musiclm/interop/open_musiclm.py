"""Import open-musiclm's released artifacts as a model set: stage checkpoints plus a token system.

Inputs: its model JSON (``musiclm_large_small_context.json``), the three transformer state dicts
(``semantic.transformer.14000.pt`` …, read with ``torch.load(weights_only=True)``), the CLAP RVQ
(``clap.rvq.950_no_fusion.pt``: a ``vector_quantize_pytorch`` ResidualVQ state dict) and the k-means
(``kmeans_10s_no_fusion.joblib``: a pickled scikit-learn MiniBatchKMeans, read only with ``trust_kmeans_pickle``;
its centers as ``.npy`` or ``.safetensors`` need no pickle), and the encoders in transformers format (CLAP,
MERT, EnCodec: hub ids or local folders), or CLAP as the laion_clap checkpoint open-musiclm loads
(``clap_checkpoint``, converted by ``tokens.laion_clap``).

Output ``OUT/``: ``token_system/`` (fingerprinted), ``semantic/``, ``coarse/``, ``fine/`` (``model.safetensors`` +
``stage.json`` stamped with that fingerprint), and ``import.json`` (sources, sha256 of each input). That is
the model-set layout that ``generate``, ``evaluate`` and ``train --init-from OUT/<stage>`` read.

Key names and shapes come from open-musiclm's ``TokenConditionedTransformer`` (facts read from its code):
``start_tokens.i``, ``embeddings.i.weight``, ``logit_weights.i``, ``transformer.rel_pos_bias.net.{0,1,2}.0``
and ``.net.3``, per layer ``transformer.layers.L.0`` (attention: ``norm.gamma``/``norm.beta``, ``to_q``,
``to_kv``, ``q_scale``, ``k_scale``, ``to_out.0``) and ``transformer.layers.L.2`` (feed-forward sequential:
``0`` LayerNorm, ``1`` linear in, ``2.ds_conv``, ``4`` LayerNorm, ``6`` linear out), ``transformer.norm``.
Its LayerNorm ``beta`` buffers are zeros (ours have no bias); a nonzero one is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from .laion_clap import TOKENIZER as CLAP_TOKENIZER

from ..config import STAGES, ModelConfig, load_model_config
from ..models import build_stage
from ..train.checkpoint import CheckpointError, load_stage, save_stage

KEY_MAP_FFN = {"norm.weight": "0.gamma", "proj_in.weight": "1.weight", "conv.weight": "2.ds_conv.weight",
               "norm_inner.weight": "4.gamma", "proj_out.weight": "6.weight"}
KEY_MAP_ATTN = {"norm.weight": "norm.gamma", "to_q.weight": "to_q.weight", "to_kv.weight": "to_kv.weight",
                "q_scale": "q_scale", "k_scale": "k_scale", "to_out.weight": "to_out.0.weight"}


class OpenMusicLMImportError(CheckpointError):
    """An open-musiclm file does not convert (missing, extra or misshapen tensors, or unsafe to read)."""


def transformer_key_map(num_sequences: int, depth: int) -> tuple[dict[str, str], list[str]]:
    """(our key → open-musiclm key, open-musiclm LayerNorm beta keys that must be zero)."""
    m = {}
    for i in range(num_sequences):
        m[f"start_tokens.{i}"] = f"start_tokens.{i}"
        m[f"embeddings.{i}.weight"] = f"embeddings.{i}.weight"
        m[f"logit_weights.{i}"] = f"logit_weights.{i}"
    for j in range(3):
        for p in ("weight", "bias"):
            m[f"rel_pos.hidden.{j}.{p}"] = f"transformer.rel_pos_bias.net.{j}.0.{p}"
    for p in ("weight", "bias"):
        m[f"rel_pos.out.{p}"] = f"transformer.rel_pos_bias.net.3.{p}"
    betas = ["transformer.norm.beta"]
    for layer in range(depth):
        for ours, theirs in KEY_MAP_ATTN.items():
            m[f"layers.{layer}.attn.{ours}"] = f"transformer.layers.{layer}.0.{theirs}"
        for ours, theirs in KEY_MAP_FFN.items():
            m[f"layers.{layer}.ff.{ours}"] = f"transformer.layers.{layer}.2.{theirs}"
        betas += [f"transformer.layers.{layer}.0.norm.beta", f"transformer.layers.{layer}.2.0.beta",
                  f"transformer.layers.{layer}.2.4.beta"]
    m["norm.weight"] = "transformer.norm.gamma"
    return m, betas


def load_torch_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt`` file, read with ``weights_only=True`` (tensors and plain containers only) and
    memory-mapped where the file allows (torch.save's zip format): a large stage's 1.1 GB is read from the page
    cache as it is converted and written, instead of three stages' copies held at once."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped: read it whole
            if "mmap" not in str(e):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        reason = ("it holds more than tensors: objects whose loading runs code" if "Weights only load failed" in str(e)
                  else str(e).splitlines()[0][:300])
        raise OpenMusicLMImportError(f"{what} {path} cannot be read as a weights-only state dict ({reason}); "
                                     f"give open-musiclm's file as released (a plain state dict saved by torch.save)"
                                     ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OpenMusicLMImportError(f"{what} {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def convert_transformer(theirs: dict[str, torch.Tensor], stage: str, model_cfg: ModelConfig,
                        source: str = "state dict") -> dict[str, torch.Tensor]:
    """Our stage state dict from open-musiclm's, every tensor mapped and checked; none left over."""
    cfg = model_cfg.stage(stage)
    with torch.device("meta"):
        model = build_stage(stage, model_cfg)
    ours = model.state_dict()
    mapping, betas = transformer_key_map(len(model.sequences), cfg.depth)
    assert set(mapping) == set(ours), sorted(set(ours) ^ set(mapping))  # the map covers our model exactly
    expected = set(mapping.values()) | set(betas)
    missing, extra = sorted(expected - set(theirs)), sorted(set(theirs) - expected)
    wrong = [f"{t} {tuple(theirs[t].shape)} (expected {tuple(ours[o].shape)})" for o, t in mapping.items()
             if t in theirs and tuple(theirs[t].shape) != tuple(ours[o].shape)]
    nonzero = [b for b in betas if b in theirs and bool(theirs[b].abs().max() > 0)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected {len(extra)}: {', '.join(extra[:8])}{' …' if len(extra) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:5])}")
    if nonzero:
        problems.append(f"nonzero LayerNorm bias (not supported): {', '.join(nonzero[:5])}")
    if problems:
        raise OpenMusicLMImportError(
            f"{source} does not convert to the {stage} stage of this model config (depth {cfg.depth}, dim "
            f"{cfg.dim}, heads {cfg.heads}): " + "; ".join(problems) +
            ". Check that --config is the model JSON the checkpoint was trained with and the file is of this stage.")
    return {o: theirs[t].detach().float().contiguous() for o, t in mapping.items()}


def convert_rvq(state: dict[str, torch.Tensor], num_quantizers: int, codebook_size: int, dim: int,
                source: str = "RVQ") -> dict[str, torch.Tensor]:
    """Our RVQ tensors from a vector_quantize_pytorch ResidualVQ state dict (``layers.i._codebook.embed``
    of (K, D) or (1, K, D), with ``cluster_size``, ``embed_avg`` and ``initted`` beside it)."""
    known = {"embed", "cluster_size", "embed_avg", "initted"}
    layers, extra = {}, []
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\._codebook\.(\w+)", key)
        if match and match.group(2) in known:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            extra.append(key)
    missing = [f"layers.{q}._codebook.embed" for q in range(num_quantizers) if "embed" not in layers.get(q, {})]
    more = sorted(q for q in layers if q >= num_quantizers)
    if extra or missing or more:
        raise OpenMusicLMImportError(f"{source} is not a {num_quantizers}-level ResidualVQ state dict: "
                           + "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                                     f"unexpected {', '.join(sorted(extra)[:8])}" if extra else "",
                                                     f"levels beyond {num_quantizers - 1}: {more}" if more else ""])))
    codebooks, sizes, sums = [], [], []
    for q in range(num_quantizers):
        embed = layers[q]["embed"].float().reshape(-1, layers[q]["embed"].shape[-1])
        if tuple(embed.shape) != (codebook_size, dim):
            raise OpenMusicLMImportError(f"{source}: layers.{q}._codebook.embed has {tuple(layers[q]['embed'].shape)}, but the "
                               f"model config needs {codebook_size} codes of dimension {dim}")
        size = layers[q].get("cluster_size")
        size = size.float().reshape(codebook_size) if size is not None else torch.ones(codebook_size)
        total = layers[q].get("embed_avg")
        total = total.float().reshape(codebook_size, dim) if total is not None else embed * size[:, None]
        codebooks.append(embed)
        sizes.append(size)
        sums.append(total)
    return {"codebooks": torch.stack(codebooks), "cluster_size": torch.stack(sizes), "embed_sum": torch.stack(sums),
            "initialized": torch.tensor(True)}


def read_rvq(path: str | Path):
    """An open-musiclm RVQ file (``clap.rvq.*.pt``) as our ``ResidualVQ``, its sizes read from the file."""
    from ..tokens.rvq import ResidualVQ

    state = load_torch_state(path, "--rvq")
    books = [v for k, v in state.items() if re.fullmatch(r"layers\.\d+\._codebook\.embed", k)]
    if not books:
        raise OpenMusicLMImportError(f"{path} holds no ResidualVQ codebooks (layers.<i>._codebook.embed)")
    size, dim = books[0].shape[-2:]
    rvq = ResidualVQ(len(books), size, dim)
    rvq.load_tensors(convert_rvq(state, len(books), size, dim, str(path)), str(path))
    return rvq


def clap_rvq_residuals(rvq_path: str | Path, candidates: dict[str, str], audio_files: list[str], *,
                       trusted: set[str] = frozenset(), log=print) -> dict[str, float | None]:
    """Which CLAP an RVQ was fitted on: for each candidate (a laion_clap ``.pt``, or a transformers-format CLAP's
    folder or hub id), the RVQ's mean relative residual ``|e - RVQ(e)| / |e|`` over the candidate's embeddings of
    the first 10 s window of each file. An RVQ reconstructs the embeddings of the CLAP it was fitted on far better
    than another CLAP's (its codes sit where that CLAP's embeddings lie). None: the CLAP's embedding width is not
    the RVQ's. ``trusted``: the candidates whose ``.pt`` may be read as a full pickle."""
    from ..audio.io import load_audio
    from ..config import ClapRVQConfig
    from ..tokens import encoders
    from ..tokens.clap import ClapFeaturizer, embed_audio_features
    from .laion_clap import laion_clap_audio

    rvq = read_rvq(rvq_path)
    clips = [load_audio(f, 48000, max_seconds=10.0) for f in audio_files]
    log(f"RVQ {rvq.num_quantizers}x{rvq.codebook_size}x{rvq.dim} from {rvq_path}; {len(clips)} clips")
    out = {}
    for name, source in candidates.items():
        if Path(source).is_file():
            model, features = laion_clap_audio(source, name in trusted)
        else:
            model, processor = encoders.load_clap(source)
            features = processor.feature_extractor
        if model.config.projection_dim != rvq.dim:
            log(f"{name}: embeddings of width {model.config.projection_dim}, the RVQ's are {rvq.dim}: not this one")
            out[name] = None
            continue
        featurizer = ClapFeaturizer(features, ClapRVQConfig(dim=rvq.dim), 10.0)
        e = embed_audio_features(model, np.concatenate([featurizer(c)[:1] for c in clips]))
        residual = e - rvq.decode(rvq.encode(e))
        out[name] = float((residual.norm(dim=1) / e.norm(dim=1)).mean())
        log(f"{name}: mean relative residual {out[name]:.4f} ({source})")
        del model
    return out


def load_kmeans_centers(path: str | Path, trust_pickle: bool = False) -> np.ndarray:
    """k-means centers (K, D) from ``.npy``, ``.safetensors`` (key ``centers``), or, with ``trust_pickle``,
    open-musiclm's joblib file (a pickled MiniBatchKMeans)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"k-means file {path} does not exist")
    if path.suffix in (".npy", ".safetensors"):
        try:
            if path.suffix == ".npy":
                centers = np.load(path, allow_pickle=False)
            else:
                from safetensors.numpy import load_file

                centers = load_file(str(path))["centers"]
        except Exception as e:  # an object (pickled) array, a truncated file, no "centers" tensor
            raise OpenMusicLMImportError(f"k-means file {path} does not hold a numeric centers array "
                                         f"({str(e).splitlines()[0][:200]}): give the centers as a float .npy "
                                         f"(K x D) or a .safetensors with a 'centers' tensor") from None
        if centers.ndim != 2 or not np.issubdtype(centers.dtype, np.floating):
            raise OpenMusicLMImportError(f"k-means file {path} holds a {centers.dtype} array of shape "
                                         f"{centers.shape}: the centers are a float array K x D")
        return centers
    if not trust_pickle:
        raise OpenMusicLMImportError(
            f"{path} is a pickle (joblib): loading it runs code stored in the file. Pass --trust-pickle {path} if you "
            f"trust its source (e.g. open-musiclm's own release), or export the centers yourself where you trust "
            f"it and give the .npy: python -c \"import joblib, numpy; numpy.save('kmeans_centers.npy', "
            f"joblib.load('{path}').cluster_centers_)\"")
    import joblib  # installed with scikit-learn

    model = joblib.load(path)
    centers = getattr(model, "cluster_centers_", None)
    if centers is None:
        raise OpenMusicLMImportError(f"{path} holds a {type(model).__name__}, not a fitted k-means (no cluster_centers_)")
    return np.asarray(centers, dtype=np.float32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step(path: Path) -> int:
    match = re.search(r"\.(\d+)\.pt$", path.name)
    return int(match.group(1)) if match else 0


def import_open_musiclm(config: str | Path, checkpoints: dict[str, str | Path], rvq: str | Path,
                        kmeans: str | Path, out: str | Path, *, clap: str | None = None, mert: str | None = None,
                        encodec: str | None = None, clap_checkpoint: str | Path | None = None,
                        clap_tokenizer: str = CLAP_TOKENIZER, trust_kmeans_pickle: bool = False,
                        trust_clap_pickle: bool = False, overwrite: bool = False, log=print) -> dict:
    """Convert everything in memory first (nothing is written when a file does not convert), then write the
    token system and the stamped stage checkpoints, and check that each loads. Trust is per file: the k-means
    joblib is read as a pickle only with ``trust_kmeans_pickle``, the CLAP checkpoint only with
    ``trust_clap_pickle`` (else weights-only)."""
    from ..tokens.system import TokenSystem, new_rvq

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OpenMusicLMImportError(f"{out} is not empty; choose a new folder, or pass --overwrite to replace it")
    model_cfg = load_model_config(config)
    encoders = {"clap_rvq_cfg": clap, "hubert_kmeans_cfg": mert, "encodec_cfg": encodec}
    model_cfg = dataclasses.replace(model_cfg, **{k: dataclasses.replace(getattr(model_cfg, k), model_name=v)
                                                   for k, v in encoders.items() if v})
    if model_cfg.clap_rvq_cfg.checkpoint_path:  # open-musiclm's laion_clap file: we load transformers' CLAP
        model_cfg = dataclasses.replace(model_cfg, clap_rvq_cfg=dataclasses.replace(model_cfg.clap_rvq_cfg,
                                                                                     checkpoint_path=None))
    states = {}
    for stage in STAGES:
        if checkpoints.get(stage):
            path = Path(checkpoints[stage])
            states[stage] = convert_transformer(load_torch_state(path, f"--{stage}"), stage, model_cfg, str(path))
            log(f"{stage}: {len(states[stage])} tensors mapped from {path}")
    c = model_cfg.clap_rvq_cfg
    rvq_tensors = convert_rvq(load_torch_state(rvq, "--rvq"), c.rq_num_quantizers, c.codebook_size, c.dim, str(rvq))
    centers = load_kmeans_centers(kmeans, trust_kmeans_pickle)
    log(f"RVQ {c.rq_num_quantizers}x{c.codebook_size}x{c.dim} and k-means {centers.shape} read")

    system = TokenSystem.create(model_cfg.token_system(), out / "token_system", overwrite=overwrite,
                                clap_checkpoint=clap_checkpoint, clap_tokenizer=clap_tokenizer,
                                trust_pickle=trust_clap_pickle)
    if clap_checkpoint:
        log(f"CLAP converted from the laion_clap checkpoint {clap_checkpoint}")
    quantizer = new_rvq(system.config)
    quantizer.load_tensors(rvq_tensors, str(rvq))
    system.set_rvq(quantizer)
    system.set_kmeans(centers)
    system.save()
    fingerprint = system.fingerprint
    for stage, state in states.items():
        save_stage(out / stage, state, stage, model_cfg, _step(Path(checkpoints[stage])), fingerprint)
        load_stage(out / stage, stage, fingerprint)  # reads back: the set is usable as written
    record = {"format": 1, "fingerprint": fingerprint, "config": str(config),
              "sources": {name: {"path": str(p), "sha256": _sha256(Path(p))}
                          for name, p in {**{s: checkpoints[s] for s in states}, "rvq": rvq, "kmeans": kmeans,
                                          **({"clap": clap_checkpoint} if clap_checkpoint else {})}.items()},
              "encoders": {k: getattr(system.config, k).model_name for k in encoders}}
    (out / "import.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"imported into {out}: {', '.join(states)} stamped with token system {fingerprint[:12]}")
    return record


__all__ = ["import_open_musiclm", "convert_transformer", "convert_rvq", "load_kmeans_centers", "load_torch_state",
           "read_rvq", "clap_rvq_residuals", "transformer_key_map", "OpenMusicLMImportError"]
