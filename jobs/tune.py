"""musiclm tune: the same as ``python -m tune.sweep`` (Ray Tune sweeps over the train function)."""
from __future__ import annotations

from jobs.common import run


def main(argv: list[str] | None = None) -> None:
    from tune.sweep import main as sweep

    sweep(argv)


if __name__ == "__main__":
    run(main)
