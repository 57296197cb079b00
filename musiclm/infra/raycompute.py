"""Sizing Ray Data actor pools from the cluster's resources, and asking an autoscaling cluster for what the
user asked for.

On a 2-CPU machine Ray waits forever when decode tasks and encoder actors each ask for whole CPUs
(ENVIRONMENT.md), so requests here are fractional and always leave room for the decode tasks.

GPUs are used when the user asks for them (``--gpus-per-actor``, ``--use-gpu``), or when the cluster has some.
A cluster that autoscales from zero GPU nodes has none when a job starts, so a job that was asked for GPUs
plans for them anyway and calls ``wait_for``: it asks the autoscaler for the bundles
(``ray.autoscaler.sdk.request_resources``), says what it waits for, and gives up after the user's
``--wait-for-nodes`` seconds with a message saying what to check. A job that was not asked for GPUs and finds
none runs on CPUs and says so (``cpu_fallback_note``). This module never starts Ray; callers pass
``ray.cluster_resources()``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ActorPlan:
    actors: int  # encoder actors in the pool
    cpus_per_actor: float  # Ray resource request (may be fractional)
    gpus_per_actor: float
    threads_per_actor: int  # torch threads inside each actor
    decode_cpus: float  # Ray resource request of each decode task

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def describe(self) -> str:
        where = f"{self.gpus_per_actor:g} GPU" if self.gpus_per_actor else f"{self.threads_per_actor} threads"
        return (f"{self.actors} encoder actor(s) x ({self.cpus_per_actor:g} CPU, {where}); "
                f"decode tasks {self.decode_cpus:g} CPU each")


def plan_actors(resources: dict, actors: int | None = None, gpus_per_actor: float | None = None,
                decode_cpus: float = 0.25) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs. On CPUs, one single-threaded actor per CPU up to 4 CPUs,
    else one two-threaded actor per 2 CPUs: separate processes scale better than torch's intra-op threads
    for these models (benchmarks/RESULTS.md). Actors ask for three quarters of the CPUs in all, leaving
    room for the decode tasks so that Ray never waits forever on a small machine."""
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        # asked for GPUs: one actor per GPU there is, or as many as asked; with none up yet (an autoscaling
        # cluster at zero GPU nodes), one actor, and the job waits for its GPU (``wait_for``)
        n = actors or max(1, int(gpus // gpus_per_actor))
        per = max(0.25, min(2.0, (cpus - decode_cpus) / n)) if gpus >= n * gpus_per_actor else 1.0
        return ActorPlan(n, per, gpus_per_actor, max(1, int(per)), decode_cpus)
    threads = 1 if cpus <= 4 else 2
    n = actors or max(1, int(cpus // threads))
    budget = max(0.25, cpus * 0.75 if cpus > 1 else cpus - decode_cpus)
    per = max(0.25, min(budget / n, cpus - decode_cpus))
    return ActorPlan(n, round(per, 2), 0.0, max(1, int(round(cpus / n))) if actors else threads, decode_cpus)


class ResourceWaitTimeout(RuntimeError):
    """The cluster did not grow to what the job asked for within the wait the user allowed."""


def bundles_of(plan: ActorPlan) -> list[dict]:
    """The resource bundles of an actor plan's actors (what to ask the autoscaler for)."""
    one = {"CPU": plan.cpus_per_actor, **({"GPU": plan.gpus_per_actor} if plan.gpus_per_actor else {})}
    return [dict(one) for _ in range(plan.actors)]


def _describe(res: dict) -> str:
    """CPUs, GPUs and custom resources; not Ray's bookkeeping ones (memory, node:..., accelerator_type:...)."""
    shown = {k: v for k, v in res.items() if k in ("CPU", "GPU") or not (
        k in ("memory", "object_store_memory") or ":" in k)}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def _total(bundles: list[dict]) -> dict:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _short(need: dict, have: dict) -> dict:
    return {k: v for k, v in need.items() if float(have.get(k, 0.0)) + 1e-9 < v}


def wait_for(bundles: list[dict], what: str, timeout_s: float, log=print, poll_s: float = 2.0,
             report_every_s: float = 30.0) -> dict:
    """Return the cluster's resources once it has room for ``bundles`` in total (the GPUs and CPUs a job asked
    for); until then ask the autoscaler for them and say so. ``timeout_s`` 0 means do not wait (a local Ray,
    which nothing will add nodes to). Raises ``ResourceWaitTimeout`` naming what was missing."""
    import ray

    need = _total(bundles)
    have = ray.cluster_resources()
    if not _short(need, have):
        return have
    from ray.autoscaler.sdk import request_resources

    if timeout_s <= 0:
        raise ResourceWaitTimeout(
            f"{what}: {_describe(need)} asked for, but this Ray has {_describe(have)}, and no "
            f"wait was allowed (--wait-for-nodes 0; a local Ray started by the job never grows). Connect to a "
            f"cluster that has or can add them (--address), or leave out --gpus-per-actor/--use-gpu to run on CPUs.")
    request_resources(bundles=bundles)  # the autoscaler scales up to fit these, now (a no-op without one)
    start = last = time.monotonic()
    log(f"waiting for {_describe(_short(need, have))} more for {what} (the cluster has {_describe(have)}); asked "
        f"the autoscaler for {len(bundles)} x {{{_describe(bundles[0])}}}; giving up after {timeout_s:.0f} s "
        f"(--wait-for-nodes)")
    try:
        while True:
            time.sleep(poll_s)
            have = ray.cluster_resources()
            if not _short(need, have):
                log(f"the cluster has grown to {_describe(have)} after {time.monotonic() - start:.0f} s: starting")
                return have
            now = time.monotonic()
            if now - start >= timeout_s:
                raise ResourceWaitTimeout(
                    f"{what}: waited {timeout_s:.0f} s for {_describe(need)}; the cluster still has "
                    f"{_describe(have)}. Check that the cluster has a node type with these resources and room under "
                    f"its max_workers (`ray status` shows pending demands and failed launches), then run the same "
                    f"command again, or wait longer with --wait-for-nodes SECONDS.")
            if now - last >= report_every_s:
                last = now
                log(f"still waiting for {_describe(_short(need, have))} ({now - start:.0f} s of {timeout_s:.0f} s)")
    finally:
        request_resources(bundles=[])  # withdraw the request: the job's own actors hold what they need now


def cpu_fallback_note(resources: dict, asked_for_gpus: bool) -> str | None:
    """The line a job logs when it runs on CPUs because the cluster has no GPUs and none were asked for."""
    if asked_for_gpus or float(resources.get("GPU", 0.0)) > 0:
        return None
    return ("no GPUs in the cluster now: running on CPUs. On a cluster that adds GPU nodes on demand, ask for "
            "them (--gpus-per-actor 1 for Ray Data jobs, --use-gpu for training) and the job waits for them.")
