"""musiclm init-token-system: create a token-system directory from a preset or a model config.

Encoders come from hub ids or local directories (--clap, --semantic-encoder, --encodec), or are built
offline with random weights (preset tiny). The RVQ and k-means start unfitted: run fit-rvq and fit-kmeans."""
from __future__ import annotations

import argparse

from jobs.common import add_clap_checkpoint_args, add_trust_pickle_arg, check_outputs, log, run, trusted_files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm init-token-system", description=__doc__)
    p.add_argument("--out", required=True, help="token-system directory to create")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    p.add_argument("--config", help="model config JSON (ours or open-musiclm's configs/model/*.json)")
    p.add_argument("--clap", help="CLAP weights: hub id or local directory (transformers ClapModel)")
    add_clap_checkpoint_args(p)
    p.add_argument("--semantic-encoder", help="semantic encoder weights: hub id or directory (e.g. m-a-p/MERT-v0)")
    p.add_argument("--encodec", help="EnCodec weights: hub id or directory (e.g. facebook/encodec_24khz)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override token-system settings, e.g. clap_rvq_cfg.hop_seconds=2")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny encoders' random weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing token system in --out")
    add_trust_pickle_arg(p, "a --clap-checkpoint that holds more than tensors")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_outputs(out=args.out)
    from musiclm.config import apply_overrides, load_model_config, model_preset
    from musiclm.tokens.system import TokenSystem

    model = load_model_config(args.config) if args.config else model_preset(args.preset)
    config = model.token_system()
    sources = {"clap_rvq_cfg.model_name": args.clap, "hubert_kmeans_cfg.model_name": args.semantic_encoder,
               "encodec_cfg.model_name": args.encodec}
    config = apply_overrides(config, {k: v for k, v in sources.items() if v})
    config = apply_overrides(config, args.set)
    system = TokenSystem.create(config, args.out, seed=args.seed, overwrite=args.overwrite,
                                clap_checkpoint=args.clap_checkpoint, clap_tokenizer=args.clap_tokenizer,
                                trust_pickle=trusted_files(args.trust_pickle,
                                                           clap_checkpoint=args.clap_checkpoint)["clap_checkpoint"])
    log(system.describe())


if __name__ == "__main__":
    run(main)
