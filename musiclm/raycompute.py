"""Sizing Ray Data actor pools from the cluster's resources.

On a 2-CPU machine Ray waits forever when decode tasks and encoder actors each ask for whole CPUs
(ENVIRONMENT.md), so requests here are fractional and always leave room for the decode tasks.
This module never starts Ray; callers pass ``ray.cluster_resources()``.
"""
from __future__ import annotations

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
        if gpus < gpus_per_actor:
            raise ValueError(f"asked for {gpus_per_actor:g} GPU per actor but the cluster has {gpus:g} GPUs")
        n = actors or max(1, int(gpus // gpus_per_actor))
        per = max(0.25, min(2.0, (cpus - decode_cpus) / n))
        return ActorPlan(n, per, gpus_per_actor, max(1, int(per)), decode_cpus)
    threads = 1 if cpus <= 4 else 2
    n = actors or max(1, int(cpus // threads))
    budget = max(0.25, cpus * 0.75 if cpus > 1 else cpus - decode_cpus)
    per = max(0.25, min(budget / n, cpus - decode_cpus))
    return ActorPlan(n, round(per, 2), 0.0, max(1, int(round(cpus / n))) if actors else threads, decode_cpus)
