"""musiclm check-clap-rvq: which CLAP an RVQ belongs to, measured.

open-musiclm's RVQ file does not say which CLAP's embeddings it was fitted on; its model JSONs name no CLAP file
(so laion_clap's default, 630k-audioset-best.pt, HTSAT-tiny), while its download script fetches a music CLAP
(HTSAT-base). Embed a few clips with each candidate and see which one the RVQ reconstructs:

    musiclm check-clap-rvq --rvq clap.rvq.950_no_fusion.pt --audio some_music/ \\
        --candidate 630k=630k-audioset-best.pt --candidate music=music_speech_audioset_epoch_15_esc_89.98.pt

Each candidate is a laion_clap .pt (read weights-only; --trust-pickle FILE for a full pickle) or a transformers-format
CLAP (folder or hub id). Prints each one's mean relative residual |e - RVQ(e)| / |e| over the clips' first 10 s;
the lowest, by a wide margin, is the RVQ's CLAP. Runs locally, no Ray."""
from __future__ import annotations

import argparse
import json

from jobs.common import add_trust_pickle_arg, log, run, trusted_files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm check-clap-rvq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rvq", required=True, help="the RVQ (open-musiclm's clap.rvq.*.pt)")
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=CLAP",
                   help="a candidate CLAP: laion_clap .pt, or transformers folder / hub id (repeat for each)")
    p.add_argument("--audio", required=True, help="folder of music (searched recursively)")
    p.add_argument("--max-clips", type=int, default=16, help="files used (the first, sorted), 10 s of each")
    add_trust_pickle_arg(p, "a candidate .pt that holds more than tensors")
    p.add_argument("--json", help="also write the residuals to this JSON file")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from musiclm.audio.io import list_audio_files
    from musiclm.interop.open_musiclm import clap_rvq_residuals

    candidates = {}
    for item in args.candidate:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--candidate {item!r}: give NAME=CLAP, e.g. 630k=630k-audioset-best.pt")
        candidates[name] = source
    files = list_audio_files(args.audio)[: args.max_clips]
    if not files:
        raise ValueError(f"no audio files under {args.audio}")
    trust = trusted_files(args.trust_pickle, **candidates)
    residuals = clap_rvq_residuals(args.rvq, candidates, files, trusted={n for n, t in trust.items() if t}, log=log)
    ranked = sorted((r, n) for n, r in residuals.items() if r is not None)
    if ranked:
        best = ranked[0]
        others = ", ".join(f"{n} {r:.4f}" for r, n in ranked[1:])
        log(f"the RVQ fits {best[1]} best: residual {best[0]:.4f}" + (f" (against {others})" if others else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(residuals, f, indent=2)
    return residuals


if __name__ == "__main__":
    run(main)
