"""The ``musiclm`` command: ``musiclm <verb> [options]``, one verb per module in ``jobs/``."""
from __future__ import annotations

import importlib
import sys

VERBS = {
    "synth": "write the synthetic music corpus",
    "init-token-system": "create a token-system directory (tiny offline encoders, or pretrained ones)",
    "fit-clap": "tune the token system's CLAP on captioned audio (Ray Train): text<->audio retrieval",
    "fit-codec": "train the token system's EnCodec to reconstruct a corpus (Ray Train): the offline world's codec",
    "fit-rvq": "fit the CLAP RVQ on a folder of audio (Ray Data)",
    "fit-kmeans": "fit the semantic k-means on a folder of audio (Ray Data)",
    "preprocess": "tokenize an audio corpus into a token dataset of Parquet shards (Ray Data)",
    "train": "train one stage on a token dataset (Ray Train + DeepSpeed ZeRO)",
    "tune": "sweep lr and more for one stage with Ray Tune (ASHA on valid/loss)",
    "generate": "text to music: N candidates through the three stages, best K by CLAP similarity",
    "evaluate": "compare model sets on a prompt set: CLAP score (best of N, random) and FAD (table and plot)",
    "watch-eval": "score a training run's checkpoints as music (CLAP score, FAD) into its TensorBoard",
    "import-open-musiclm": "convert open-musiclm's released checkpoints, RVQ and k-means into a model set",
    "check-clap-rvq": "which CLAP an RVQ was fitted on: its reconstruction error of each candidate's embeddings",
    "pipeline": "run every step end to end, skipping finished ones (make demo)",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        width = max(map(len, VERBS))
        print("usage: musiclm <verb> [options]   (musiclm <verb> --help for its options)\n\nverbs:")
        for verb, text in VERBS.items():
            print(f"  {verb:<{width}}  {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown verb {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    module = importlib.import_module(f"jobs.{argv[0].replace('-', '_')}")
    from jobs.common import run

    run(lambda: module.main(argv[1:]))


if __name__ == "__main__":
    main()
