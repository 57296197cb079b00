"""Many prompts on Ray: a Ray Data actor pool in which each actor loads a model set once (on a GPU when the
cluster has them) and generates its prompts several at a time (up to ``PROMPT_BATCH`` in one pass of decoding
steps, each drawing the candidates it draws alone; several model sets share one pool, as evaluation needs),
writing ``OUT/<index>-<prompt slug>/`` (the top K WAVs and ``report.json``) and ``OUT/prompts.json`` (one row
per prompt: folder, best and mean CLAP score, error).

Checkpoint and token-system paths must be readable from every node (shared storage on a multi-node cluster).
A prompt whose folder already holds a report made with the same settings and checkpoints is not generated
again, so re-running a stopped batch continues it. A prompt that fails is recorded with its error; the others
go on.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..infra import storage
from .generate import REPORT, GenerateSettings, ModelSet, MusicGenerator, check_model_set, checkpoint_ids
from .prompts import MusicPrompt, as_prompt

INDEX = "prompts.json"
# prompts an actor samples together, at most: their candidates are one batch (8 prompts x 4 candidates x 5 fine
# windows of 10 s = 160 rows); fewer when there are fewer prompts per actor, so that every actor gets some
PROMPT_BATCH = 8


def prompt_folder(out: str | Path, index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return storage.join(out, f"{index:03d}-{slug}")


def finished_report(folder: str | Path, prompt: str, settings: GenerateSettings, checkpoints: dict) -> dict | None:
    """The folder's report when it was made for this prompt with these settings and checkpoints."""
    try:
        report = storage.read_json(storage.join(folder, REPORT))
    except (OSError, json.JSONDecodeError):
        return None
    same = (report.get("prompt") == prompt and _what_is_drawn(report.get("settings")) == _what_is_drawn(asdict(settings))
            and report.get("checkpoints") == checkpoints and all(storage.exists(f) for f in report.get("files", [])))
    return report if same else None


def _what_is_drawn(settings: dict | None) -> dict | None:
    """The settings that decide a generation: all but how tokens are decoded (every decoder draws the same); a
    guidance of 1 draws what reports written before guidance existed drew."""
    return None if settings is None else {k: v for k, v in settings.items()
                                          if k != "decoding" and not (k.endswith("_guidance") and v == 1)}


def cpu_threads(cpus: int) -> int:
    """Torch threads for a CPU actor given ``cpus``: one fewer than its CPUs, leaving a core for the Ray
    processes beside it (the driver's streaming executor, the raylet). A team of threads that spans every core
    stalls each time one of those is scheduled: on 2 CPUs one prompt of the tiny set took 5-7 s with 2 threads
    and 2.1 s with 1 (2.4 s with 2 threads outside Ray)."""
    return max(1, cpus - 1)


class PromptWorker:
    """One Ray Data actor generating the prompts of each call with the model set each row names (and that name's
    settings), the prompts of one set together (``MusicGenerator.generate_many``: the same candidates as one at a
    time). It holds one set at a time and loads another when a row asks for it (rows come grouped by set, so each
    actor loads each set at most about once); names that share a model set (guidance scales of one set) share
    its loaded weights."""

    def __init__(self, sets: dict[str, ModelSet], settings: dict[str, dict], device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.sets, self.device = sets, device
        self.settings = {name: GenerateSettings(**s) for name, s in settings.items()}
        self.loaded, self.generator = None, None

    def _generator(self, name: str) -> MusicGenerator:
        key = (self.sets[name], self.settings[name].coarse_only, self.settings[name].weights_dtype)
        if key != self.loaded:
            self.generator = None  # free the previous set before loading the next
            self.generator = MusicGenerator(self.sets[name], self.device, self.settings[name].coarse_only,
                                            self.settings[name].weights_dtype)
            self.loaded = key
        return self.generator

    def __call__(self, batch: dict) -> dict:
        """Generates and writes each prompt's folder; returns its error ("" when it worked). The driver reads
        the scores from the reports, which also covers prompts finished by an earlier run."""
        rows = [(str(n), MusicPrompt.decode(str(s)), str(f))
                for n, s, f in zip(batch["model_set"], batch["spec"], batch["folder"])]
        errors = []
        for name, group in itertools.groupby(rows, key=lambda r: r[0]):
            errors += self._generate(name, [(p, f) for _, p, f in group])
        return {"model_set": np.asarray(batch["model_set"]), "index": np.asarray(batch["index"]),
                "error": np.asarray(errors)}

    def _generate(self, name: str, rows: list[tuple[str, str]]) -> list[str]:
        """The errors of (prompt, folder) rows of set ``name``, "" where it worked: one bad prompt must not stop
        the others, so a failed batch (out of memory, say) is tried again one prompt at a time."""
        try:
            generator = self._generator(name)
            results = generator.generate_many([prompt for prompt, _ in rows], self.settings[name])
        except Exception as e:
            if len(rows) > 1:
                return [self._generate(name, [row])[0] for row in rows]
            return [_failed(rows[0][1], e)]
        errors = []
        for (_, folder), result in zip(rows, results):
            try:
                generator.write(result, self.settings[name], folder)
                errors.append("")
            except Exception as e:
                errors.append(_failed(folder, e))
        return errors


def _failed(folder: str, e: Exception) -> str:
    """``e`` recorded in the prompt's folder (``error.txt``) and returned as its reason."""
    error = f"{type(e).__name__}: {e}"
    storage.write_text(storage.join(folder, "error.txt"), error + "\n")
    return error


def generate_prompts(prompts: "list[str | MusicPrompt]", models: ModelSet, settings: GenerateSettings,
                     out: str | Path, *, cluster_cpus: float, cluster_gpus: float, actors: int | None = None,
                     gpus_per_actor: float | None = None, log=print) -> list[dict]:
    """Generate every prompt (skipping finished ones) on the connected Ray cluster; returns the index rows."""
    return generate_sets(prompts, {"": (models, out)}, settings, cluster_cpus=cluster_cpus, cluster_gpus=cluster_gpus,
                         actors=actors, gpus_per_actor=gpus_per_actor, log=log)[""]


def generate_sets(prompts: "list[str | MusicPrompt]", sets: dict[str, tuple[ModelSet, str | Path]],
                  settings: GenerateSettings, *, cluster_cpus: float, cluster_gpus: float, actors: int | None = None,
                  gpus_per_actor: float | None = None, cpus_per_actor: float | None = None,
                  set_settings: dict[str, GenerateSettings] | None = None, log=print) -> dict[str, list[dict]]:
    """Every prompt with every model set (``name -> (models, out folder)``) in one actor pool, skipping
    finished prompts; writes each set's ``prompts.json`` and returns its index rows by set name.
    ``set_settings``: other settings for some names (the guidance scales of an evaluation), else ``settings``.
    ``cpus_per_actor`` overrides the CPUs each actor reserves (default: a share of the cluster's, or 1 beside a
    GPU); 0 runs them on cores already reserved by others (evaluation beside a training run)."""
    import ray

    prompts = [as_prompt(p) for p in prompts]
    each = {name: (set_settings or {}).get(name, settings) for name in sets}
    # Refuse a mismatched set before any Ray work.
    checkpoints = {name: checkpoint_ids(check_model_set(models, each[name].stages(), each[name]))
                   for name, (models, _) in sets.items()}
    rows, todo = {}, []
    for name, (_, out) in sets.items():
        rows[name] = [{"model_set": name, "index": i, "prompt": p.label, "spec": p.encode(),
                       "folder": prompt_folder(out, i, p.label)} for i, p in enumerate(prompts)]
        left = [r for r in rows[name]
                if finished_report(r["folder"], r["prompt"], each[name], checkpoints[name]) is None]
        log(f"generate{f' ({name})' if name else ''}: {len(prompts)} prompts, {len(prompts) - len(left)} already done")
        todo += left
    results = {}
    if todo:
        use_gpu = cluster_gpus > 0
        gpus_each = (gpus_per_actor or 1.0) if use_gpu else 0.0
        n = actors or (max(1, int(cluster_gpus // gpus_each)) if use_gpu else 1)
        n = max(1, min(n, len(todo)))
        cpus_each = 1 if use_gpu else max(1, int(cluster_cpus // n))
        threads = cpus_each if use_gpu else cpu_threads(cpus_each)
        if cpus_per_actor is not None:
            cpus_each, threads = cpus_per_actor, max(1, int(cpus_per_actor))
        ds = ray.data.from_items(todo).map_batches(
            PromptWorker, batch_size=max(1, min(PROMPT_BATCH, math.ceil(len(todo) / n))),
            compute=ray.data.ActorPoolStrategy(size=n), num_gpus=gpus_each,
            num_cpus=cpus_each,
            fn_constructor_kwargs={"sets": {name: models for name, (models, _) in sets.items()},
                                   "settings": {name: asdict(s) for name, s in each.items()},
                                   "device": "cuda" if use_gpu else "cpu",
                                   "threads": threads})
        results = {(str(r["model_set"]), int(r["index"])): r for r in ds.take_all()}
    indexes = {}
    for name, (_, out) in sets.items():
        index = []
        for row in rows[name]:
            report = finished_report(row["folder"], row["prompt"], each[name], checkpoints[name])
            error = (str(results.get((name, row["index"]), {}).get("error", ""))
                     or ("" if report else "not generated"))
            row = {k: v for k, v in row.items() if k not in ("model_set", "spec")}
            index.append({**row, "best_score": report["best_score"] if report else None,
                          "mean_score": report["mean_score"] if report else None,
                          "random_score": report.get("random_score") if report else None,
                          "files": report["files"] if report else [], "error": error})
            if error:
                log(f"generate{f' ({name})' if name else ''}: prompt {row['index']} ({row['prompt']!r}) failed: "
                    f"{error}")
        storage.write_json(storage.join(out, INDEX), index)
        indexes[name] = index
    return indexes


__all__ = ["generate_prompts", "generate_sets", "prompt_folder", "finished_report", "cpu_threads", "PromptWorker",
           "INDEX", "PROMPT_BATCH"]
