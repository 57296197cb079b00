"""The token system: CLAP + RVQ, semantic encoder + k-means, EnCodec, saved as one directory.

    DIR/token_system.json            settings, where each encoder's weights come from, fingerprint (and its parts)
    DIR/clap_rvq.safetensors         RVQ codebooks (absent until `fit-rvq`)
    DIR/semantic_kmeans.safetensors  k-means centers (absent until `fit-kmeans`)
    DIR/encoders/{clap,semantic,encodec}/   `tiny` encoders' random weights, and a CLAP converted from a
                                     laion_clap checkpoint (save_pretrained)

The fingerprint is a sha256 over the canonical settings (without weight locations), an identity of each
encoder's weights (sha256 of its tensors), and the bytes of the RVQ codebooks and k-means centers. Datasets
and checkpoints carry it; anything made with another token system is refused. Loading recomputes it from the
files and refuses a directory whose files no longer match what was written. Nothing here is pickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from ..audio.io import int16_round_trip, sinc_resample
from ..config import TINY, TokenSystemConfig, from_dict, to_dict
from ..infra import storage
from ..interop import laion_clap
from . import encoders
from .acoustic import AcousticCodec
from .clap import ClapFeaturizer, ClapTokenizer
from .rvq import ResidualVQ
from .semantic import SemanticTokenizer, prepare_waveform

CONFIG_FILE = "token_system.json"
RVQ_FILE = "clap_rvq.safetensors"
KMEANS_FILE = "semantic_kmeans.safetensors"
FORMAT_VERSION = 1
ENCODER_KEYS = {"clap": "clap_rvq_cfg", "semantic": "hubert_kmeans_cfg", "encodec": "encodec_cfg"}


class TokenSystemError(RuntimeError):
    """A token system directory is missing, inconsistent, or does not match what it is used with."""


def _tensor_hash(tensor: torch.Tensor | None) -> str:
    if tensor is None:
        return "unfitted"
    t = tensor.detach().cpu().contiguous().float()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def _settings_hash(config: TokenSystemConfig) -> str:
    data = to_dict(config)
    for section in ENCODER_KEYS.values():  # where weights live is not what they are: identities cover that
        data[section].pop("model_name", None)
        data[section].pop("checkpoint_path", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class TokenSystem:
    def __init__(self, config: TokenSystemConfig, *, clap_model, clap_processor, hubert, encodec,
                 rvq: ResidualVQ, centers: torch.Tensor | None, root: Path | None = None,
                 device: str | torch.device = "cpu"):
        self.config, self.root, self.device = config, root, torch.device(device)
        self._models = {"clap": clap_model.to(self.device), "semantic": hubert.to(self.device),
                        "encodec": encodec.to(self.device)}
        self._identities = {k: encoders.weights_identity(m) for k, m in self._models.items()}
        self.rvq = rvq.to(self.device)
        self.clap = ClapTokenizer(self._models["clap"], clap_processor, self.rvq, config.clap_rvq_cfg,
                                  config.clap_audio_length_seconds, self.device)
        self.semantic = SemanticTokenizer(self._models["semantic"], None, config.hubert_kmeans_cfg, self.device)
        self.acoustic = AcousticCodec(self._models["encodec"], config.encodec_cfg, self.device)
        self.set_kmeans(centers)
        self.history: list[dict] = []  # what changed its encoders since it was made (fit-clap), oldest first
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, config: TokenSystemConfig, out: str | Path, device: str = "cpu", seed: int = 0,
               overwrite: bool = False, clap_checkpoint: str | Path | None = None,
               clap_tokenizer: str = laion_clap.TOKENIZER, trust_pickle: bool = False) -> "TokenSystem":
        """Build a token system from ``config`` (encoders from hub ids / local dirs, or ``tiny``) into ``out``.

        ``clap_checkpoint``: a laion_clap ``.pt`` (open-musiclm's ``630k-audioset-best.pt``) converted to
        transformers' CLAP and saved in ``out/encoders/clap`` (instead of ``clap_rvq_cfg.model_name``), with the
        RoBERTa tokenizer from ``clap_tokenizer``. RVQ and k-means start unfitted; `fit-rvq` and `fit-kmeans`
        fill them in (or `import-open-musiclm` sets open-musiclm's).
        """
        out = Path(writable_root(out))
        if (out / CONFIG_FILE).exists() and not overwrite:
            raise TokenSystemError(f"{out} already holds a token system; datasets made with it would no longer "
                                   f"match. Choose another directory, or pass --overwrite if that is intended.")
        if config.clap_rvq_cfg.enable_fusion:
            raise TokenSystemError("clap_rvq_cfg.enable_fusion: fusion CLAP is not supported; use an unfused "
                                   "CLAP, as open-musiclm's released checkpoints do")
        if config.clap_rvq_cfg.checkpoint_path:
            raise TokenSystemError(
                f"clap_rvq_cfg.checkpoint_path={config.clap_rvq_cfg.checkpoint_path!r} is open-musiclm's laion_clap "
                "file: pass it as --clap-checkpoint (converted to transformers' CLAP), or set "
                "clap_rvq_cfg.model_name to a transformers-format CLAP")
        converted = None
        if clap_checkpoint is not None:  # convert before writing anything: a bad file leaves out untouched
            converted = laion_clap.convert_laion_clap(clap_checkpoint, clap_tokenizer, trust_pickle)
        out.mkdir(parents=True, exist_ok=True)
        sections = {}
        models = {}
        for name, key in ENCODER_KEYS.items():
            section = getattr(config, key)
            if name == "clap" and converted is not None:
                encoders.save_clap(*converted, out / "encoders/clap")
                models[name] = converted
                sections[key] = dataclasses.replace(section, model_name="encoders/clap")
            elif section.model_name == TINY:
                built = _build_tiny(name, config, seed)
                rel = f"encoders/{name}"
                if name == "clap":
                    encoders.save_clap(*built, out / rel)
                else:
                    built.save_pretrained(out / rel)
                models[name] = built
                sections[key] = dataclasses.replace(section, model_name=rel)
            else:
                source = str(Path(section.model_name).resolve()) if Path(section.model_name).exists() else section.model_name
                models[name] = _loader(name)(source)
                sections[key] = dataclasses.replace(section, model_name=source)
        config = dataclasses.replace(config, **sections)
        clap_model, clap_processor = models["clap"]
        system = cls(config, clap_model=clap_model, clap_processor=clap_processor, hubert=models["semantic"],
                     encodec=models["encodec"], rvq=new_rvq(config), centers=None, root=out, device=device)
        system.save()
        return system

    @classmethod
    def load(cls, root: str | Path, device: str = "cpu", verify: bool = True) -> "TokenSystem":
        """The token system at ``root``: a folder, or an object-store URI (copied to this node's cache once)."""
        root = local_root(root)
        meta, config = read_meta(root)

        def source(key: str) -> str:
            return encoder_source(root, config, key)

        clap_model, clap_processor = encoders.load_clap(source("clap_rvq_cfg"))
        rvq = new_rvq(config)
        if (root / RVQ_FILE).exists():
            rvq.load_tensors(load_file(str(root / RVQ_FILE)), str(root / RVQ_FILE))
        centers = load_file(str(root / KMEANS_FILE))["centers"] if (root / KMEANS_FILE).exists() else None
        system = cls(config, clap_model=clap_model, clap_processor=clap_processor,
                     hubert=encoders.load_hubert(source("hubert_kmeans_cfg")),
                     encodec=encoders.load_encodec(source("encodec_cfg")), rvq=rvq, centers=centers, root=root,
                     device=device)
        system.history = list(meta.get("history", []))
        if verify and system.fingerprint != meta.get("fingerprint"):
            _modified(root, meta, system.fingerprint_parts())
        return system

    # ------------------------------------------------------------------ state
    def set_rvq(self, rvq: ResidualVQ) -> None:
        self.rvq.load_tensors(rvq.tensors(), "fitted RVQ")

    def set_kmeans(self, centers: torch.Tensor | np.ndarray | None) -> None:
        if centers is not None:
            centers = torch.as_tensor(np.asarray(centers, dtype=np.float32) if not torch.is_tensor(centers) else centers)
            k, d = self.config.hubert_kmeans_cfg.codebook_size, self._models["semantic"].config.hidden_size
            if tuple(centers.shape) != (k, d):
                raise TokenSystemError(f"k-means centers have shape {tuple(centers.shape)} but this token system "
                                       f"needs ({k}, {d}) (codebook_size x semantic encoder width)")
            centers = centers.float().to(self.device)
        self.semantic.centers = centers

    @property
    def rvq_fitted(self) -> bool:
        return bool(self.rvq.initialized)

    @property
    def kmeans_fitted(self) -> bool:
        return self.semantic.centers is not None

    def fingerprint_parts(self) -> dict[str, str]:
        return {"settings": _settings_hash(self.config), **{f"{k}_weights": v for k, v in self._identities.items()},
                "clap_rvq": _tensor_hash(self.rvq.codebooks if self.rvq_fitted else None),
                "semantic_kmeans": _tensor_hash(self.semantic.centers)}

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.fingerprint_parts())

    def save(self, root: str | Path | None = None) -> Path:
        root = Path(writable_root(root or self.root))
        root.mkdir(parents=True, exist_ok=True)
        if self.rvq_fitted:
            storage.write_bytes(root / RVQ_FILE, save_tensors(self.rvq.tensors()))
        if self.kmeans_fitted:
            storage.write_bytes(root / KMEANS_FILE, save_tensors({"centers": self.semantic.centers.cpu().contiguous()}))
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "fingerprint_parts": self.fingerprint_parts(),
                "fitted": {"clap_rvq": self.rvq_fitted, "semantic_kmeans": self.kmeans_fitted},
                "config": to_dict(self.config), **({"history": self.history} if self.history else {})}
        storage.write_json(root / CONFIG_FILE, meta)
        self.root = root
        return root

    # ------------------------------------------------------------------ tokenizing
    def require_fitted(self) -> None:
        _require_fitted(self.root, {"fit-rvq": self.rvq_fitted, "fit-kmeans": self.kmeans_fitted})

    def tokenize(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        """All tokens of one mono clip: ``clap`` (windows, 12), ``semantic`` (T,), ``coarse`` (T', 3), ``fine`` (T', 5),
        from the waveforms ``tokenizer_inputs`` makes of it (as preprocessing does for a clip that is a whole track)."""
        self.require_fitted()
        rates = {"clap": self.clap.sample_rate, "semantic": self.semantic.sample_rate,
                 "acoustic": self.acoustic.sample_rate}
        at = tokenizer_inputs(audio, sample_rate, rates)
        acoustic = self.acoustic.encode(at["acoustic"])
        n_coarse = self.config.num_coarse_quantizers
        return {
            "clap": self.clap.audio_tokens(at["clap"]),
            "semantic": self.semantic.tokens(at["semantic"]),
            "coarse": acoustic[:, :n_coarse],
            "fine": acoustic[:, n_coarse: n_coarse + self.config.num_fine_quantizers],
        }

    def describe(self) -> str:
        c = self.config
        return (f"token system {self.root} fingerprint {self.fingerprint[:12]}: "
                f"clap {c.clap_rvq_cfg.rq_num_quantizers}x{c.clap_rvq_cfg.codebook_size} "
                f"({'fitted' if self.rvq_fitted else 'unfitted'}), semantic k-means {c.hubert_kmeans_cfg.codebook_size} "
                f"({'fitted' if self.kmeans_fitted else 'unfitted'}), encodec {self.acoustic.num_quantizers} codebooks")

    def _validate(self) -> None:
        c = self.config
        clap_dim = self._models["clap"].config.projection_dim
        hub = self._models["semantic"].config
        enc = self._models["encodec"].config
        problems = []
        if clap_dim != c.clap_rvq_cfg.dim:
            problems.append(f"clap_rvq_cfg.dim is {c.clap_rvq_cfg.dim} but the CLAP model embeds to {clap_dim}")
        text = self._models["clap"].config.text_config
        if c.clap_rvq_cfg.text_max_tokens + text.pad_token_id + 1 > text.max_position_embeddings:  # RoBERTa offsets
            problems.append(f"clap_rvq_cfg.text_max_tokens is {c.clap_rvq_cfg.text_max_tokens} but CLAP's text tower has "
                            f"{text.max_position_embeddings - text.pad_token_id - 1} positions")
        if hub.num_hidden_layers < c.hubert_kmeans_cfg.embed_layer:
            problems.append(f"hubert_kmeans_cfg.embed_layer is {c.hubert_kmeans_cfg.embed_layer} but the semantic "
                            f"encoder has {hub.num_hidden_layers} layers")
        if enc.codebook_size != c.encodec_cfg.codebook_size:
            problems.append(f"encodec_cfg.codebook_size is {c.encodec_cfg.codebook_size} but EnCodec has {enc.codebook_size}")
        if round(enc.frame_rate) != c.encodec_cfg.output_hz:
            problems.append(f"encodec_cfg.output_hz is {c.encodec_cfg.output_hz} but EnCodec runs at {enc.frame_rate} Hz")
        if enc.chunk_length_s is not None:
            problems.append("only a non-chunked EnCodec (the 24 kHz model) is supported")
        if self.acoustic.num_quantizers != c.num_coarse_quantizers + c.num_fine_quantizers:
            problems.append(f"EnCodec at {c.encodec_cfg.bandwidth} kbps gives {self.acoustic.num_quantizers} codebooks, "
                            f"not num_coarse_quantizers + num_fine_quantizers = "
                            f"{c.num_coarse_quantizers + c.num_fine_quantizers}")
        if problems:
            raise TokenSystemError("token system settings do not match its encoders: " + "; ".join(problems))


def tokenizer_inputs(clip: np.ndarray, rate: int, rates: dict, semantic_stats: tuple[float, float] | None = None
                     ) -> dict[str, np.ndarray]:
    """The waveform each tokenizer reads, made from a mono ``clip`` at ``rate`` as open-musiclm's preprocessing
    makes them (``SoundDatasetForPreprocessing.process_audio``): each resampled to ``rates[name]`` with its sinc
    filter (``audio.io.sinc_resample``); CLAP's and EnCodec's quantized to int16 (CLAP's featurizer quantizes once
    more, as laion_clap does); the semantic encoder's normalized first by ``semantic_stats``, the statistics of
    the whole track the clip was cut from (``semantic.waveform_stats``; the clip's own when None)."""
    return {name: tokenizer_input(name, clip, rate, rates[name], semantic_stats) for name in ("clap", "semantic", "acoustic")}


def tokenizer_input(name: str, clip: np.ndarray, rate: int, target_rate: int,
                    semantic_stats: tuple[float, float] | None = None) -> np.ndarray:
    """One tokenizer's waveform (``name``: clap, semantic or acoustic); see ``tokenizer_inputs``."""
    if name == "semantic":
        return prepare_waveform(clip, rate, target_rate, semantic_stats)
    return int16_round_trip(sinc_resample(clip, rate, target_rate))


def local_root(root: str | Path) -> Path:
    """A token system's folder on this node: ``root`` itself, or, for an object-store URI, a cached copy (keyed
    by its ``token_system.json``, so a system fitted since is fetched again)."""
    if storage.is_remote(root):
        read_meta(root)  # a clear error when it is not a token system
        return storage.local_copy(root, version_file=CONFIG_FILE)
    return Path(root)


def writable_root(out: str | Path) -> str | Path:
    """``out`` when a token system can be written there (a local folder); a clear error for a URI."""
    if storage.is_remote(out):
        raise TokenSystemError(f"token systems are made in a local folder, not at {out}: make it locally, then "
                               f"copy the folder to object storage (`aws s3 sync DIR {out}`); jobs read it from there")
    return out


def read_meta(root: str | Path) -> tuple[dict, TokenSystemConfig]:
    """The contents of ``token_system.json`` and its config, without loading any weights."""
    meta_path = storage.join(root, CONFIG_FILE)
    try:
        text = storage.read_text(meta_path)
    except FileNotFoundError:
        raise TokenSystemError(f"{root} is not a token system (no {CONFIG_FILE}); create one with "
                               f"`musiclm init-token-system --preset tiny --out {root}` or import a released one") \
            from None
    try:
        meta = json.loads(text)
        config = from_dict(TokenSystemConfig, meta["config"])
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise TokenSystemError(f"{meta_path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise TokenSystemError(f"{meta_path} has format {meta.get('format')!r}; this version reads {FORMAT_VERSION}")
    return meta, config


def _fingerprint(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _modified(root, meta: dict, now: dict[str, str]) -> None:
    """Raise: the files at ``root`` give the fingerprint parts ``now``, not what ``token_system.json`` records."""
    then = meta.get("fingerprint_parts", {})
    changed = sorted(k for k in now if now[k] != then.get(k)) or ["fingerprint"]
    raise TokenSystemError(
        f"token system {root} was modified after it was written: {', '.join(changed)} differ. "
        f"{CONFIG_FILE} says fingerprint {str(meta.get('fingerprint'))[:12]} but the files give "
        f"{_fingerprint({**then, **now})[:12]}. Restore the original files, or re-fit (fit-rvq / fit-kmeans) and "
        f"re-tokenize: data made with the old files will not match.")


def check_unmodified(root: str | Path) -> tuple[dict, TokenSystemConfig]:
    """``read_meta``, and the parts of the fingerprint that need no encoder weights checked against the files: the
    settings, the RVQ codebooks and the k-means centers, and the recorded fingerprint against its recorded parts
    (seconds at most, where ``load`` hashes every encoder weight too). For a driver, before it writes anything."""
    meta, config = read_meta(root)
    parts = meta.get("fingerprint_parts", {})
    now = {"settings": _settings_hash(config)}
    for key, file, tensor in (("clap_rvq", RVQ_FILE, "codebooks"), ("semantic_kmeans", KMEANS_FILE, "centers")):
        path = storage.join(root, file)
        if storage.exists(path):
            from safetensors.torch import load as load_bytes

            now[key] = _tensor_hash(load_bytes(storage.read_bytes(path))[tensor])
    if any(now[k] != parts.get(k) for k in now) or _fingerprint(parts) != meta.get("fingerprint"):
        _modified(root, meta, now)
    return meta, config


def encoder_source(root: Path, config: TokenSystemConfig, key: str) -> str:
    """Where the encoder of config section ``key`` loads from: a directory inside ``root``, or as written."""
    name = getattr(config, key).model_name
    return str(root / name) if not os.path.isabs(name) and (root / name).exists() else name


def require_fitted_files(root: str | Path) -> None:
    """``require_fitted`` without loading any weights."""
    _require_fitted(root, {"fit-rvq": storage.exists(storage.join(root, RVQ_FILE)),
                           "fit-kmeans": storage.exists(storage.join(root, KMEANS_FILE))})


def _require_fitted(root, fitted: dict[str, bool]) -> None:
    missing = [verb for verb, ok in fitted.items() if not ok]
    if missing:
        raise TokenSystemError(f"token system {root} is not fitted yet: run `musiclm {' and '.join(missing)}`")


def acoustic_sample_rate(root: str | Path) -> int:
    """EnCodec's sample rate, from its config alone."""
    root = local_root(root)
    _, config = read_meta(root)
    return int(encoders.load_encodec_config(encoder_source(root, config, "encodec_cfg")).sampling_rate)


def load_acoustic_codec(root: str | Path, device: str = "cpu") -> AcousticCodec:
    """EnCodec alone (to decode acoustic tokens to audio), without the other encoders."""
    root = local_root(root)
    _, config = read_meta(root)
    model = encoders.load_encodec(encoder_source(root, config, "encodec_cfg"))
    return AcousticCodec(model.to(device), config.encodec_cfg, device)


def load_clap_featurizer(root: str | Path) -> ClapFeaturizer:
    """CLAP's feature extraction for this token system, without loading any model weights."""
    root = local_root(root)
    _, config = read_meta(root)
    extractor = encoders.load_clap_feature_extractor(encoder_source(root, config, "clap_rvq_cfg"))
    return ClapFeaturizer(extractor, config.clap_rvq_cfg, config.clap_audio_length_seconds)


def new_rvq(config: TokenSystemConfig) -> ResidualVQ:
    """An unfitted RVQ shaped by the token system's settings."""
    c = config.clap_rvq_cfg
    return ResidualVQ(c.rq_num_quantizers, c.codebook_size, c.dim, c.rq_ema_decay, c.threshold_ema_dead_code)


def _build_tiny(name: str, config: TokenSystemConfig, seed: int):
    if name == "clap":
        return encoders.build_tiny_clap(seed, config.clap_rvq_cfg.dim)
    if name == "semantic":
        return encoders.build_tiny_hubert(seed, config.hubert_kmeans_cfg.embed_layer)
    return encoders.build_tiny_encodec(seed, config.encodec_cfg.bandwidth, config.encodec_cfg.codebook_size)


def _loader(name: str):
    if name == "clap":
        return encoders.load_clap
    return encoders.load_hubert if name == "semantic" else encoders.load_encodec


