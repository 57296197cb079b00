"""musiclm import-open-musiclm: turn open-musiclm's released files into a model set usable here.

    musiclm import-open-musiclm --config musiclm_large_small_context.json \
        --semantic semantic.transformer.14000.pt --coarse coarse.transformer.18000.pt \
        --fine fine.transformer.24000.pt --rvq clap.rvq.950_no_fusion.pt \
        --kmeans kmeans_10s_no_fusion.joblib --trust-pickle kmeans_10s_no_fusion.joblib \
        --clap-checkpoint 630k-audioset-best.pt --mert m-a-p/MERT-v0 --out models/open-musiclm

OUT gets token_system/, semantic/, coarse/, fine/ (use with generate --models OUT, evaluate, and
train --init-from OUT/<stage> --token-system OUT/token_system) and import.json. Runs locally, no Ray."""
from __future__ import annotations

import argparse

from jobs.common import add_clap_checkpoint_args, add_trust_pickle_arg, check_outputs, log, run, trusted_files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm import-open-musiclm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="open-musiclm model JSON (e.g. musiclm_large_small_context.json)")
    for stage in ("semantic", "coarse", "fine"):
        p.add_argument(f"--{stage}", help=f"open-musiclm {stage} transformer state dict (.pt)")
    p.add_argument("--rvq", required=True, help="open-musiclm CLAP RVQ state dict (clap.rvq.*.pt)")
    p.add_argument("--kmeans", required=True, help="k-means: open-musiclm's .joblib (needs --trust-pickle FILE), or its "
                                                   "centers as .npy / .safetensors")
    add_trust_pickle_arg(p, "the --kmeans .joblib, or a --clap-checkpoint that holds more than tensors")
    p.add_argument("--clap", help="CLAP in transformers format (hub id or folder); default: the config's")
    add_clap_checkpoint_args(p)
    p.add_argument("--mert", help="MERT/HuBERT in transformers format (hub id or folder); default: the config's")
    p.add_argument("--encodec", help="EnCodec in transformers format (hub id or folder); default: the config's")
    p.add_argument("--out", required=True, help="output folder (model set)")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_outputs(out=args.out)
    from musiclm.interop.open_musiclm import import_open_musiclm

    stages = {s: getattr(args, s) for s in ("semantic", "coarse", "fine") if getattr(args, s)}
    if not stages:
        raise ValueError("give at least one of --semantic, --coarse, --fine")
    trust = trusted_files(args.trust_pickle, kmeans=args.kmeans, clap_checkpoint=args.clap_checkpoint)
    import_open_musiclm(args.config, stages, args.rvq, args.kmeans, args.out, clap=args.clap, mert=args.mert,
                        encodec=args.encodec, clap_checkpoint=args.clap_checkpoint,
                        clap_tokenizer=args.clap_tokenizer, trust_kmeans_pickle=trust["kmeans"],
                        trust_clap_pickle=trust["clap_checkpoint"], overwrite=args.overwrite, log=log)


if __name__ == "__main__":
    run(main)
