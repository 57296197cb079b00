"""A real multi-process Ray cluster on this machine, for developing and testing job submission.

    python cluster/local.py start [--workers 1] [--cpus-per-node N] [--port 6379] [--dashboard-port 8265]
    python cluster/local.py add-node [--gpus G] [--cpus-per-node N]
    python cluster/local.py lose-node
    python cluster/local.py status
    python cluster/local.py stop

`start` runs `ray start --head` plus ``--workers`` worker nodes (separate raylets, like separate machines),
all on 127.0.0.1 with token authentication on (RAY_AUTH_MODE=token; the token is ~/.ray/auth_token,
created when missing). The dashboard and the job server (the same HTTP server) listen on 127.0.0.1 only. It
prints the address and how to submit a job. `add-node` joins one more worker node to the running cluster, as
an autoscaler would (``--gpus`` declares GPUs Ray schedules by, whether or not the machine has them: enough to
see a job that waits for GPU nodes pick them up). `lose-node` kills the newest worker node at once (SIGKILL of its
raylet, whose workers go with it), as a preempted machine goes: what an elastic training run must survive. Everything the cluster runs lives under one temp dir named after
the port, and `stop` ends exactly the processes of that cluster (and their children): another Ray on this
machine, started by `ray start` or a job's `ray.init()`, is left alone.

Ray's gRPC ports (the GCS at ``--port``, the raylets, the client server) accept connections on every interface
in Ray 2.60 (there is no loopback-only option); token authentication is what guards them. Keep them behind a
firewall on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = "cluster.json"


# The head declares a node dead after 3 failed health checks 1 s apart: about 3 s after a node is lost, where Ray's
# defaults (5 checks, 3 s apart) take about 15 s. Until then Ray Train still counts the lost node's CPUs.
NODE_HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# Even so, an elastic run that restarts within those seconds asks for the lost node's worker too, a group the
# cluster cannot place. Ray Train gives up on such a group after this long (its default: 60 s) and decides again with
# the nodes alive then (measured with Ray's defaults: training again 78-83 s after a lost node; docs/training.md).
# A worker group of this machine starts in 5-10 s; on a real cluster, where a node's start can take minutes, the
# default is the right one (a try that times out is retried, not counted against train.max_failures).
WORKER_START_TIMEOUT_S = "20"


def temp_dir(port: int) -> Path:
    # Ray puts unix sockets under it, whose paths must stay short: keep it directly under /tmp
    return Path(os.environ.get("MUSICLM_CLUSTER_TMP", "/tmp")) / f"musiclm-ray-{port}"


def ray_env() -> dict:
    """Token authentication on, and this Python's environment first on PATH, so that a job's `python` is
    the interpreter that has this project installed. Ray Train's worker groups that cannot be placed are given up
    after 20 s, not 60 (``WORKER_START_TIMEOUT_S``)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=WORKER_START_TIMEOUT_S)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def ray_cli() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _ray(args: list[str]) -> None:
    proc = subprocess.run([ray_cli(), *args], env=ray_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: `ray {' '.join(args[:2])}` failed (exit {proc.returncode}):\n{tail}")


def processes(port: int) -> list:
    """This cluster's processes: those whose command line names its temp dir, and all their children."""
    import psutil

    marker = str(temp_dir(port))
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def start(args: argparse.Namespace) -> dict:
    tmp = temp_dir(args.port)
    if processes(args.port):
        state = json.loads((tmp / STATE).read_text()) if (tmp / STATE).exists() else {}
        print(f"a cluster started by this script already runs on port {args.port}; `stop` it first")
        return state
    busy = [p for p in (args.port, args.dashboard_port) if not port_free(p)]
    if busy:
        raise SystemExit(f"error: port(s) {', '.join(map(str, busy))} are in use (another Ray?); choose others "
                         f"with --port / --dashboard-port")
    cpus = args.cpus_per_node or max(1, (os.cpu_count() or 2) // (args.workers + 1))
    tmp.mkdir(parents=True, exist_ok=True)
    _ray(["get-auth-token", "--generate"])  # creates ~/.ray/auth_token when missing; prints nothing we keep
    common = _node_args(tmp, cpus)
    _ray(["start", "--head", "--port", str(args.port), "--dashboard-host", "127.0.0.1",
          "--dashboard-port", str(args.dashboard_port), "--system-config", json.dumps(NODE_HEALTH), *common])
    for k in range(1, args.workers + 1):
        _ray(["start", "--address", f"127.0.0.1:{args.port}", *_node_args(node_dir(tmp, k), cpus)])
    state = {"address": f"127.0.0.1:{args.port}", "dashboard": f"http://127.0.0.1:{args.dashboard_port}",
             "nodes": args.workers + 1, "cpus_per_node": cpus, "temp_dir": str(tmp), "started": time.time(),
             "worker_nodes_started": args.workers}
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    print(f"""Ray cluster up: {state['nodes']} nodes x {cpus} CPUs, token authentication on.
  address (drivers):     {state['address']}
  dashboard, job server: {state['dashboard']}   (127.0.0.1 only)

Submit a job from this repository:
  export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS={state['dashboard']}
  ray job submit --working-dir . -- python -m jobs.preprocess --source data/synth --token-system tokens/tiny --out data/tokens
Run a job's driver here instead:   RAY_AUTH_MODE=token RAY_ADDRESS={state['address']} python -m jobs.train ...
Stop it:                           python cluster/local.py stop --port {args.port}""")
    return state


def node_dir(tmp: Path, k: int) -> Path:
    """The k-th worker node's own temp dir. Nodes that shared the head's saw one another's files as their own: each
    node's log monitor forwarded every worker's lines (each line reached a driver once per node), and a worker node's
    runtime-env agent deleted a job's working directory while the job's driver ran in it on the head (the driver
    failed at its first os.getcwd(): "[Errno 2] No such file or directory")."""
    return tmp / f"node-{k}"


def _node_args(tmp: Path, cpus: int) -> list[str]:
    # Each node's dashboard agent gets a free HTTP port: Ray's default, 52365, is the same for every Ray on the
    # machine, and when another Ray (a job's ray.init(), a second cluster) holds it, the head's agent runs
    # without HTTP and the job server answers every submission "No available agent ... try again later".
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--temp-dir", str(tmp), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(free_port())]


def add_node(args: argparse.Namespace) -> dict:
    """One more worker node in the running cluster (what an autoscaler does when a job asks for resources)."""
    path = temp_dir(args.port) / STATE
    if not processes(args.port) or not path.exists():
        raise SystemExit(f"error: no cluster started by this script runs on port {args.port}; `start` one first")
    state = json.loads(path.read_text())
    cpus = args.cpus_per_node or state["cpus_per_node"]
    k = state["worker_nodes_started"] = state.get("worker_nodes_started", state["nodes"] - 1) + 1
    _ray(["start", "--address", state["address"], *_node_args(node_dir(Path(state["temp_dir"]), k), cpus),
          *(["--num-gpus", str(args.gpus)] if args.gpus else [])])
    state["nodes"] += 1
    state.setdefault("added", []).append({"cpus": cpus, "gpus": args.gpus})
    path.write_text(json.dumps(state, indent=2))
    print(f"node added: {cpus} CPUs, {args.gpus} GPUs; the cluster has {state['nodes']} nodes")
    return state


def worker_raylets(port: int) -> list:
    """The raylet processes of this cluster's worker nodes, oldest first (each under its ``node_dir``)."""
    import re

    found = []
    for p in processes(port):
        try:
            line = " ".join(p.cmdline())
        except Exception:  # ended meanwhile
            continue
        m = re.search(r"/node-(\d+)/", line)
        if "raylet/raylet" in line and m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def lose_node(args: argparse.Namespace) -> dict:
    """The newest worker node killed without warning (SIGKILL of its raylet; its worker processes die with it)."""
    path = temp_dir(args.port) / STATE
    raylets = worker_raylets(args.port)
    if not raylets or not path.exists():
        raise SystemExit(f"error: no worker node of a cluster started by this script runs on port {args.port}")
    raylets[-1].kill()
    state = json.loads(path.read_text())
    state["nodes"] -= 1
    path.write_text(json.dumps(state, indent=2))
    print(f"node lost (raylet pid {raylets[-1].pid} killed); the cluster has {state['nodes']} nodes")
    return state


def stop(args: argparse.Namespace) -> int:
    import psutil

    procs = processes(args.port)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    state = temp_dir(args.port) / STATE
    if state.exists():
        state.unlink()
    print(f"stopped {len(procs)} processes of the cluster on port {args.port}" if procs
          else f"no cluster started by this script runs on port {args.port}")
    return len(procs)


def status(args: argparse.Namespace) -> None:
    state = temp_dir(args.port) / STATE
    procs = processes(args.port)
    if not procs:
        print(f"no cluster started by this script runs on port {args.port}")
        return
    print(state.read_text() if state.exists() else f"{len(procs)} processes on port {args.port}")
    subprocess.run([ray_cli(), "status", "--address", f"127.0.0.1:{args.port}"], env=ray_env())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cluster/local.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "add-node", "lose-node", "stop", "status"])
    p.add_argument("--port", type=int, default=6379, help="the head's GCS port (names the cluster)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server (127.0.0.1)")
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    p.add_argument("--cpus-per-node", type=int, default=None, help="default: this machine's CPUs / nodes")
    p.add_argument("--gpus", type=int, default=0, help="add-node: GPUs the new node declares")
    args = p.parse_args(argv)
    {"start": start, "add-node": add_node, "lose-node": lose_node, "stop": stop, "status": status}[args.action](args)


if __name__ == "__main__":
    main()
