"""musiclm fit-codec: train the token system's EnCodec to reconstruct a corpus (waveform and multi-scale mel
losses, EMA codebooks kept in use) on Ray Train, and write its weights into the token system. For the offline
world, where the tiny EnCodec starts random (its encoder and codebooks are then re-initialized from the corpus
first: --init); real systems keep the pretrained one. Held-out reconstruction
(log-mel distance through codes) goes to TensorBoard before the first step and at every checkpoint; the same
command again resumes the run. Every token dataset made before must be made again (the fingerprint changes)."""
from __future__ import annotations

import argparse

from jobs.common import (add_ray_args, add_settings_args, add_source_args, add_tuning_args, connect, log,
                         open_source_of, quiet_progress, run, settings_of)


def parser() -> argparse.ArgumentParser:
    from musiclm.tokens.codec_training import CodecTrainConfig

    p = argparse.ArgumentParser(prog="musiclm fit-codec", description=__doc__)
    add_source_args(p)
    add_tuning_args(p, "EnCodec", "fit-codec")
    add_settings_args(p, CodecTrainConfig, "training (CodecTrainConfig; --init: auto re-initializes a codec whose "
                      "latents hardly move in time, data always, keep never)", {"init": ["auto", "data", "keep"]})
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.infra import storage
    from musiclm.tokens.codec_training import CodecTrainConfig, fit_codec
    from musiclm.tokens.system import read_meta, writable_root
    from musiclm.train.run import check_run_name

    check_run_name(args.run_name)
    read_meta(writable_root(args.token_system))  # a token system here, before Ray starts
    cfg = settings_of(CodecTrainConfig, args)
    source = open_source_of(args)
    resources = connect(args)
    quiet_progress()
    fit_codec(args.token_system, source, cfg, storage.join(storage.location(args.storage), args.run_name),
              resources.get("CPU", 1.0), log=log)


if __name__ == "__main__":
    run(main)
