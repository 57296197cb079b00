"""What an elastic training run's resizes cost, on a local multi-node cluster (cluster/local.py).

A `train --num-workers 2:3` run of the tiny coarse stage on three 1-CPU nodes: it starts with 3 workers; once it has
saved a checkpoint with them, a worker node is lost (`cluster/local.py lose-node`: SIGKILL of its raylet); once it
has saved one with 2, a node is added (`add-node`). Prints a timeline of the driver's output (seconds since the
submission) and, for each fault, how long the run had no workers training: from the fault to the next
"resumed at step" line, with how many steps were done again. The same scenario is tests/test_cluster.py's elastic
test; this script is its clock.
    python benchmarks/elastic.py [--steps 40 --resize-interval 2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from train_step import make_dataset  # the train-step benchmark's small token dataset

REPO = Path(__file__).resolve().parents[1]
PORTS = ["--port", "6397", "--dashboard-port", "8297"]


def local(*args: str) -> str:
    return subprocess.run([sys.executable, str(REPO / "cluster" / "local.py"), *args, *PORTS], capture_output=True,
                          text=True, check=True, timeout=180).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--resize-interval", type=float, default=2.0, help="train.resize_interval_s")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from musiclm.train.loop import read_train_state
    from musiclm.evaluation.watch import ready_checkpoints

    work = Path(tempfile.mkdtemp(prefix="musiclm-elastic-"))
    data = make_dataset(work, tracks=6)
    local("start", "--workers", "2", "--cpus-per-node", "1")
    runs = work / "runs"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ADDRESS="127.0.0.1:6397",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    start = time.time()
    lines: list[tuple[float, str]] = []
    driver = subprocess.Popen(
        [sys.executable, "-u", "-m", "jobs.train", "--stage", "coarse", "--data", str(data), "--run-name", "elastic",
         "--storage", str(runs), "--num-workers", "2:3", "--cpu", "--set", f"train.num_train_steps={args.steps}",
         "train.batch_size=1", "train.grad_accum_every=2", "train.save_model_every=4", "train.save_results_every=4",
         "train.log_every=2", "train.valid_batches=1", "train.lr_warmup=40", "train.keep_best=100",
         f"train.resize_interval_s={args.resize_interval}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)

    def read() -> None:
        for line in driver.stdout:
            lines.append((time.time() - start, re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip())))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def sizes() -> list[int]:
        return [read_train_state(c).world_size for c in ready_checkpoints(str(runs / "elastic"))]

    def wait(condition) -> None:
        while driver.poll() is None and not condition():
            time.sleep(0.2)

    events = []
    try:
        wait(lambda: 3 in sizes())
        events.append((time.time() - start, "lose-node"))
        local("lose-node")
        wait(lambda: sizes()[-1:] == [2])
        events.append((time.time() - start, "add-node"))
        local("add-node", "--cpus-per-node", "1")
        driver.wait(timeout=600)
        reader.join(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
        local("stop")
    total = time.time() - start
    keep = re.compile(r"resumed at step|workers in a run|elastic run|step \d+: checkpoint saved|converted|Traceback|"
                      r"Error|error")
    first: dict[str, float] = {}  # each line once, at its first arrival
    for t, line in lines:
        first.setdefault(line, t)
    lines = sorted((t, line) for line, t in first.items())
    for t, line in sorted(lines + [(t, f"=== {e} ===") for t, e in events]):
        if line.startswith("===") or keep.search(line):
            print(f"{t:7.1f} s  {line[:160]}")
    print(f"checkpoints saved by {sizes()} workers; run {total:.1f} s, exit {driver.returncode}")
    for at, event in events:  # the first line that says a new worker group goes on training after the fault
        resumed = next(((t, line) for t, line in lines if t > at and "resumed at step" in line), None)
        if resumed:
            step = int(re.search(r"resumed at step (\d+)", resumed[1]).group(1))
            print(f"{event}: training again {resumed[0] - at:.1f} s later, from step {step}")
    print(json.dumps({"total_s": round(total, 1), "sizes": sizes()}))


if __name__ == "__main__":
    main()
