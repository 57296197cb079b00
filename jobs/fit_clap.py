"""musiclm fit-clap: tune the token system's CLAP on captioned audio (contrastive, both towers or one) on Ray
Train, and write the tuned weights into the token system. Held-out text<->audio retrieval (recall@1/@5) goes to
TensorBoard before the first step and at every checkpoint; the same command again resumes the run. A token
system whose RVQ is fitted is refused unless --overwrite (the RVQ is then dropped: re-fit it and re-make the token
datasets)."""
from __future__ import annotations

import argparse

from jobs.common import (add_ray_args, add_settings_args, add_source_args, add_tuning_args, connect, log,
                         open_source_of, quiet_progress, run, settings_of)


def parser() -> argparse.ArgumentParser:
    from musiclm.tokens.clap_tuning import ClapTuneConfig

    p = argparse.ArgumentParser(prog="musiclm fit-clap", description=__doc__)
    add_source_args(p)
    add_tuning_args(p, "CLAP", "fit-clap")
    p.add_argument("--overwrite", action="store_true", help="tune even though the RVQ is fitted (it is dropped)")
    add_settings_args(p, ClapTuneConfig, "tuning (ClapTuneConfig; --train: the towers that learn, the other frozen)",
                      {"train": ["both", "audio", "text"]})
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.infra import storage
    from musiclm.tokens.clap_tuning import ClapTuneConfig, fit_clap, refuse_tuning
    from musiclm.train.run import check_run_name

    check_run_name(args.run_name)
    refuse_tuning(args.token_system, args.overwrite)  # before Ray starts
    cfg = settings_of(ClapTuneConfig, args)
    source = open_source_of(args)
    resources = connect(args)
    quiet_progress()
    fit_clap(args.token_system, source, cfg, storage.join(storage.location(args.storage), args.run_name),
             resources.get("CPU", 1.0), overwrite=args.overwrite, log=log)


if __name__ == "__main__":
    run(main)
