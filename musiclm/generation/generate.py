"""Text to music: prompt → CLAP text embedding → RVQ tokens → semantic → coarse → fine → EnCodec → 24 kHz audio,
N candidates ranked by CLAP text–audio cosine similarity (open-musiclm's ``infer_top_match``).

Longer outputs than a stage's window are made with sliding windows as open-musiclm does (REFERENCE.md):

- semantic: windows of the semantic checkpoint's length (10 s = 499 tokens); each further window is
  conditioned on the overlap with what exists (``semantic_step`` = 0.5: the last half) and adds the rest;
- coarse: 4 s windows (300 frames, conditioned on the 199 semantic tokens of the same 4 s) every half window,
  each conditioned on the coarse tokens already made in its span;
- fine: 2 s windows (150 frames, conditioned on the same 150 coarse frames), one after the other.

Windows that do not overlap (the fine stage's, with ``fine_step`` 1) need no tokens of each other, so up to
``window_batch`` of them are sampled as one batch: the same distribution as one after the other in a fifth of
the token steps for 10 s (on a GPU a decoding step takes about as long for 20 rows as for 4), though a seed
draws other tokens than with ``window_batch`` 1.

Unlike open-musiclm's ``unfold`` (which drops a partial last window), the last window of every stage is moved
back to end exactly at the requested length (overlapping more), so a 25 s request gives 25 s of audio.
Window starts of the coarse stage lie on the common grid of the two token rates (1/25 s: 2 semantic and
3 acoustic frames), so semantic and acoustic windows cover the same time.

A prompt may be a clip's sound instead of a text, and may continue a clip (``prompts.py``); every stage may be
sampled with classifier-free guidance (``GenerateSettings.<stage>_guidance``, ``models/sampling.py``).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..audio.io import as_written, decode_audio, resample, write_wav
from ..config import STAGES, check
from ..config_io import check_finite
from ..infra import storage
from ..models.sampling import RowGenerators, sample
from ..train.checkpoint import CheckpointError, StageInfo, check_fits, load_stage, read_stage, sequence_layout
from .prompts import Clip, MusicPrompt, as_prompt, clip_tokens, sound_tokens


@dataclass
class GenerateSettings:
    """What to generate and how to sample it (open-musiclm's inference defaults)."""

    duration: float = 10.0  # seconds of audio per candidate
    num_samples: int = 4  # candidates (N) ranked by CLAP similarity
    top: int = 1  # candidates written as WAV (K)
    seed: int = 0
    semantic_temperature: float = 1.0
    coarse_temperature: float = 0.95
    fine_temperature: float = 0.4
    top_fraction: float = 0.1  # keep this fraction of the logits before sampling (open-musiclm filter_thres 0.9)
    semantic_step: float = 0.5  # sliding-window step, as a fraction of the window
    coarse_step: float = 0.5
    fine_step: float = 1.0
    coarse_only: bool = False  # decode coarse tokens alone (no fine stage)
    batch_size: int = 0  # candidates sampled together (0: all N at once)
    window_batch: int = 8  # windows that do not overlap (the fine stage's) sampled together; 1: one after another
    weights_dtype: str = "auto"  # stage weights for sampling: auto (bfloat16 on a GPU that has it, else float32)
    decoding: str = "auto"  # compiled / static (cache allocated once) / dynamic (cache grows); auto: see DECODING
    # classifier-free guidance per stage (models/sampling.py): 1 = none (exactly the unguided tokens), > 1 follows the
    # text more; needs a stage that learned the null condition (train.cond_drop_prob)
    semantic_guidance: float = 1.0
    coarse_guidance: float = 1.0
    fine_guidance: float = 1.0
    continuation_only: bool = False  # a continued clip (prompts.MusicPrompt.continues): write the new audio alone

    def __post_init__(self):
        check_finite(self)
        check(self.duration > 0, "duration", "must be > 0 seconds")
        check(self.num_samples >= 1, "num_samples", "must be >= 1")
        check(1 <= self.top <= self.num_samples, "top", f"must be between 1 and num_samples ({self.num_samples})")
        for stage in STAGES:
            check(getattr(self, f"{stage}_temperature") >= 0, f"{stage}_temperature", "must be >= 0 (0 = argmax)")
            check(0 < getattr(self, f"{stage}_step") <= 1, f"{stage}_step", "must be in (0, 1]")
            check(getattr(self, f"{stage}_guidance") >= 0, f"{stage}_guidance", "must be >= 0 (1 = no guidance)")
        check(0 < self.top_fraction <= 1, "top_fraction", "must be in (0, 1]")
        check(self.batch_size >= 0, "batch_size", "must be >= 0 (0 = all candidates at once)")
        check(self.window_batch >= 1, "window_batch", "must be >= 1 (1 = windows one after the other)")
        check(self.weights_dtype in WEIGHT_DTYPES, "weights_dtype", f"must be one of {', '.join(WEIGHT_DTYPES)}")
        check(self.decoding in DECODING, "decoding", f"must be one of {', '.join(DECODING)}")

    def stages(self) -> tuple[str, ...]:
        return STAGES[:2] if self.coarse_only else STAGES

    def guidance(self, stage: str) -> float:
        return getattr(self, f"{stage}_guidance")


def check_guidance(infos: dict[str, StageInfo], settings: GenerateSettings) -> None:
    """Refuse guidance with a stage that never learned the null condition: its unconditional rows would be a prompt
    it never saw, and the guided tokens noise."""
    for stage, info in infos.items():
        g = settings.guidance(stage)
        if g != 1 and info.null_condition_steps == 0:
            raise CheckpointError(
                f"guidance {g:g} for the {stage} stage: its checkpoint {info.path} never learned the null condition "
                f"that guidance needs (null_condition_steps 0 in its stage.json: trained with train.cond_drop_prob "
                f"0, as open-musiclm's released stages were). Fine-tune it with conditioning dropout (`musiclm train "
                f"--stage {stage} --init-from {info.path} --set train.cond_drop_prob=0.2 ...`), or sample the "
                f"{stage} stage without guidance (--guidance-scale {stage}=1)")


WEIGHT_DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODING = ("auto", "compiled", "static", "dynamic")


def decoding_mode(name: str, device: torch.device) -> str:
    """``auto`` is ``compiled`` on a GPU (the step as CUDA graphs: one launch per token instead of hundreds) and
    ``static`` on a CPU, where compiling costs ~30 s per stage and batch size before it pays off
    (benchmarks/generate.py measures all three). Every mode draws the same tokens in float32."""
    if name == "auto":
        return "compiled" if device.type == "cuda" else "static"
    return name


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The stage weights' dtype for sampling: ``auto`` is bfloat16 on a CUDA device that supports it (half the
    weight traffic per token; the logits are sampled in float32 all the same), float32 elsewhere."""
    if name == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------- model sets
def resolve_checkpoint(path: str | Path) -> str:
    """A stage checkpoint folder, or the best (else latest) checkpoint of a `musiclm train` run folder (either
    may be an object-store URI)."""
    path = storage.location(path)
    summary = storage.join(path, "summary.json")
    if not storage.exists(storage.join(path, "stage.json")) and storage.exists(summary):
        data = storage.read_json(summary)
        chosen = data.get("best_checkpoint") or data.get("latest_checkpoint")
        if chosen:
            return storage.location(chosen)
    return path


@dataclass
class ModelSet:
    """Three stage checkpoints and the token system they were trained with (folders or object-store URIs)."""

    semantic: str | None
    coarse: str | None
    fine: str | None
    token_system: str

    @classmethod
    def from_dir(cls, root: str | Path, token_system: str | Path | None = None) -> "ModelSet":
        """A folder with ``semantic/``, ``coarse/``, ``fine/`` (checkpoints or run folders) and, unless given,
        ``token_system/`` (the layout `import-open-musiclm` and `pipeline` write), or a JSON file naming them."""
        root = storage.location(root)
        if storage.is_file(root):
            data = storage.read_json(root)
            where = {k: (storage.join(storage.parent(root), v) if v and not storage.is_remote(v)
                         and not Path(v).is_absolute() else v) for k, v in data.items()}
        else:
            where = {k: storage.join(root, k) for k in (*STAGES, "token_system")}
        if token_system is not None:
            where["token_system"] = token_system
        missing = [k for k in (*STAGES, "token_system") if not where.get(k) or not storage.exists(where[k])]
        if missing:
            raise FileNotFoundError(f"model set {root} lacks {', '.join(missing)}: give a folder with semantic/, "
                                    f"coarse/, fine/ and token_system/, or a JSON file naming them")
        return cls(*(resolve_checkpoint(where[s]) for s in STAGES), storage.location(where["token_system"]))

    def paths(self) -> dict[str, str]:
        return {s: p for s, p in zip(STAGES, (self.semantic, self.coarse, self.fine)) if p is not None}


def check_model_set(models: ModelSet, stages: tuple[str, ...] = STAGES,
                    settings: GenerateSettings | None = None) -> dict[str, StageInfo]:
    """Refuse, before loading any weights, a checkpoint given as the wrong stage, checkpoints of different
    token systems, a set whose stages do not chain (semantic codebook, coarse codebooks), or (with ``settings``)
    guidance with a stage that cannot take it."""
    from ..tokens.system import check_unmodified

    # an edited token_system.json is refused as such, not blamed on the checkpoints that no longer match it
    fingerprint = check_unmodified(models.token_system)[0]["fingerprint"]
    infos = {}
    for stage in stages:
        path = models.paths().get(stage)
        if path is None:
            raise CheckpointError(f"no {stage} checkpoint given (--{stage})")
        infos[stage] = info = read_stage(path)
        check_fits(info, stage, what=f"--{stage}")
        check_fits(info, fingerprint=fingerprint, what=f"generation with token system {models.token_system}")
    first_seen: dict[str, tuple[str, str]] = {}  # token sequence -> (stage, layout) where it appeared first
    for stage, info in infos.items():
        for name, layout in sequence_layout(stage, info.model).items():
            other, other_layout = first_seen.setdefault(name, (stage, layout))
            if layout != other_layout:
                raise CheckpointError(f"the {stage} checkpoint ({info.path}) has {name} tokens {layout} but the "
                                      f"{other} checkpoint ({infos[other].path}) has {other_layout}: the stages "
                                      f"do not chain")
    if settings is not None:
        check_guidance(infos, settings)
    return infos


def checkpoint_ids(infos: dict[str, StageInfo]) -> dict[str, dict]:
    """What identifies each stage checkpoint of a set in reports (and decides whether a report is current)."""
    return {s: {"path": str(i.path), "step": i.step, "fingerprint": i.fingerprint} for s, i in infos.items()}


# ---------------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Windows:
    """Window lengths in tokens (from each stage checkpoint's own config) and the token rates."""

    semantic: int  # semantic tokens per semantic window (10 s: 499)
    coarse: int  # acoustic frames per coarse window (4 s: 300)
    fine: int  # acoustic frames per fine window (2 s: 150)
    semantic_hz: int
    acoustic_hz: int

    @classmethod
    def of(cls, infos: dict[str, StageInfo]) -> "Windows":
        model = infos["semantic"].model
        sem_hz, ac_hz = model.hubert_kmeans_cfg.output_hz, model.encodec_cfg.output_hz
        seconds = {s: getattr(i.model.global_cfg, f"{s}_audio_length_seconds") for s, i in infos.items()}
        w = cls(semantic=round(seconds["semantic"] * sem_hz) - 1, coarse=round(seconds["coarse"] * ac_hz),
                fine=round(seconds.get("fine", seconds["coarse"]) * ac_hz), semantic_hz=sem_hz, acoustic_hz=ac_hz)
        if w.coarse % w.grid:
            raise CheckpointError(f"the coarse window ({seconds['coarse']:g} s = {w.coarse} frames) must be a whole "
                                  f"number of {w.grid}-frame steps (1/{ac_hz // w.grid} s) to line up with the semantic "
                                  f"tokens")
        return w

    @property
    def grid(self) -> int:
        """Acoustic frames per common step of both rates (75 and 50 Hz: 3 frames = 2 semantic tokens)."""
        return self.acoustic_hz // math.gcd(self.semantic_hz, self.acoustic_hz)

    def semantic_at(self, frames: int) -> int:
        """Semantic tokens that cover the same time as ``frames`` acoustic frames (on the grid)."""
        return frames * self.semantic_hz // self.acoustic_hz

    def acoustic_frames(self, seconds: float) -> int:
        """Acoustic frames to generate for ``seconds``: rounded up to the grid."""
        return self.grid * math.ceil(round(seconds * self.acoustic_hz, 6) / self.grid)


def slide(total: int, window: int, step_fraction: float, grid: int = 1) -> list[tuple[int, int]]:
    """(start, end) of the windows covering ``total`` positions: starts every ``step_fraction`` of a window (a
    multiple of ``grid``), and a last window that ends exactly at ``total``."""
    if total <= window:
        return [(0, total)]
    step = max(grid, int(window * step_fraction) // grid * grid)
    starts = list(range(0, total - window, step)) + [total - window]
    return [(s, s + window) for s in starts]


def window_groups(windows: list[tuple[int, int]], limit: int, done: int = 0) -> list[list[tuple[int, int]]]:
    """``windows`` in order, grouped for sampling: a window that needs no earlier tokens opens a group, which
    takes the windows of its length that follow it end to end (none conditioned on another's tokens), up to
    ``limit``; a window overlapping what exists (``done`` tokens given before any window) is sampled alone;
    windows inside what is given are left out."""
    groups: list[list[tuple[int, int]]] = []
    open_group = False
    for start, end in windows:
        if end <= done:
            continue
        g = groups[-1] if groups else []
        if open_group and len(g) < limit and start == g[-1][1] and end - start == g[0][1] - g[0][0]:
            g.append((start, end))
        else:
            groups.append([(start, end)])
            open_group = start >= done
        done = max(done, end)
    return groups


def sample_windows(model, windows: list[tuple[int, int]], conditioning, *, temperature: float, top_fraction: float,
                   generator: torch.Generator, sampler=sample, on_window=None, window_batch: int = 1,
                   guidance: float = 1.0, given: torch.Tensor | None = None) -> torch.Tensor:
    """Fill ``windows`` left to right: each window is conditioned on ``conditioning(start, end)`` and on the
    tokens already made inside it, and adds the rest; windows that need none of each other's tokens
    (``window_groups``) are sampled as one batch, up to ``window_batch`` at once. Returns (b, total) or
    (b, total, q). ``guidance``: the sampler's classifier-free guidance (1: none). ``given``: tokens that come
    first (a continued clip's): kept as they are, windows inside them skipped, the first window past them
    conditioned on them."""
    out = given
    for group in window_groups(windows, window_batch, 0 if given is None else given.shape[1]):
        start, end = group[0]
        done = 0 if out is None else out.shape[1]
        prefix = out[:, start:] if out is not None and done > start else None
        if len(group) == 1:
            new = sampler(model, conditioning(start, end), end - done, prefix=prefix, temperature=temperature,
                          top_fraction=top_fraction, generator=generator, guidance=guidance)
        else:  # rows window-major: (windows × b, steps[, q]) -> (b, windows × steps[, q])
            rows = [torch.cat(c) for c in zip(*(conditioning(s, e) for s, e in group))]
            noise = generator.tile(len(group), rows[0].shape[0] // len(group)) \
                if isinstance(generator, RowGenerators) else generator
            new = sampler(model, rows, end - start, temperature=temperature, top_fraction=top_fraction,
                          generator=noise, guidance=guidance)
            new = new.unflatten(0, (len(group), -1)).transpose(0, 1).flatten(1, 2)
        out = new if out is None else torch.cat((out, new), 1)
        if on_window:
            on_window(group[-1][1] - done)
    return out


# ---------------------------------------------------------------------------------------------- generator
@dataclass
class Candidates:
    """N generated clips of one prompt, in candidate order, with their CLAP scores."""

    prompt: str  # its label (prompts.MusicPrompt.label: the text for a text prompt)
    audio: np.ndarray  # (N, samples) float32, exactly as written to 16-bit WAV
    sample_rate: int
    scores: np.ndarray  # (N,) CLAP cosine similarity to the text (or the audio prompt's audio)
    timings: dict[str, float]
    spec: MusicPrompt | None = None
    continued_seconds: int | None = None  # the continued clip's seconds (before the new audio unless cut off)

    @property
    def ranking(self) -> list[int]:
        return sorted(range(len(self.scores)), key=lambda i: -float(self.scores[i]))


class MusicGenerator:
    """A loaded model set: the token system (CLAP, RVQ, EnCodec) and the stage transformers."""

    def __init__(self, models: ModelSet, device: str | torch.device | None = None, coarse_only: bool = False,
                 weights_dtype: str = "auto", compile_mode: str | None = None):
        """``compile_mode``: the torch.compile mode of the ``compiled`` decoding step (None: ``compile_decoding``'s
        choice, CUDA graphs on a GPU)."""
        from ..tokens.system import TokenSystem

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        stages = STAGES[:2] if coarse_only else STAGES
        self.model_set = models
        self.infos = check_model_set(models, stages)  # refuse before loading any weights
        self.windows = Windows.of(self.infos)
        self.system = TokenSystem.load(models.token_system, self.device)
        self.system.require_fitted()
        self.models = {s: load_stage(i.path, s, self.system.fingerprint, self.device)[0] for s, i in self.infos.items()}
        self.dtype = inference_dtype(weights_dtype, self.device)
        for model in self.models.values():
            model.to(self.dtype)
        self.compile_mode, self.compiled = compile_mode, False

    def sampler(self, settings: GenerateSettings):
        """``sample`` with the settings' decoding mode (compiling every stage's step the first time it is asked)."""
        mode = decoding_mode(settings.decoding, self.device)
        if mode == "compiled" and not self.compiled:
            for model in self.models.values():
                model.compile_decoding(self.compile_mode)
            self.compiled = True
        return functools.partial(sample, decoding="dynamic" if mode == "dynamic" else "static")

    def describe(self) -> dict:
        return {"checkpoints": checkpoint_ids(self.infos), "weights_dtype": str(self.dtype).removeprefix("torch."),
                "token_system": {"path": str(self.model_set.token_system), "fingerprint": self.system.fingerprint},
                "windows": asdict(self.windows)}

    def plan(self, settings: GenerateSettings, given_frames: int = 0) -> dict[str, list[tuple[int, int]]]:
        """The windows each stage fills for ``settings.duration`` after ``given_frames`` acoustic frames of a
        continued clip (its windows are skipped when sampling)."""
        w = self.windows
        frames = given_frames + w.acoustic_frames(settings.duration)
        coarse = slide(frames, w.coarse, settings.coarse_step, w.grid)
        semantic_total = max(w.semantic_at(end) - 1 for _, end in coarse)
        plan = {"semantic": slide(semantic_total, w.semantic, settings.semantic_step),
                "coarse": coarse, "fine": slide(frames, w.fine, settings.fine_step)}
        return {s: plan[s] for s in settings.stages()}

    def tokens(self, clap: torch.Tensor, settings: GenerateSettings, generator: torch.Generator,
               sampler=None, progress=None, given: Clip | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Acoustic codes (b, frames, coarse [+ fine] codebooks) for CLAP tokens ``clap`` (b, 12); with ``given``
        (a clip to continue) its codes first, then the continuation's."""
        w, timings = self.windows, {}
        plan = self.plan(settings, 0 if given is None else given.tokens["coarse"].shape[0])
        sampler = sampler or self.sampler(settings)

        def prefix(stage):
            if given is None:
                return None
            tokens = torch.as_tensor(given.tokens[stage].astype(np.int64), device=clap.device)
            return tokens.expand(clap.shape[0], *tokens.shape)

        def run(stage, conditioning):
            start = time.perf_counter()
            if progress:
                progress.set_postfix_str(stage)
            out = sample_windows(self.models[stage], plan[stage], conditioning, generator=generator, sampler=sampler,
                                 temperature=getattr(settings, f"{stage}_temperature"),
                                 top_fraction=settings.top_fraction, on_window=progress.update if progress else None,
                                 window_batch=settings.window_batch, guidance=settings.guidance(stage),
                                 given=prefix(stage))
            timings[stage] = time.perf_counter() - start
            return out

        semantic = run("semantic", lambda s, e: [clap])
        coarse = run("coarse", lambda s, e: [clap, semantic[:, w.semantic_at(s): w.semantic_at(e) - 1]])
        if settings.coarse_only:
            return coarse, timings
        fine = run("fine", lambda s, e: [clap, coarse[:, s:e]])
        return torch.cat((coarse, fine), -1), timings

    def steps(self, settings: GenerateSettings, given_frames: int = 0) -> int:
        """Time steps one batch of candidates samples over all stages (the progress bar's unit), after
        ``given_frames`` of a continued clip."""
        given = {"semantic": self.windows.semantic_at(given_frames) - 1 if given_frames else 0,
                 "coarse": given_frames, "fine": given_frames}
        return sum(windows[-1][1] - given[stage] for stage, windows in self.plan(settings, given_frames).items())

    def condition(self, prompt: MusicPrompt) -> tuple[torch.Tensor, torch.Tensor | str, Clip | None]:
        """A prompt's CLAP tokens (1, q), what its candidates are ranked against (its text, or the unit CLAP
        audio embedding of its audio prompt or continued clip) and the clip it continues."""
        given = clip_tokens(self.system, prompt.continues, continuation=True) if prompt.continues else None
        if prompt.text:
            tokens, reference = self.system.clap.text_tokens([prompt.text]), prompt.text
        else:  # the audio prompt, or the continued clip as one: its first CLAP window, as preprocessing gives it
            audio, rate = decode_audio(prompt.sound)  # once, for its tokens and its embedding
            tokens, reference = sound_tokens(self.system, audio, rate), audio_embedding(self.system, audio, rate)
        return torch.as_tensor(tokens, dtype=torch.long, device=self.device), reference, given

    def generate(self, prompt: "str | MusicPrompt", settings: GenerateSettings, sampler=None,
                 progress=None) -> Candidates:
        """``settings.num_samples`` candidates for ``prompt``, scored by CLAP."""
        return self.generate_many([prompt], settings, sampler, progress)[0]

    def generate_many(self, prompts: "list[str | MusicPrompt]", settings: GenerateSettings, sampler=None,
                      progress=None) -> list[Candidates]:
        """``generate`` for each prompt, the candidates of all sampled as one batch: one pass of decoding steps
        (on a GPU a step takes about as long for 32 rows as for 4: the prompts take about the time of one).
        Each prompt's noise comes from its own generator seeded with ``settings.seed``, drawn as that prompt alone
        draws it (``RowGenerators``), so a prompt gets the candidates it gets alone (tested), whatever shares its
        batch. With a ``batch_size`` below ``num_samples``, or prompts that continue clips (each its own length),
        the prompts run one after the other."""
        check_guidance(self.infos, settings)
        prompts = [as_prompt(p) for p in prompts]
        if len(prompts) > 1 and any(p.continues for p in prompts):
            return [self.generate_many([p], settings, sampler, progress)[0] for p in prompts]
        t0 = time.perf_counter()
        n = settings.num_samples
        batch = settings.batch_size or n

        def seeded() -> torch.Generator:  # on the model's device: the noise is made there (a GPU's draws differ)
            return torch.Generator(device=self.device).manual_seed(settings.seed)

        # one prompt at a time, as alone (a padded batch of texts could round its embedding differently)
        conditions = [self.condition(p) for p in prompts]
        clap = torch.cat([c[0] for c in conditions])
        given = conditions[0][2]
        if len(prompts) > 1 and batch >= n:
            rows = torch.arange(len(prompts) * n, device=self.device).view(len(prompts), n)
            chunks = [(clap.repeat_interleave(n, 0), RowGenerators([(seeded(), r) for r in rows]))]
        else:
            chunks = []
            for i in range(len(prompts)):
                g = seeded()  # each chunk of a prompt goes on drawing from its generator
                chunks += [(clap[i:i + 1].expand(min(batch, n - first), -1), g) for first in range(0, n, batch)]
        codes, timings = [], {}
        for rows, generator in chunks:
            out, t = self.tokens(rows, settings, generator, sampler, progress, given)
            codes.append(out.cpu())
            timings = {k: timings.get(k, 0.0) + v for k, v in t.items()}
        start = time.perf_counter()
        codec = self.system.acoustic
        first = 0 if given is None or not settings.continuation_only else given.seconds * codec.sample_rate
        end = int(round(((given.seconds if given else 0) + settings.duration) * codec.sample_rate))
        audio = np.stack([as_written(codec.decode(c.numpy())[first:end]) for c in torch.cat(codes)])
        timings["decode"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = [clap_scores(self.system, c[1], audio[i * n:(i + 1) * n], codec.sample_rate)
                  for i, c in enumerate(conditions)]
        timings["score"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - t0
        timings["real_time_factor"] = timings["total"] / (settings.duration * n * len(prompts))  # per candidate
        if len(prompts) > 1:
            timings["prompts_together"] = len(prompts)
        timings = {k: round(v, 4) for k, v in timings.items()}
        return [Candidates(p.label, audio[i * n:(i + 1) * n], codec.sample_rate, scores[i], dict(timings), p,
                           None if given is None else given.seconds)
                for i, p in enumerate(prompts)]

    def write(self, result: Candidates, settings: GenerateSettings, out: str | Path) -> dict:
        """The top K as ``sample_<rank>.wav`` and ``report.json`` (every candidate's score, best first)."""
        out = storage.location(out)  # a folder or an object-store URI; report.json last: it marks the folder done
        storage.remove_temporaries(out)  # what a killed earlier write of this folder left half written
        ranked = []
        for rank, i in enumerate(result.ranking, 1):
            name = f"sample_{rank}.wav" if rank <= settings.top else None
            if name:
                write_wav(storage.join(out, name), result.audio[i], result.sample_rate)
            ranked.append({"rank": rank, "candidate": i, "score": float(result.scores[i]), "file": name})
        spec = {"prompt_spec": result.spec.to_dict(), "continued_seconds": result.continued_seconds} \
            if result.spec is not None and (result.spec.audio or result.spec.continues) else {}
        report = {"prompt": result.prompt, **spec, "seed": settings.seed, "duration_s": settings.duration,
                  "sample_rate": result.sample_rate, "scores": [c["score"] for c in ranked],
                  "best_score": ranked[0]["score"], "mean_score": float(np.mean(result.scores)),
                  # candidate 0 is one sample drawn without looking at scores: what a user gets without reranking
                  "random_score": float(result.scores[0]),
                  "candidates": ranked, "files": [storage.join(out, c["file"]) for c in ranked if c["file"]],
                  "settings": asdict(settings), **self.describe(), "timings": result.timings}
        storage.write_json(storage.join(out, REPORT), report)
        return report


REPORT = "report.json"


def clap_scores(system, prompt: "str | torch.Tensor", audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cosine similarity between the prompt's CLAP text embedding (or a unit audio embedding: an audio prompt's)
    and each clip's CLAP audio embedding (``audio_embedding``)."""
    if isinstance(prompt, str):
        prompt = torch.nn.functional.normalize(system.clap.text_embeddings([prompt]), dim=-1)[0]
    return np.asarray([float(audio_embedding(system, clip, sample_rate) @ prompt) for clip in audio],
                      dtype=np.float64)


def audio_embedding(system, clip: np.ndarray, sample_rate: int) -> torch.Tensor:
    """A clip's unit CLAP audio embedding: the mean of its unit-norm 10 s window embeddings, renormalized (one
    window for clips up to 10 s)."""
    windows = system.clap.audio_embeddings(resample(clip, sample_rate, system.clap.sample_rate))
    return torch.nn.functional.normalize(torch.nn.functional.normalize(windows, dim=-1).mean(0), dim=-1)


def progress_bar(generator: MusicGenerator, settings: GenerateSettings, enabled: bool = True):
    """A tqdm bar over every time step of every stage and batch of candidates (stage shown on the right)."""
    from tqdm import tqdm

    batches = math.ceil(settings.num_samples / (settings.batch_size or settings.num_samples))
    return tqdm(total=generator.steps(settings) * batches, unit="step", disable=not enabled,
                desc="generating", dynamic_ncols=True)


__all__ = ["GenerateSettings", "ModelSet", "MusicGenerator", "Candidates", "Windows", "check_guidance",
           "check_model_set", "checkpoint_ids", "clap_scores", "audio_embedding", "resolve_checkpoint",
           "sample_windows", "slide", "window_groups", "progress_bar", "REPORT"]
