"""The whole path in one run: corpus → token system → train its EnCodec and CLAP (tiny) → fit RVQ and k-means →
preprocess → train the three stages (with conditioning dropout) → generate (with guidance) → evaluate → how well
the music follows the prompt, each step skipped when its output exists and matches (a second run only checks).
Needs a connected Ray; each step calls the same library code as its own job.

    WORK/corpus/              synthetic corpus (or --source: any audio folder / FMA, used as it is)
    WORK/token_system/        tiny (offline) or the preset's encoders
    WORK/tokens/              token dataset
    WORK/runs/<stage>/        training runs (checkpoints, tensorboard/, summary.json)
    WORK/models/{early,final}/  model sets: the first checkpoint of each stage, and the best
    WORK/generate/            the demo prompt's best WAV and report.json
    WORK/evaluate/            early vs final, unguided and guided, on the held-out tracks' captions (or
                              ``prompts``): results.md / .csv, scores.png, tensorboard/
    WORK/prompt_following.json  the prompt-following block (``evaluation.prompt_following``), also in
                              pipeline.json
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import STAGES, TINY, ConfigError

DEMO_PROMPT = ("An upbeat electronic track at 128 BPM in A minor, with a sawtooth synth lead and four-on-the-floor "
               "drums.")  # a caption of the synthetic corpus's kind


@dataclass
class PipelineSettings:
    workdir: str = "demo_out"
    preset: str = "tiny"
    source: str | None = None  # an audio folder to use instead of the synthetic corpus
    num_tracks: int = 64  # fit-clap needs this many to learn the captions (12 held out: recall@1 0.08 -> 0.29)
    seconds: float = 12.0
    rvq_steps: int = 200
    # fit-codec steps for the tiny preset's random EnCodec, so that tokens decode to audio of the corpus's kind
    # (0: it stays random; pretrained presets keep their EnCodec)
    codec_steps: int = 300  # ~1 min on 2 CPUs: rhythm comes through its codes by then (docs/tokens-and-data.md)
    # fit-clap steps for the tiny preset's random CLAP on the corpus' captions (0: it stays random, and every CLAP
    # score is noise); pretrained presets keep their CLAP
    clap_steps: int = 200
    train_steps: int = 60  # per stage
    # the semantic stage's steps (0: train_steps): the stage where the text decides what the music is, and the
    # cheapest to train (a tenth of a second a step here, against a third for coarse and fine). On the demo's 47
    # train tracks its valid loss is lowest near 150 (5.91 at 30, 4.40 at 150, 4.43 at 300)
    semantic_steps: int = 150
    num_workers: int = 2
    batch_size: int = 2  # per worker
    lr: float = 2e-3
    use_gpu: bool = False
    duration: float = 10.0  # seconds generated per candidate
    num_samples: int = 2
    prompt: str = DEMO_PROMPT
    prompts: list[str] = field(default_factory=list)  # the evaluation's; none: the held-out tracks' captions
    max_prompts: int = 8  # of the held-out captions
    eval_duration: float = 4.0
    seed: int = 0
    # k-means clusters of the semantic tokens; 0: the preset's (1024) for a --source corpus, and for the synthetic
    # one a power of two giving each cluster at least FRAMES_PER_CLUSTER of its frames (512 for the demo's 64 x 12 s)
    semantic_clusters: int = 0
    # codes per quantizer of the CLAP RVQ; 0: the preset's (1024) for a --source corpus, and for the synthetic one a
    # power of two giving each code at least WINDOWS_PER_CODE of its CLAP windows (16 for the demo)
    clap_codes: int = 0
    # levels of the CLAP RVQ, the CLAP tokens every stage is conditioned on; 0: the preset's (12) for a --source
    # corpus, and SYNTH_CLAP_LEVELS for the synthetic one
    clap_levels: int = 0
    # codes per codebook of the tiny EnCodec, the vocabulary of the coarse and fine stages (0: the preset's, 1024).
    # With 64 the coarse and fine stages end far lower below chance, and the WAV is no closer to the corpus
    # (benchmarks/RESULTS.md). A pretrained EnCodec keeps its own
    codec_codes: int = 0
    # what the stages' CLAP tokens are made of when tokenizing (DataConfig.clap_from): "audio" (MusicLM's way) or
    # "caption" (the track's caption, for a corpus whose captions describe it); None: "audio" for a --source corpus,
    # "caption" for the synthetic one (tokens_from)
    clap_from: str | None = None
    cond_drop_prob: float = 0.2  # conditioning dropout of every stage's training (train.cond_drop_prob)
    # classifier-free guidance of every stage when generating; the evaluation samples each set unguided and with it
    # (1: none)
    guidance: float = 3.0
    # the seed's experiment rehearsed: fine-tune the final model set on one genre of the corpus (FMA metadata's
    # genres_all, e.g. "Rock") and evaluate it against the final set, unguided and guided, on held-out captions
    # outside that genre (None: not run). shift_steps per stage; 0: train_steps
    shift_genre: str | None = None
    shift_steps: int = 0

    def __post_init__(self):
        if self.guidance != 1 and self.cond_drop_prob <= 0:
            raise ConfigError(f"guidance {self.guidance:g} needs stages that learned the null condition: train them "
                              f"with conditioning dropout (--cond-drop-prob 0.2), or generate without guidance "
                              f"(--guidance-scale 1)")

    def clusters(self, kmeans) -> int:
        """The semantic k-means size, given the preset's ``HubertKmeansConfig``."""
        if self.semantic_clusters:
            return self.semantic_clusters
        if self.source is not None:
            return kmeans.codebook_size
        frames = self.num_tracks * self.seconds * kmeans.output_hz
        return int(min(kmeans.codebook_size, max(16, 2 ** math.floor(math.log2(frames / FRAMES_PER_CLUSTER)))))

    def levels(self, rvq) -> int:
        """The CLAP RVQ's levels, given the preset's ``ClapRVQConfig``."""
        if self.clap_levels:
            return self.clap_levels
        return rvq.rq_num_quantizers if self.source is not None else SYNTH_CLAP_LEVELS

    def acoustic_codes(self, encodec) -> int:
        """The EnCodec's codes per codebook, given the preset's ``EncodecConfig`` (a pretrained one keeps its own)."""
        if self.codec_codes:
            if encodec.model_name != TINY:
                raise ConfigError(f"codec_codes: the {self.preset} preset's EnCodec is pretrained, with "
                                  f"{encodec.codebook_size} codes a codebook; leave --codec-codes at 0")
            return self.codec_codes
        return encodec.codebook_size

    def tokens_from(self) -> str:
        """What the stages' CLAP tokens are made of (``DataConfig.clap_from``). The synthetic corpus's captions
        describe its audio, and the tiny CLAP tuned on them does not place a caption where its audio is (CLAP's
        modality gap: a held-out caption's tokens were its clip's on none of 12 clips, benchmarks/RESULTS.md), so
        stages trained on audio tokens are prompted with tokens they never saw; trained on caption tokens, they
        are prompted with the kind they learned from."""
        if self.clap_from is not None:
            return self.clap_from
        return "audio" if self.source is not None else "caption"

    def codes(self, rvq) -> int:
        """The CLAP RVQ's codes per quantizer, given the preset's ``ClapRVQConfig``."""
        if self.clap_codes:
            return self.clap_codes
        from .evaluation.quality import CLAP_WINDOW_SECONDS

        if self.source is not None:
            return rvq.codebook_size
        windows = self.num_tracks * (max(0, math.floor((self.seconds - CLAP_WINDOW_SECONDS) / rvq.hop_seconds)) + 1)
        return int(min(rvq.codebook_size, max(2, 2 ** math.floor(math.log2(max(1, windows // WINDOWS_PER_CODE))))))


# Fewer frames per cluster and the clusters fit the corpus' tracks instead of the music: on the demo corpus with
# 1024 clusters (~9 frames each) the semantic stage memorized its train tracks' ids (train loss 5.6) and stayed at
# chance on the valid ones (7.0-7.3 against ln 1025 = 6.93).
FRAMES_PER_CLUSTER = 64
# The same for the conditioning: an RVQ with more codes than the corpus has CLAP windows gives every train track its
# own first code, and the stages learn each track's (a held-out track's tokens are those of its nearest train track).
WINDOWS_PER_CODE = 8
# 12 levels of 16 codes make each of the demo's 47 train tracks a condition of its own, an id the stages memorize;
# with 3, the semantic stage uses a held-out track's CLAP tokens at each window's opening (benchmarks/RESULTS.md:
# +0.125 ± 0.057 against -0.023 ± 0.037 with 12, same corpus and CLAP)
SYNTH_CLAP_LEVELS = 3
QUANTIZERS = ("clap_rvq", "semantic_kmeans")  # the token system's fitted parts (token_system.json's "fitted")
PROMPT_FOLLOWING = "prompt_following.json"
GENRE_SHIFT = "genre_shift.json"


class Pipeline:
    def __init__(self, settings: PipelineSettings, resources: dict, actors: int | None = None,
                 gpus_per_actor: float | None = None, log=print):
        self.s, self.resources, self.log = settings, resources, log
        self.actors, self.gpus_per_actor = actors, gpus_per_actor
        self.work = Path(settings.workdir).resolve()
        self.corpus = Path(settings.source).resolve() if settings.source else self.work / "corpus"
        self.ts = self.work / "token_system"
        self.tokens = self.work / "tokens"
        self.runs = self.work / "runs"
        self.models = self.work / "models"
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ step runner
    def step(self, name: str, done: bool, action) -> None:
        if done:
            self.log(f"step {name}: done already, skipped")
            self.timings[name] = 0.0
            return
        start = time.time()
        action()
        self.timings[name] = round(time.time() - start, 1)
        self.log(f"step {name}: finished in {self.timings[name]:.1f} s")

    def run(self) -> dict:
        start = time.time()
        self.step("synth", self.s.source is not None or self._corpus_done(), self._synth)
        self.step("init-token-system", (self.ts / "token_system.json").exists(), self._init_token_system)
        self.step("fit-codec", self.s.preset != "tiny" or not self.s.codec_steps
                  or (self.ts / "fit_codec.report.json").exists(), self._fit_codec)
        self.step("fit-clap", self.s.preset != "tiny" or not self.s.clap_steps
                  or (self.ts / "fit_clap.report.json").exists(), self._fit_clap)
        self.step("fit-quantizers", all(self._fitted(p) for p in QUANTIZERS), self._fit_quantizers)
        self.step("preprocess", self._dataset_done(), self._preprocess)
        for stage in STAGES:
            self.step(f"train-{stage}", self._trained(stage), lambda stage=stage: self._train(stage))
        self.step("model-sets", self._model_sets_done(), self._model_sets)
        self.step("generate", self._generated(), self._generate)
        self.step("evaluate", self._evaluated(), self._evaluate)
        self.step("prompt-following", self._prompt_following_done(), self._prompt_following)
        if self.s.shift_genre:
            self._run_shift()
        summary = {"workdir": str(self.work), "seconds": round(time.time() - start, 1), "steps": self.timings,
                   "stages": {stage: self.stage_result(stage) for stage in STAGES},
                   "wavs": json.loads((self.work / "generate" / "report.json").read_text())["files"],
                   "report": str(self.work / "generate" / "report.json"),
                   "evaluation": str(self.work / "evaluate" / "results.md"),
                   "plot": str(self.work / "evaluate" / "scores.png"),
                   "prompt_following": json.loads((self.work / PROMPT_FOLLOWING).read_text()),
                   "tensorboard": f"tensorboard --logdir {self.work} --host 127.0.0.1"}
        if self.s.shift_genre:
            summary["genre_shift"] = json.loads((self._shift_dir() / GENRE_SHIFT).read_text())
        (self.work / "pipeline.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ------------------------------------------------------------------ corpus and token system
    def _corpus_done(self) -> bool:
        captions = self.corpus / "captions.jsonl"
        return captions.exists() and sum(1 for _ in captions.open()) == self.s.num_tracks

    def _synth(self) -> None:
        from .audio import synth

        synth.write_corpus(self.corpus, self.s.num_tracks, self.s.seconds, self.s.seed)

    def _init_token_system(self) -> None:
        from .tokens.system import TokenSystem

        TokenSystem.create(self._model_config().token_system(), self.ts, seed=self.s.seed)

    def _fit_codec(self) -> None:
        """The tiny EnCodec trained to reconstruct the corpus (half-second segments, 8 per track; a fifth of the
        tracks, at most 12, held out for its report: each evaluation scores all their segments; with 32 of 256 tracks
        fit-codec took 193 s, against 105 s for 12 of 64), before anything is tokenized with it."""
        from .data.sources import open_source
        from .tokens.codec_training import CodecTrainConfig, fit_codec

        cfg = CodecTrainConfig(steps=self.s.codec_steps, batch_size=8, segment_seconds=0.5, segments_per_track=8,
                               valid_tracks=12, eval_every=max(10, self.s.codec_steps // 3),  # a line a third
                               seed=self.s.seed)
        fit_codec(self.ts, open_source(self.corpus), cfg, str(self.work / "runs" / "codec"),
                  float(self.resources.get("CPU", 1.0)), log=self.log)

    def _fit_clap(self) -> None:
        """The tiny CLAP tuned contrastively on the corpus' captions (both towers; a fifth of the tracks held out
        for its retrieval scores), before its RVQ is fitted and anything is tokenized with it."""
        from .data.sources import open_source
        from .tokens.clap_tuning import ClapTuneConfig, captioned, fit_clap
        from .tokens.tuning import split_tracks

        source = open_source(self.corpus)
        cfg = ClapTuneConfig(steps=self.s.clap_steps, batch_size=16, lr=5e-4, warmup=10, windows_per_track=2,
                             eval_every=max(10, self.s.clap_steps // 3), seed=self.s.seed)
        train, _ = split_tracks(captioned(source), cfg)  # a batch of 16, or of every train track when fewer
        cfg = dataclasses.replace(cfg, batch_size=max(2, min(cfg.batch_size, len(train))))
        fit_clap(self.ts, source, cfg, str(self.work / "runs" / "clap"), float(self.resources.get("CPU", 1.0)),
                 log=self.log)

    def _model_config(self):
        """The preset's model config with the semantic k-means and CLAP RVQ sizes of ``settings.clusters`` and
        ``settings.codes``."""
        from .config import model_preset

        cfg = model_preset(self.s.preset)
        k, c = self.s.clusters(cfg.hubert_kmeans_cfg), self.s.codes(cfg.clap_rvq_cfg)
        levels = self.s.levels(cfg.clap_rvq_cfg)
        cfg = dataclasses.replace(cfg, hubert_kmeans_cfg=dataclasses.replace(cfg.hubert_kmeans_cfg, codebook_size=k),
                                  clap_rvq_cfg=dataclasses.replace(cfg.clap_rvq_cfg, codebook_size=c,
                                                                   rq_num_quantizers=levels))
        codes = self.s.acoustic_codes(cfg.encodec_cfg)
        if codes != cfg.encodec_cfg.codebook_size:
            # as many codebooks as the stages read (coarse + fine), each of log2(codes) bits at the codec's rate
            g = cfg.global_cfg
            codebooks = g.num_coarse_quantizers + g.num_fine_quantizers
            kbps = codebooks * cfg.encodec_cfg.output_hz * math.log2(codes) / 1000
            cfg = dataclasses.replace(cfg, encodec_cfg=dataclasses.replace(cfg.encodec_cfg, codebook_size=codes,
                                                                           bandwidth=round(kbps, 6)))
        return cfg

    def _fitted(self, part: str) -> bool:
        meta = self.ts / "token_system.json"
        return meta.exists() and json.loads(meta.read_text())["fitted"][part]

    def _plan(self):
        from .infra.raycompute import plan_actors

        return plan_actors(self.resources, self.actors, self.gpus_per_actor)

    def _fit_quantizers(self) -> None:
        """fit-rvq and fit-kmeans in one pass over the corpus, each part not fitted yet (each track decoded once,
        one start of the encoder actors: 1.4x faster than the two jobs on 2 CPUs, benchmarks/fit_quantizers.py)."""
        from .tokens.fit import fit_quantizers

        fit_quantizers(self.ts, self.corpus, self._plan(), parts=tuple(p for p in QUANTIZERS if not self._fitted(p)),
                       rvq_steps=self.s.rvq_steps, frames_per_track=10_000, seed=self.s.seed, log=self.log)

    # ------------------------------------------------------------------ data and training
    def _fingerprint(self) -> str:
        return json.loads((self.ts / "token_system.json").read_text())["fingerprint"]

    def _dataset_done(self, tokens: Path | None = None) -> bool:
        manifest = (tokens or self.tokens) / "manifest.json"
        if not manifest.exists():
            return False
        m = json.loads(manifest.read_text())
        done = m.get("status") == "complete" and m.get("fingerprint") == self._fingerprint()
        made_from = m.get("tokens", {}).get("clap", {}).get("from", "audio")  # before DataConfig.clap_from: audio
        if done and made_from != self.s.tokens_from():
            raise ConfigError(f"{manifest.parent}: its CLAP tokens are made from {made_from}, and this run's would be "
                              f"from {self.s.tokens_from()} (--clap-from; the synthetic corpus's default is caption): "
                              f"give --clap-from {made_from} to go on with it, or another --workdir")
        return done

    def _preprocess(self, tokens: Path | None = None, source=None) -> None:
        from .config import DataConfig
        from .data.preprocess import prepare, run
        from .data.sources import open_source

        # 10 s crops (the semantic window) at 3 offsets per track: 3x the rows for training from a few tracks,
        # and fewer restarts of the data pipeline per epoch
        cfg = DataConfig(clip_seconds=10, crops=3, valid_frac=0.25, seed=self.s.seed, rows_per_shard=16,
                         clap_from=self.s.tokens_from())
        job = prepare(source or open_source(self.corpus), self.ts, tokens or self.tokens, cfg, log=self.log)
        run(job, self._plan(), log=self.log)

    def _stage_steps(self, stage: str) -> int:
        return self.s.semantic_steps or self.s.train_steps if stage == "semantic" else self.s.train_steps

    def _train_config(self, stage: str, steps: int | None = None):
        from .config import stage_config

        steps = steps or self._stage_steps(stage)
        model, every = self._model_config(), max(1, steps // 2)
        return stage_config(stage, self.s.preset, None, [
            f"train.num_train_steps={steps}", f"train.num_workers={self.s.num_workers}",
            f"train.use_gpu={str(self.s.use_gpu).lower()}", f"train.save_model_every={every}",
            f"train.save_results_every={every}", "train.valid_batches=1", f"train.seed={self.s.seed}",
            f"train.lr_warmup={min(10, steps // 4)}", "train.log_every=5",
            f"train.batch_size={self.s.batch_size}", f"train.lr={self.s.lr}",
            f"train.cond_drop_prob={self.s.cond_drop_prob}",
            f"model.hubert_kmeans_cfg.codebook_size={model.hubert_kmeans_cfg.codebook_size}",
            f"model.clap_rvq_cfg.codebook_size={model.clap_rvq_cfg.codebook_size}",
            f"model.clap_rvq_cfg.rq_num_quantizers={model.clap_rvq_cfg.rq_num_quantizers}",
            f"model.encodec_cfg.codebook_size={model.encodec_cfg.codebook_size}",
            f"model.encodec_cfg.bandwidth={model.encodec_cfg.bandwidth}"])

    def _trained(self, stage: str, runs: Path | None = None, steps: int | None = None) -> bool:
        from .train.checkpoint import read_stage
        from .train.run import latest_checkpoint

        latest = latest_checkpoint((runs or self.runs) / stage)
        info = read_stage(latest) if latest is not None else None
        return (info is not None and info.step >= (steps or self._stage_steps(stage))
                and info.fingerprint == self._fingerprint())

    def stage_result(self, stage: str) -> dict:
        """How far below chance the stage's best checkpoint is on the valid split, and how much its loss rises
        when another track's CLAP tokens are swapped in (the conditioning gain)."""
        from .models.stages import stage_sequences
        from .train.metrics import CHANCE_TOLERANCE

        summary = json.loads((self.runs / stage / "summary.json").read_text())
        loss = summary["best_valid_loss"]
        chance = math.log(stage_sequences(stage, self._train_config(stage).model)[-1].codebook_size + 1)
        return {"best_valid_loss": loss, "chance": chance, "below_chance": chance - loss,
                "below_chance_pct": 100 * (chance - loss) / chance,
                "at_chance": abs(loss - chance) <= CHANCE_TOLERANCE * chance,
                "conditioning_gain": summary["metrics"].get("valid/conditioning_gain")}

    def _train(self, stage: str, tokens: Path | None = None, runs: Path | None = None, steps: int | None = None,
               init_from: Path | None = None) -> None:
        from .train.run import TrainRequest, train

        req = TrainRequest(self._train_config(stage, steps), str(tokens or self.tokens), stage, str(runs or self.runs),
                           str(init_from) if init_from else None, str(self.ts))
        summary = train(req, self.resources.get("CPU", 1), log=self.log)
        self.log(f"{stage}: best valid/loss {summary['best_valid_loss']} at {summary['best_checkpoint']}")

    def _model_set_targets(self) -> dict[Path, Path]:
        """models/final: each stage's best checkpoint; models/early: each stage's first one; both with the
        token system."""
        from .generation.generate import resolve_checkpoint
        from .train.run import stage_checkpoints

        targets = {}
        for stage in STAGES:
            targets[self.models / "early" / stage] = stage_checkpoints(self.runs / stage)[0]
            targets[self.models / "final" / stage] = resolve_checkpoint(self.runs / stage)
        for name in ("early", "final"):
            targets[self.models / name / "token_system"] = self.ts
        return targets

    def _model_sets_done(self, targets: dict[Path, Path] | None = None) -> bool:
        return all(link.is_symlink() and link.resolve() == Path(target).resolve()
                   for link, target in (targets or self._model_set_targets()).items())

    def _model_sets(self, targets: dict[Path, Path] | None = None) -> None:
        for link, target in (targets or self._model_set_targets()).items():
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)

    # ------------------------------------------------------------------ generation and evaluation
    def _generate_settings(self, duration: float, guidance: float | None = None, top: int = 1):
        from .generation.generate import GenerateSettings

        g = self.s.guidance if guidance is None else guidance
        return GenerateSettings(duration=duration, num_samples=self.s.num_samples, top=top, seed=self.s.seed,
                                semantic_guidance=g, coarse_guidance=g, fine_guidance=g)

    def _eval_settings(self, guidance: float):
        """The evaluation's: every candidate kept, so that the prompt-following block can score those reranking did
        not choose (``generated_caption_match``)."""
        return self._generate_settings(self.s.eval_duration, guidance, top=self.s.num_samples)

    def _checkpoint_ids(self, model_set: str | Path) -> dict:
        """What reports made by ``models/<model_set>`` (or the model-set folder ``model_set``) must name to be
        current."""
        from .generation.generate import ModelSet, check_model_set, checkpoint_ids

        return checkpoint_ids(check_model_set(ModelSet.from_dir(self.models / model_set)))

    def _generated(self) -> bool:
        from .generation.batch import finished_report

        return (self.models / "final").exists() and finished_report(
            self.work / "generate", self.s.prompt, self._generate_settings(self.s.duration),
            self._checkpoint_ids("final")) is not None

    def _generate(self) -> None:
        from .generation.generate import ModelSet, MusicGenerator

        settings = self._generate_settings(self.s.duration)
        generator = MusicGenerator(ModelSet.from_dir(self.models / "final"), "cuda" if self.s.use_gpu else "cpu")
        report = generator.write(generator.generate(self.s.prompt, settings), settings, self.work / "generate")
        self.log(f"generate: {self.s.prompt!r}: scores {report['scores']}, real-time factor "
                 f"{report['timings']['real_time_factor']:.2f}")

    def _scales(self) -> list[float]:
        """The evaluation's guidance scales: unguided, and the pipeline's guidance when it has one."""
        return [1.0] if self.s.guidance == 1 else [1.0, self.s.guidance]

    def _eval_prompts(self) -> list[str]:
        """The evaluation's prompts: ``prompts``, else the captions of the token dataset's held-out tracks (whose
        stages never saw them), at most ``max_prompts``."""
        from .evaluation.evaluate import dataset_prompts

        return list(self.s.prompts) or [p.caption for p in dataset_prompts(str(self.tokens))][:self.s.max_prompts]

    def _eval_sets(self) -> dict[str, Path]:
        return {name: self.models / name for name in ("early", "final")}

    def _evaluated(self, out: Path | None = None, sets: dict[str, Path] | None = None,
                   prompts: list[str] | None = None) -> bool:
        """Whether ``out`` holds an evaluation of every model set of ``sets`` (name: folder) at every scale on
        every prompt, by the sets' current checkpoints (default: the pipeline's evaluation)."""
        from .evaluation.evaluate import guided_name
        from .generation.batch import finished_report, prompt_folder

        out = out or self.work / "evaluate"
        if not (out / "results.csv").exists() or not (out / "scores.png").exists():
            return False
        prompts = self._eval_prompts() if prompts is None else prompts
        for name, folder in (sets or self._eval_sets()).items():
            ids = self._checkpoint_ids(folder)
            for g in self._scales():
                settings = self._eval_settings(g)
                if any(finished_report(prompt_folder(out / guided_name(name, g), i, p), p, settings, ids) is None
                       for i, p in enumerate(prompts)):
                    return False
        return True

    def _evaluate(self, out: Path | None = None, sets: dict[str, Path] | None = None,
                  prompts: list[str] | None = None) -> None:
        from .evaluation.evaluate import evaluate
        from .generation.generate import ModelSet

        sets = {name: ModelSet.from_dir(folder) for name, folder in (sets or self._eval_sets()).items()}
        evaluate(self._eval_prompts() if prompts is None else prompts, sets,
                 self._eval_settings(1.0), out or self.work / "evaluate",
                 cluster_cpus=self.resources.get("CPU", 1),
                 cluster_gpus=self.resources.get("GPU", 0), actors=self.actors, gpus_per_actor=self.gpus_per_actor,
                 guidance_scales=self._scales(), log=self.log)

    # ------------------------------------------------------------------ does the music follow the prompt?
    def _prompt_following_done(self) -> bool:
        path = self.work / PROMPT_FOLLOWING
        return path.exists() and json.loads(path.read_text()).get("evaluation_sha256") == self._results_digest()

    def _results_digest(self, out: Path | None = None) -> str:
        import hashlib

        return hashlib.sha256(((out or self.work / "evaluate") / "results.csv").read_bytes()).hexdigest()

    @staticmethod
    def _candidate_files(row: dict) -> list[str]:
        """Every candidate the evaluation wrote for one row of results.csv (its prompt's report, beside the best)."""
        from .generation.generate import REPORT

        return json.loads((Path(row["best_file"]).parent / REPORT).read_text())["files"]

    def _caption_tracks(self) -> list:
        """The tracks the caption match scores: those fit-clap held out (the tuned CLAP never saw them), else the
        token dataset's held-out ones."""
        from .data.sources import open_source
        from .evaluation.evaluate import dataset_prompts
        from .tokens.clap_tuning import captioned

        report = self.ts / "fit_clap.report.json"
        tracks = captioned(open_source(self.corpus))
        if report.exists():
            held = set(json.loads(report.read_text())["held_out"])
            return [t for t in tracks if t.id in held]
        held = {Path(p.audio).resolve() for p in dataset_prompts(str(self.tokens))}
        return [t for t in tracks if Path(t.path).resolve() in held]

    def _prompt_following(self) -> None:
        """How well the music follows the prompt (``evaluation.prompt_following``): the CLAP judge on held-out
        real clips, what reranking and guidance buy in the evaluation, each stage's conditioning gains."""
        import csv

        from .audio.io import decode_audio
        from .evaluation import prompt_following as pf
        from .evaluation.evaluate import guided_name
        from .generation.generate import resolve_checkpoint
        from .tokens.system import TokenSystem

        system = TokenSystem.load(self.ts)
        tracks = self._caption_tracks()
        clips = [decode_audio(t.path, system.clap.sample_rate, max_seconds=10.0)[0] for t in tracks]
        captions = [t.caption for t in tracks]
        block = {"held_out_tracks": len(tracks),
                 "clap_caption_match": pf.caption_match(system, clips, captions, system.clap.sample_rate)}
        if self.s.tokens_from() == "audio":  # stages trained on caption tokens are prompted with their own kind
            block.update({f"caption_tokens_match/{name}": e for name, e in
                          pf.token_match(system, clips, captions, system.clap.sample_rate).items()})
        with (self.work / "evaluate" / "results.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        block["prompts"] = len({r["prompt"] for r in rows})
        # the same match on what the final set generated, as `generate` makes it (at the pipeline's guidance) and
        # unguided: each prompt's candidates (all of them: the best alone would count reranking's gain) against its
        # own prompt and the others'
        columns = {"generated_caption_match": guided_name("final", self.s.guidance)}
        if self.s.guidance != 1:
            columns["generated_caption_match_unguided"] = "final"
        for name, column in columns.items():
            done = [r for r in rows if r["model_set"] == column and r["best_file"]]
            if len(done) >= 2:
                generated = [[decode_audio(f, system.clap.sample_rate)[0] for f in self._candidate_files(r)]
                             for r in done]
                block[name] = pf.caption_match(system, generated, [r["prompt"] for r in done],
                                               system.clap.sample_rate)
        block.update(pf.from_results(rows, "final", guided_name("final", self.s.guidance)
                                     if self.s.guidance != 1 else None))
        if "guidance_vs_unguided" in block:
            block["guidance"] = self.s.guidance
        for stage in STAGES:
            gains = pf.conditioning_gains(resolve_checkpoint(self.runs / stage), self.tokens, stage,
                                          self.s.batch_size)
            block.update({f"{name}/{stage}": gain for name, gain in gains.items()})
        block["evaluation_sha256"] = self._results_digest()
        (self.work / PROMPT_FOLLOWING).write_text(json.dumps(block, indent=2) + "\n")
        clear = [name for name, e in block.items() if isinstance(e, dict) and e.get("clear")]
        self.log(f"prompt following: {len(clear)} difference(s) clearly positive ({', '.join(clear) or 'none'}); "
                 f"the block is in {self.work / PROMPT_FOLLOWING} and the closing lines")


    # ------------------------------------------------------------------ the seed's experiment: a genre shift
    def _shift_dir(self) -> Path:
        import re

        return self.work / ("shift-" + re.sub(r"[^a-z0-9]+", "-", self.s.shift_genre.lower()).strip("-"))

    def _genre_source(self):
        """The corpus' tracks of ``shift_genre`` (FMA metadata's genres_all), with their own captions."""
        from .data.sources import open_source

        source = open_source(self.corpus)
        try:
            ids = {t.id for t in open_source(self.corpus, kind="fma", genres=[self.s.shift_genre]).tracks}
        except (OSError, ValueError) as e:
            raise ConfigError(f"--shift-genre {self.s.shift_genre!r}: {e}") from e
        tracks = [t for t in source.tracks if t.id in ids]
        if not tracks:
            raise ConfigError(f"--shift-genre {self.s.shift_genre!r}: no track of {self.corpus} has that genre")
        return dataclasses.replace(source, tracks=tracks, settings={**source.settings, "genres": [self.s.shift_genre]})

    def _shift_sets(self) -> dict[str, Path]:
        return {"final": self.models / "final", "shifted": self._shift_dir() / "models" / "shifted"}

    def _shift_targets(self) -> dict[Path, Path]:
        """models/shifted: each stage's last fine-tuning checkpoint (where the fine-tuning ended), with the token
        system."""
        from .train.run import stage_checkpoints

        shifted = self._shift_sets()["shifted"]
        targets = {shifted / stage: stage_checkpoints(self._shift_dir() / "runs" / stage)[-1] for stage in STAGES}
        return {**targets, shifted / "token_system": self.ts}

    def _shift_prompts(self, genre) -> list[str]:
        """The held-out captions of tracks outside the genre (``genre``: ``_genre_source``; none of them in its
        fine-tuning set)."""
        from .evaluation.evaluate import dataset_prompts

        inside = {Path(t.path).resolve() for t in genre.tracks}
        outside = [p.caption for p in dataset_prompts(str(self.tokens)) if Path(p.audio).resolve() not in inside]
        if len(outside) < 2:
            raise ConfigError(f"--shift-genre {self.s.shift_genre!r}: {len(outside)} held-out track(s) outside the "
                              f"genre to prompt with; the comparison needs at least 2 (a larger corpus, or another "
                              f"genre)")
        return outside[:self.s.max_prompts]

    def _run_shift(self) -> None:
        """Fine-tune the final set on the genre's tracks (tokenized with the same token system; every stage from
        its final checkpoint) and evaluate final against shifted, unguided and guided, on prompts outside it."""
        d = self._shift_dir()
        tokens, runs, steps = d / "tokens", d / "runs", self.s.shift_steps or self.s.train_steps
        genre = self._genre_source()  # lists the corpus twice (its own kind and FMA's): once a run
        self.step("shift-preprocess", self._dataset_done(tokens),
                  lambda: self._preprocess(tokens, genre))
        for stage in STAGES:
            self.step(f"shift-train-{stage}", self._trained(stage, runs, steps),
                      lambda stage=stage: self._train(stage, tokens, runs, steps, self.models / "final" / stage))
        self.step("shift-model-set", self._model_sets_done(self._shift_targets()),
                  lambda: self._model_sets(self._shift_targets()))
        out, sets, prompts = d / "evaluate", self._shift_sets(), self._shift_prompts(genre)
        self.step("shift-evaluate", self._evaluated(out, sets, prompts), lambda: self._evaluate(out, sets, prompts))
        path = d / GENRE_SHIFT
        done = path.exists() and json.loads(path.read_text()).get("evaluation_sha256") == self._results_digest(out)
        self.step("genre-shift", done, self._genre_shift)

    def _genre_shift(self) -> None:
        import csv

        from .evaluation import prompt_following as pf
        from .evaluation.evaluate import guided_name

        d = self._shift_dir()
        with (d / "evaluate" / "results.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        counts = json.loads((d / "tokens" / "manifest.json").read_text())["counts"]
        block = {"genre": self.s.shift_genre, "tracks": counts["tracks"], "rows": counts["rows"],
                 "steps": self.s.shift_steps or self.s.train_steps, "prompts_outside": len({r["prompt"] for r in rows}),
                 **pf.genre_shift(rows, "final", "shifted", (lambda name: guided_name(name, self.s.guidance))
                                  if self.s.guidance != 1 else None)}
        if self.s.guidance != 1:
            block["guidance"] = self.s.guidance
        block["evaluation_sha256"] = self._results_digest(d / "evaluate")
        (d / GENRE_SHIFT).write_text(json.dumps(block, indent=2) + "\n")
        change = pf.summary_lines({"alignment_change": block["alignment_change"]})[0].strip()
        self.log(f"genre shift: fine-tuned on {counts['tracks'].get('train', 0)} {self.s.shift_genre} tracks; prompts "
                 f"outside it: {change}; the block is in {d / GENRE_SHIFT}")


__all__ = ["Pipeline", "PipelineSettings", "DEMO_PROMPT", "GENRE_SHIFT", "PROMPT_FOLLOWING"]
