"""Shared argument helpers and the one place that connects to Ray."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path


DEFAULT_WAIT_S = 900.0  # a cloud GPU node takes minutes to boot and join


def log(message: str) -> None:
    print(f"[musiclm] {message}", flush=True)


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (else $RAY_ADDRESS, else a local Ray started on 127.0.0.1)")
    g.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray (default: all)")
    g.add_argument("--actors", type=int, default=None, help="encoder actors (default: one per GPU, else per 4 CPUs)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per encoder actor (default: 1 if the cluster has any). Asked for, the job waits for "
                        "the autoscaler to add them (--wait-for-nodes)")
    g.add_argument("--wait-for-nodes", type=float, default=None, metavar="SECONDS",
                   help=f"how long to wait for GPUs the job was asked for (--gpus-per-actor, --use-gpu) to join the "
                        f"cluster (default: {DEFAULT_WAIT_S:.0f} on a cluster, 0 on a local Ray)")


def add_clap_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    from musiclm.interop.laion_clap import TOKENIZER

    parser.add_argument("--clap-checkpoint", metavar="FILE.pt",
                        help="laion_clap checkpoint (open-musiclm's 630k-audioset-best.pt), converted to transformers' "
                             "CLAP and stored in the token system; replaces --clap")
    parser.add_argument("--clap-tokenizer", default=TOKENIZER,
                        help=f"RoBERTa tokenizer for --clap-checkpoint: hub id or folder (default: {TOKENIZER}, "
                             "laion_clap's)")


def add_trust_pickle_arg(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument("--trust-pickle", action="append", default=[], metavar="FILE",
                        help=f"read FILE ({which}) as a full Python pickle: loading a pickle runs code stored in the "
                             f"file, so name only files from a source you trust; repeat for each such file. Every "
                             f"other file is read weights-only")


def trusted_files(trust: list[str], **files: str | None) -> dict[str, bool]:
    """For each of a command's input ``files`` (option name -> path), whether ``--trust-pickle`` names it. Trust is
    per file: naming the k-means file does not let a CLAP checkpoint given beside it run code. A ``--trust-pickle``
    that names none of them is refused (a typo would otherwise trust nothing and fail later, far from the cause)."""
    given = {name: Path(path).resolve() for name, path in files.items() if path}
    out = {name: False for name in files}
    for path in trust:
        names = [name for name, p in given.items() if p == Path(path).resolve()]
        if not names:
            options = ", ".join(f"--{n.replace('_', '-')} {files[n]}" for n in given) or "none given"
            raise ValueError(f"--trust-pickle {path} names none of this command's files ({options}); name the "
                             f"file to read as a pickle")
        out.update(dict.fromkeys(names, True))
    return out


_OUTPUTS: dict[str, str] = {}  # the running job's output options (check_outputs), for errors that name no file


def check_outputs(**locations: str | None) -> None:
    """Refuse, before any work, output options (name -> location) that cannot be folders: a file given as --out
    failed after the work was done (import-open-musiclm after converting everything, generate after every prompt).
    The locations are kept to name in an error whose cause names no file (a write to a full disk)."""
    from musiclm.infra import storage

    for name, loc in locations.items():
        if loc:
            option = f"--{name.replace('_', '-')}"
            storage.check_folder(loc, option)
            _OUTPUTS[option] = str(loc)


def add_fit_args(parser: argparse.ArgumentParser, what: str) -> None:
    """Arguments shared by the jobs that fit one of the token system's quantizers."""
    parser.add_argument("--token-system", required=True, help="token-system directory (see init-token-system)")
    parser.add_argument("--audio", required=True, help="folder of audio files (searched recursively)")
    parser.add_argument("--max-tracks", type=int, default=None, help="use a random subset of this many files")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="use at most this much of each track")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help=f"re-fit {what} that is already fitted")


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """The audio source of preprocess and fit-clap: FMA, the synthetic set, or a folder with captions."""
    g = parser.add_argument_group("source")
    g.add_argument("--source", required=True, help="audio folder (FMA audio folder, synthetic set, any folder)")
    g.add_argument("--source-kind", default="auto", choices=["auto", "fma", "folder", "synth"])
    g.add_argument("--captions", help="captions file for a folder source: JSONL or CSV with path|id and caption")
    g.add_argument("--metadata", help="FMA metadata folder with tracks.csv and genres.csv "
                                      "(default: fma_metadata beside the audio folder)")
    g.add_argument("--subset", choices=["small", "medium", "large"], help="FMA: keep this subset's tracks")
    g.add_argument("--genre", action="append", default=[], help="FMA: keep tracks of this genre (id or title; "
                                                                 "repeatable)")
    g.add_argument("--min-duration", type=float, help="FMA: keep tracks whose metadata duration is at least this")
    g.add_argument("--filter-fma", action="store_true",
                   help="FMA: open-musiclm's rule, drop Experimental tracks with <= 1000 listens or <= 5 favorites")


def open_source_of(args: argparse.Namespace):
    """The ``data.sources.Source`` of ``add_source_args``' arguments, described in the log."""
    from musiclm.data.sources import open_source

    source = open_source(args.source, args.source_kind, captions=args.captions, metadata=args.metadata,
                         subset=args.subset, genres=args.genre, min_duration=args.min_duration,
                         filter_fma=args.filter_fma)
    log(source.describe())
    return source


def add_tuning_args(parser: argparse.ArgumentParser, what: str, run_name: str) -> None:
    """The options of a job that trains one of a token system's encoders in place (fit-clap, fit-codec)."""
    parser.add_argument("--token-system", required=True, help=f"token-system folder whose {what} is trained (in place)")
    parser.add_argument("--run-name", default=run_name, help="the run's folder under --storage (resumed if it exists)")
    parser.add_argument("--storage", default="runs", help="folder or object-store URI that holds runs")


def add_settings_args(parser: argparse.ArgumentParser, cls, title: str, choices: dict | None = None) -> None:
    """One option per field of the settings dataclass ``cls`` (``--batch-size`` for ``batch_size``), its default
    the field's; ``settings_of`` builds the dataclass back (its checks then run)."""
    import dataclasses

    g = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            g.add_argument(flag, type=type(f.default), default=f.default, choices=(choices or {}).get(f.name),
                           help=f"(default {f.default})")


def settings_of(cls, args: argparse.Namespace):
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the jobs that train a stage (train, tune): what to train, on what, starting where."""
    parser.add_argument("--stage", required=True, choices=["semantic", "coarse", "fine"])
    parser.add_argument("--data", required=True, help="token dataset directory (from musiclm preprocess)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    parser.add_argument("--config", help="Config JSON: ours, a sweep's best.json, or open-musiclm's model JSON")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--num-workers", metavar="N|MIN:MAX",
                        help="training workers per run (train.num_workers); MIN:MAX for an elastic run: it starts "
                             "once MIN fit, grows to MAX as resources come and shrinks when a node is lost")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--use-gpu", action="store_true", help="one GPU per worker (train.use_gpu=true); the job "
                                                               "waits for the autoscaler when the cluster has none")
    device.add_argument("--cpu", action="store_true", help="train on CPUs even when the cluster has GPUs "
                                                           "(default, train.use_gpu=auto: GPUs when it has them)")
    parser.add_argument("--init-from", help="stage checkpoint to start from (fine-tuning), or a sweep's best.json")
    parser.add_argument("--token-system", help="token system to check against and to decode audio samples with "
                                               "(default: the dataset's, when it exists here)")


def stage_args_config(args: argparse.Namespace):
    """(Config, init-from checkpoint) from the arguments of ``add_stage_args``."""
    from musiclm.config import stage_config

    overrides = list(args.set)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("train.use_gpu=true")
    if getattr(args, "cpu", False):
        overrides.append("train.use_gpu=false")
    init_from = args.init_from
    if init_from and init_from.endswith(".json"):  # a sweep's best.json names its checkpoint
        from musiclm.infra import storage

        init_from = storage.read_json(init_from).get("checkpoint")
        if not init_from:
            raise ValueError(f"{args.init_from} names no checkpoint")
    cfg = stage_config(args.stage, args.preset, args.config, overrides)
    if getattr(args, "data", None):  # the token layout the dataset was made with, unless the user gave one
        from musiclm.config import given_settings
        from musiclm.data.shards import open_manifest
        from musiclm.train.run import adopt_token_layout

        cfg, taken = adopt_token_layout(cfg, open_manifest(args.data), given_settings(args.config, overrides))
        if taken:
            log(f"token layout of {args.data}: {', '.join(f'{k}={v}' for k, v in taken.items())}")
    return cfg, init_from


def connect(args: argparse.Namespace) -> dict:
    """Connect to the cluster named by --address / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1.
    Returns the cluster's resources."""
    import ray

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            num_cpus = getattr(args, "num_cpus", None)
            # The dashboard (on 127.0.0.1) serves the State API, which Ray Train's placement-group cleaner
            # needs: without it the workers' reservations of finished Tune trials are never released.
            ray.init(num_cpus=int(num_cpus) if num_cpus else None, include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                     runtime_env={"worker_process_setup_hook": "jobs.common.setup_worker"})
    # Ray Data logs three INFO lines per dataset it runs (start, execution plan, finished: "Full logs are in
    # /tmp/ray/..."), which buried the jobs' own lines; its warnings and errors still show
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    resources = ray.cluster_resources()
    log(f"Ray: {'cluster ' + address if address else 'local'}; resources CPU={resources.get('CPU', 0):g} "
        f"GPU={resources.get('GPU', 0):g}")
    return resources


def quiet_progress() -> None:
    """Ray Data's progress bars only on a terminal: in a job's log (``ray job logs``, a file) they buried its lines."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()


def setup_worker() -> None:
    """Runs in every worker process of the local Ray a job starts (``worker_process_setup_hook``).

    It names this Ray as the one the State API talks to: Ray Train's placement-group cleaner looks its cluster up
    that way, and with another Ray on the machine (another job, a test session) it found two and printed a 'Found
    multiple active Ray instances' traceback for every run, its cleaning undone. And it quiets Ray Data's three INFO
    lines per dataset execution in the actors that run them, as ``connect`` does in the driver: a Ray Train job
    that streams a dataset (fit-clap) printed them at every epoch from its split coordinator; and its warning that
    progress bars are off (which the driver turned off on purpose), once from every such coordinator."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def wait_seconds(args: argparse.Namespace) -> float:
    """--wait-for-nodes, else 15 min on a cluster and 0 on a local Ray (nothing adds nodes to it)."""
    if getattr(args, "wait_for_nodes", None) is not None:
        return max(0.0, args.wait_for_nodes)
    return DEFAULT_WAIT_S if (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")) else 0.0


def gpu_resources(args: argparse.Namespace, resources: dict, what: str, bundles: list[dict] | None = None) -> dict:
    """The cluster's resources once the GPUs the user asked for are there (``bundles``, else one per
    ``--actors`` of ``--gpus-per-actor``): asks the autoscaler and waits (``infra.raycompute.wait_for``). Without a
    request for GPUs, says so when the job will run on CPUs."""
    from musiclm.infra.raycompute import cpu_fallback_note, wait_for

    if bundles is None and getattr(args, "gpus_per_actor", None):
        bundles = [{"CPU": 1.0, "GPU": args.gpus_per_actor} for _ in range(getattr(args, "actors", None) or 1)]
    if bundles:
        return wait_for(bundles, what, wait_seconds(args), log)
    note = cpu_fallback_note(resources, asked_for_gpus=False)
    if note:
        log(note)
    return resources


def actor_plan(args: argparse.Namespace, resources: dict, what: str):
    """The encoder-actor plan of a Ray Data job (preprocess, fits), after waiting for GPUs asked for."""
    from musiclm.infra.raycompute import plan_actors

    return plan_actors(gpu_resources(args, resources, what), args.actors, args.gpus_per_actor)


def _os_error(e: OSError) -> str:
    """An OSError as one line that names the file and what to do (a full disk, a read-only folder, ...)."""
    import errno

    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    reason = e.strerror or str(e)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EACCES: "make it writable, or choose another output location",
            errno.EROFS: "choose an output location on a writable file system",
            errno.EPERM: "make it writable, or choose another output location",
            errno.ENOTDIR: "a file stands where a folder is needed: choose another location",
            errno.EEXIST: "a file stands where a folder is needed: choose another location",
            errno.EISDIR: "a folder stands where a file is needed: choose another location"}.get(e.errno)
    hint = f"; {hint}" if hint else ""
    if not where and _OUTPUTS:  # a failed write names no file: name where this job writes
        where = " " + " and ".join(f"{option} {loc}" for option, loc in _OUTPUTS.items())
    return (f"cannot use{where}: {reason}{hint}. What was written before is kept: run the same command again once "
            f"this is fixed" if where else f"{e}{hint}")


def _named_in_ray_error(e: Exception, named: tuple[type, ...]) -> str | None:
    """The message of one of the project's named errors raised inside a Ray actor or task that Ray reports as its
    own error (an actor whose constructor failed arrives as ``ActorDiedError`` with the cause only as text)."""
    import re

    try:
        from ray.exceptions import RayError
    except ImportError:
        return None
    if not isinstance(e, RayError):
        return None
    names = "|".join(cls.__name__ for cls in named)
    found = re.findall(rf"^(?:[\w.]+\.)?({names}|{OS_ERRORS}): (.+)$", str(e), flags=re.MULTILINE)
    if not found:
        return None
    kind, message = found[-1]
    if re.fullmatch(OS_ERRORS, kind):  # an OSError in a worker: "[Errno 28] No space left on device: 'file'"
        match = re.match(r"\[Errno (\d+)\] ([^:]+)(?:: '(.*)')?", message)
        if match:
            return _os_error(OSError(int(match.group(1)), match.group(2), match.group(3)))
    return message.strip()


OS_ERRORS = r"OSError|PermissionError|IsADirectoryError|NotADirectoryError|FileExistsError"


def _os_error_in_text(e: Exception) -> str | None:
    """A library's own error around a failed system call ("I/O error: File too large (os error 27)": safetensors'
    writer under transformers' save_pretrained) as the OSError it stands for."""
    import re

    match = re.search(r"\(os error (\d+)\)", str(e))
    return _os_error(OSError(int(match.group(1)), os.strerror(int(match.group(1))))) if match else None


def run(main) -> None:
    """Run a job's main, turning the project's user-facing errors into one clear line and exit status 2: its named
    errors (also when a Ray actor or task raised them), bad values, missing or unwritable files and full disks."""
    from musiclm.audio.io import AudioDecodeError
    from musiclm.config_io import ConfigError
    from musiclm.data.dataset import DatasetError
    from musiclm.infra.raycompute import ResourceWaitTimeout
    from musiclm.infra.storage import StorageError
    from musiclm.tokens.encoders import EncoderLoadError
    from musiclm.tokens.system import TokenSystemError
    from musiclm.train.checkpoint import CheckpointError
    from musiclm.train.run import TrainingDiverged

    named = (DatasetError, ConfigError, CheckpointError, TokenSystemError, EncoderLoadError, AudioDecodeError,
             StorageError, ResourceWaitTimeout, TrainingDiverged)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: work already written is kept; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
    except (*named, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        message = _named_in_ray_error(e, named) or _os_error_in_text(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """Sampling settings shared by generate and evaluate (``musiclm.generation.generate.GenerateSettings``)."""
    from musiclm.generation.generate import DECODING, WEIGHT_DTYPES, GenerateSettings

    d = GenerateSettings()
    g = parser.add_argument_group("sampling")
    g.add_argument("--duration", type=float, default=d.duration, help="seconds of audio per candidate")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="candidates ranked by CLAP similarity (N)")
    g.add_argument("--top", type=int, default=d.top, help="best candidates written as WAV (K)")
    g.add_argument("--seed", type=int, default=d.seed)
    for stage in ("semantic", "coarse", "fine"):
        g.add_argument(f"--{stage}-temperature", type=float, default=getattr(d, f"{stage}_temperature"))
        g.add_argument(f"--{stage}-step", type=float, default=getattr(d, f"{stage}_step"),
                       help=f"{stage} sliding-window step, as a fraction of its window")
    g.add_argument("--top-fraction", type=float, default=d.top_fraction,
                   help="sample among this fraction of the most likely tokens")
    g.add_argument("--guidance-scale", type=parse_guidance, default=None, metavar="G | STAGE=G,...",
                   help="classifier-free guidance: every stage's (3), or per stage (semantic=3,coarse=3); 1 = none "
                        "(the default). Needs stages trained with conditioning dropout (train.cond_drop_prob)")
    g.add_argument("--coarse-only", action="store_true", help="decode the coarse tokens alone (skip the fine stage)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="candidates sampled together (0: all)")
    g.add_argument("--window-batch", type=int, default=d.window_batch,
                   help="windows that do not overlap (the fine stage's) sampled together, at most (1: one after the "
                        "other; a seed then draws other tokens)")
    g.add_argument("--weights-dtype", default=d.weights_dtype, choices=WEIGHT_DTYPES,
                   help="stage weights while sampling: auto = bfloat16 on a GPU that supports it, else float32; "
                        "float32 reproduces the reference sampler's tokens")
    g.add_argument("--decoding", default=d.decoding, choices=DECODING,
                   help="token-by-token decoding: compiled (static cache, the step compiled: CUDA graphs on a GPU), "
                        "static (cache allocated once), dynamic (cache grows per token); auto = compiled on a GPU, "
                        "static on a CPU. All draw the same tokens in float32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--token-system", help="token system (default: the model set's token_system/)")


def parse_guidance(text: str) -> dict[str, float]:
    """``--guidance-scale``: one number for every stage, or ``stage=number`` pairs (the others stay at 1)."""
    stages = ("semantic", "coarse", "fine")
    try:
        if "=" not in text:
            return {s: float(text) for s in stages}
        pairs = dict(part.split("=", 1) for part in text.split(","))
        unknown = set(pairs) - set(stages)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown stage {sorted(unknown)[0]!r} (semantic, coarse, fine)")
        return {s: float(v) for s, v in pairs.items()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number (3) or stage=number pairs (semantic=3,coarse=2)")


def generate_settings(args: argparse.Namespace):
    import dataclasses

    from musiclm.generation.generate import GenerateSettings

    keys = [f.name for f in dataclasses.fields(GenerateSettings)]
    given = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    for stage, g in (getattr(args, "guidance_scale", None) or {}).items():
        given[f"{stage}_guidance"] = g
    return GenerateSettings(**given)


def add_prompt_set_args(parser: argparse.ArgumentParser) -> None:
    """Where evaluation prompts and FAD reference audio come from (evaluate, watch-eval, tune --rank-by eval/)."""
    g = parser.add_argument_group("prompts and reference audio")
    g.add_argument("--prompts", help="file of prompts (one per line), a JSON list, or a MusicCaps-style CSV (ytid, "
                                     "start_s, end_s, caption); default: the --reference-dataset's captions")
    g.add_argument("--reference-audio", help="folder of reference clips for FAD (with a CSV: named by ytid)")
    g.add_argument("--reference-dataset", metavar="TOKEN_DATASET",
                   help="a token dataset whose valid split gives the prompts (its captions) and the FAD reference "
                        "(the source audio of each track's first clip; the source files must be readable)")
    g.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts only")


def prompt_set(args: argparse.Namespace):
    """(prompts, reference clips or None) from ``add_prompt_set_args``' arguments; a --reference-audio folder is
    matched to the prompts inside ``evaluate``."""
    from musiclm.evaluation.evaluate import dataset_prompts, prompt_clips, read_prompt_set

    if args.reference_audio and args.reference_dataset:
        raise ValueError("give --reference-audio or --reference-dataset, not both")
    if not args.prompts and not args.reference_dataset:
        raise ValueError("give --prompts, or --reference-dataset to take the prompts from a token dataset")
    from_data = dataset_prompts(args.reference_dataset) if args.reference_dataset else None
    prompts = (read_prompt_set(args.prompts) if args.prompts else from_data)[:args.max_prompts]
    # FAD's reference: every valid track, however many prompts are generated (more samples, less bias)
    return prompts, prompt_clips(from_data) if from_data else None


def add_eval_actor_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """What the evaluation actor reserves (watch-eval, train --eval-models)."""
    g = parser.add_argument_group("evaluation actor")
    g.add_argument(f"--{prefix}eval-cpus", dest="eval_cpus", type=float, default=None,
                   help="CPUs the evaluation actor reserves (default: 1 when the cluster has one left over after "
                        "training's, else 0: it shares cores instead of waiting for training to finish)")
    g.add_argument(f"--{prefix}eval-gpus", dest="eval_gpus", type=float, default=0.0,
                   help="GPUs (or a fraction) the evaluation actor reserves; default 0 (training holds whole GPUs)")


def eval_actor_resources(args: argparse.Namespace, resources: dict, reserved_cpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) of the evaluation actor: as asked, else one CPU when ``reserved_cpus`` (training's workers
    and its data pipeline) leave one free, else none, so that evaluation never holds what training waits for."""
    gpus = float(args.eval_gpus or 0.0)
    if args.eval_cpus is not None:
        return float(args.eval_cpus), gpus
    free = float(resources.get("CPU", 0)) - reserved_cpus
    cpus = 1.0 if free >= 1.0 else 0.0
    if not cpus:
        log("evaluation actor: training reserves every CPU, so it reserves none and shares cores (--eval-cpus to "
            "change)")
    return cpus, gpus


def training_gpu_resources(args: argparse.Namespace, resources: dict, cfg, what: str) -> dict:
    """The cluster's resources once one GPU per training worker is there (asked of the autoscaler and waited
    for when the cluster lacks them; an elastic run's MIN); unchanged when training runs on CPUs."""
    if not cfg.train.use_gpu:
        return resources
    return gpu_resources(args, resources, what, [{"CPU": 1.0, "GPU": 1.0}] * cfg.train.min_workers)


def add_eval_args(parser: argparse.ArgumentParser, title: str) -> None:
    """Scoring checkpoints as music from a training job (train --eval-models, tune --rank-by eval/...)."""
    g = parser.add_argument_group(title + "; prompts: the first 8 captions of --data's valid split unless "
                                          "--prompts / --reference-* / --max-prompts say otherwise")
    g.add_argument("--eval-models", help="model set giving the other stages and the token system: each checkpoint "
                                         "scored takes its stage's place (eval/clap_score, eval/fad_*)")
    g.add_argument("--eval-duration", type=float, default=5.0, help="seconds generated per candidate")
    g.add_argument("--eval-num-samples", type=int, default=2, help="candidates per prompt (best of N)")
    add_prompt_set_args(parser)
    add_eval_actor_args(parser)


@dataclasses.dataclass
class EvalInputs:
    models: object  # musiclm.generation.generate.ModelSet
    prompts: list
    references: list | None
    settings: object  # musiclm.generation.generate.GenerateSettings
    cpus: float
    gpus: float


def eval_inputs(args: argparse.Namespace, resources: dict, reserved_cpus: float) -> EvalInputs:
    """What ``add_eval_args`` asked for: the model set, prompts (by default the first 8 captions of --data's
    valid split, with all its tracks as FAD reference), settings and the actor's resources."""
    from musiclm.generation.generate import GenerateSettings, ModelSet

    if not args.prompts and not args.reference_dataset and not args.reference_audio:
        args.reference_dataset = args.data
    if args.max_prompts is None:
        args.max_prompts = 8  # every checkpoint scored generates them all: keep it a sample
    prompts, references = prompt_set(args)
    cpus, gpus = eval_actor_resources(args, resources, reserved_cpus)
    return EvalInputs(ModelSet.from_dir(args.eval_models, args.token_system), prompts, references,
                      GenerateSettings(duration=args.eval_duration, num_samples=args.eval_num_samples), cpus, gpus)
