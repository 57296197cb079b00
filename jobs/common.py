"""Shared argument helpers and the one place that connects to Ray."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def log(message: str) -> None:
    print(f"[musiclm] {message}", flush=True)


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (else $RAY_ADDRESS, else a local Ray started on 127.0.0.1)")
    g.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray (default: all)")
    g.add_argument("--actors", type=int, default=None, help="encoder actors (default: one per GPU, else per 4 CPUs)")
    g.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per encoder actor (default: 1 if any)")


def add_fit_args(parser: argparse.ArgumentParser, what: str) -> None:
    """Arguments shared by the jobs that fit one of the token system's quantizers."""
    parser.add_argument("--token-system", required=True, help="token-system directory (see init-token-system)")
    parser.add_argument("--audio", required=True, help="folder of audio files (searched recursively)")
    parser.add_argument("--max-tracks", type=int, default=None, help="use a random subset of this many files")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="use at most this much of each track")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help=f"re-fit {what} that is already fitted")


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
            ray.init(num_cpus=int(num_cpus) if num_cpus else None, include_dashboard=False,
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    log(f"Ray: {'cluster ' + address if address else 'local'}; resources CPU={resources.get('CPU', 0):g} "
        f"GPU={resources.get('GPU', 0):g}")
    return resources


def run(main) -> None:
    """Run a job's main, turning the project's user-facing errors into one clear line and exit status 2."""
    from musiclm.audio import AudioDecodeError
    from musiclm.config_io import ConfigError
    from musiclm.data.dataset import DatasetError
    from musiclm.tokens.encoders import EncoderLoadError
    from musiclm.tokens.system import TokenSystemError
    from musiclm.train.checkpoint import CheckpointError

    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: work already written is kept; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
    except (DatasetError, ConfigError, CheckpointError, TokenSystemError, EncoderLoadError, AudioDecodeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
