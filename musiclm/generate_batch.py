"""Many prompts on Ray: a Ray Data actor pool in which each actor loads one model set once (on a GPU when the
cluster has them) and generates prompt after prompt, writing ``OUT/<index>-<prompt slug>/`` (the top K WAVs and
``report.json``) and ``OUT/prompts.json`` (one row per prompt: folder, best and mean CLAP score, error).

Checkpoint and token-system paths must be readable from every node (shared storage on a multi-node cluster).
A prompt whose folder already holds a report made with the same settings and checkpoints is not generated
again, so re-running a stopped batch continues it. A prompt that fails is recorded with its error; the others
go on.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .generate import REPORT, GenerateSettings, ModelSet, MusicGenerator, check_model_set, checkpoint_ids

INDEX = "prompts.json"


def prompt_folder(out: str | Path, index: int, prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return Path(out) / f"{index:03d}-{slug}"


def finished_report(folder: Path, prompt: str, settings: GenerateSettings, checkpoints: dict) -> dict | None:
    """The folder's report when it was made for this prompt with these settings and checkpoints."""
    try:
        report = json.loads((folder / REPORT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (report.get("prompt") == prompt and report.get("settings") == asdict(settings)
            and report.get("checkpoints") == checkpoints and all(Path(f).exists() for f in report.get("files", [])))
    return report if same else None


class PromptWorker:
    """One Ray Data actor: a loaded model set generating one prompt per call."""

    def __init__(self, models: ModelSet, settings: dict, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.settings = GenerateSettings(**settings)
        self.generator = MusicGenerator(models, device, self.settings.coarse_only)

    def __call__(self, batch: dict) -> dict:
        """Generates and writes each prompt's folder; returns its error ("" when it worked). The driver reads
        the scores from the reports, which also covers prompts finished by an earlier run."""
        errors = []
        for prompt, folder in zip(batch["prompt"], batch["folder"]):
            error = ""
            try:
                self.generator.write(self.generator.generate(str(prompt), self.settings), self.settings, str(folder))
            except Exception as e:  # one bad prompt must not stop the batch; it is recorded with its reason
                error = f"{type(e).__name__}: {e}"
                Path(str(folder)).mkdir(parents=True, exist_ok=True)
                (Path(str(folder)) / "error.txt").write_text(error + "\n")
            errors.append(error)
        return {"index": np.asarray(batch["index"]), "error": np.asarray(errors)}


def generate_prompts(prompts: list[str], models: ModelSet, settings: GenerateSettings, out: str | Path, *,
                     cluster_cpus: float, cluster_gpus: float, actors: int | None = None,
                     gpus_per_actor: float | None = None, log=print) -> list[dict]:
    """Generate every prompt (skipping finished ones) on the connected Ray cluster; returns the index rows."""
    import ray

    infos = check_model_set(models, settings.stages())  # refuse a mismatched set before any Ray work
    checkpoints = checkpoint_ids(infos)
    out = Path(out)
    rows = [{"index": i, "prompt": p, "folder": str(prompt_folder(out, i, p))} for i, p in enumerate(prompts)]
    todo = [r for r in rows if finished_report(Path(r["folder"]), r["prompt"], settings, checkpoints) is None]
    log(f"generate: {len(prompts)} prompts, {len(prompts) - len(todo)} already done")
    results = {}
    if todo:
        use_gpu = cluster_gpus > 0
        gpus_each = (gpus_per_actor or 1.0) if use_gpu else 0.0
        n = actors or (max(1, int(cluster_gpus // gpus_each)) if use_gpu else 1)
        n = max(1, min(n, len(todo)))
        cpus_each = 1 if use_gpu else max(1, int(cluster_cpus // n))
        ds = ray.data.from_items(todo).map_batches(
            PromptWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n), num_gpus=gpus_each,
            num_cpus=cpus_each,
            fn_constructor_kwargs={"models": models, "settings": asdict(settings),
                                   "device": "cuda" if use_gpu else "cpu", "threads": cpus_each})
        results = {int(r["index"]): r for r in ds.take_all()}
    index = []
    for row in rows:
        folder = Path(row["folder"])
        report = finished_report(folder, row["prompt"], settings, checkpoints)
        error = str(results.get(row["index"], {}).get("error", "")) or ("" if report else "not generated")
        index.append({**row, "best_score": report["best_score"] if report else None,
                      "mean_score": report["mean_score"] if report else None,
                      "files": report["files"] if report else [], "error": error})
        if error:
            log(f"generate: prompt {row['index']} ({row['prompt']!r}) failed: {error}")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


__all__ = ["generate_prompts", "prompt_folder", "finished_report", "PromptWorker", "INDEX"]
