"""musiclm preprocess: tokenize an audio corpus into a token dataset (Parquet shards + manifest) on Ray Data.

Sources: FMA (audio folder + fma_metadata), a plain folder with an optional captions file, or the synthetic
set. Re-running the same command resumes an interrupted run and does nothing once every track is done.
Row settings (DataConfig): clip_seconds, crops, min_seconds, pad_to_seconds, valid_frac, seed, rows_per_shard,
clap_from (audio: the stages' CLAP tokens from each window's audio, MusicLM's way; caption: from the track's
caption); set them with --set KEY=VALUE or the data section of a --config JSON."""
from __future__ import annotations

import argparse

from jobs.common import (actor_plan, add_ray_args, add_source_args, check_outputs, connect, log, open_source_of,
                         quiet_progress, run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm preprocess", description=__doc__)
    add_source_args(p)
    p.add_argument("--token-system", required=True, help="fitted token-system folder or object-store URI")
    p.add_argument("--out", required=True, help="token dataset folder or object-store URI, e.g. s3://bucket/datasets/fma (created, or resumed)")
    p.add_argument("--config", help="Config JSON whose data section gives the row settings")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override row settings, e.g. clip_seconds=20 crops=3 valid_frac=0.1")
    p.add_argument("--retry-errors", action="store_true", help="try the tracks of the errors table again")
    p.add_argument("--threads-per-actor", type=int, default=None, help="torch threads in each tokenizer actor")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_outputs(out=args.out)
    import dataclasses

    from musiclm.config import DataConfig, apply_overrides, load_config
    from musiclm.data.preprocess import finish, prepare
    from musiclm.data.preprocess import run as run_preprocess
    from musiclm.infra import storage

    cfg = load_config(args.config).data if args.config else DataConfig()
    cfg = apply_overrides(cfg, args.set)
    source = open_source_of(args)
    if not source.tracks:
        raise FileNotFoundError(f"no tracks to tokenize in {source.root} (after filters)")
    job = prepare(source, args.token_system, args.out, cfg, retry_errors=args.retry_errors, log=log)
    if not job.pending:
        log(f"nothing to do: all {len(source.tracks)} tracks of {source.root} are already in {job.out} "
            f"({job.scan.counts()['errors']} of them as errors; --retry-errors tries those again)")
        if job.status != "complete":  # a run that stopped after its last shard: record that it is done
            finish(job, None, log)
        return
    plan = actor_plan(args, connect(args), "the tokenizer actors")
    quiet_progress()
    if args.threads_per_actor:
        plan = dataclasses.replace(plan, threads_per_actor=args.threads_per_actor)
    summary = run_preprocess(job, plan, log=log)
    storage.write_json(storage.join(job.out, "last_run.json"), summary)


if __name__ == "__main__":
    run(main)
