"""Evaluation beside training: follow a stage's training run and score each new checkpoint as music.

For every checkpoint the run has persisted (Ray Train's ``checkpoint_manager_snapshot.json``; every stage
checkpoint when there is none), the checkpoint replaces its stage in a given model set (the other two stages
and the token system), the set generates for a fixed prompt set with ``evaluate`` (on its own Ray actors), and

    RUN/eval/step_<step>/              evaluate's folder: results.md / .csv, fad.json, tensorboard/, and
                                       checkpoint/<prompt>/ with the clips and report.json
    RUN/eval/evaluated.json            what was evaluated, with which prompts and settings (the resume point)
    RUN/eval/reference_embeddings.npz  the FAD reference's embeddings, computed once
    RUN/tensorboard/                   eval/clap_score (best of N), eval/clap_score_random, eval/fad_clap,
                                       eval/fad_semantic at the checkpoint's step, beside train/ and valid/
    RUN/summary.json                   "eval": {step: those scalars}

A checkpoint evaluated once is never evaluated again (a rerun does nothing new); a checkpoint Ray Train deleted
before its turn (``keep_best``) is recorded as skipped. Generation of a checkpoint stopped part way resumes
prompt by prompt (``generation.batch`` skips finished prompts). Nothing here waits on or pauses training: the run
only ever gains checkpoints, and the scalars go to their own event file.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ..generation.generate import GenerateSettings, ModelSet
from ..infra import storage
from ..train import checkpoint as ckpt
from .evaluate import Prompt, evaluate, mean_of_known

EVAL_DIR = "eval"
STATE = "evaluated.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of checkpoints it has persisted
SET = "checkpoint"  # the model-set name inside each checkpoint's evaluate folder
SCALARS = ("eval/clap_score", "eval/clap_score_random", "eval/fad_clap", "eval/fad_semantic")


@dataclass
class WatchRequest:
    run_dir: str  # a `musiclm train` run (folder or object-store URI)
    models: ModelSet  # gives the other stages and the token system
    prompts: list[Prompt]
    settings: GenerateSettings
    references: list | None = None  # (clip, Prompt | None) pairs for FAD; None: CLAP score only

    @property
    def eval_dir(self) -> str:
        return storage.join(self.run_dir, EVAL_DIR)


def ready_checkpoints(run_dir: str) -> list[str]:
    """The run's stage checkpoints that are complete, earliest step first: those Ray Train has committed (listed
    in its snapshot; a checkpoint being uploaded, or uploaded by workers whose report the controller has not
    taken yet, is not). A run without a snapshot has none committed yet, unless it has ended (a summary: a
    run of another Ray version, or checkpoints copied in by hand), when every stage checkpoint counts."""
    from ..train.run import SUMMARY, stage_checkpoints

    found = stage_checkpoints(run_dir)
    snapshot = storage.join(run_dir, SNAPSHOT)
    if not storage.exists(snapshot):
        return found if storage.exists(storage.join(run_dir, SUMMARY)) else []
    try:
        listed = {r["checkpoint_dir_name"] for r in storage.read_json(snapshot).get("checkpoint_results", [])}
    except (ValueError, KeyError, TypeError):  # caught while Ray rewrites it: wait for the next look
        return []
    return [c for c in found if storage.name(c) in listed]


def _identity(req: WatchRequest) -> dict:
    """What a checkpoint's scores depend on besides the checkpoint; a rerun must ask for the same."""
    return {"prompts": [p.caption for p in req.prompts], "settings": asdict(req.settings),
            "references": [str(clip) for clip, _ in req.references] if req.references else None,
            "models": {s: p for s, p in req.models.paths().items()}, "token_system": req.models.token_system}


def read_state(req: WatchRequest) -> dict:
    path = storage.join(req.eval_dir, STATE)
    state = storage.read_json(path) if storage.exists(path) else {"identity": _identity(req), "checkpoints": {}}
    if state["identity"] != _identity(req):
        raise ValueError(f"{path} records checkpoints evaluated with other prompts, settings, reference clips or "
                         f"model set; give the same ones to continue, or move {req.eval_dir} away to start over")
    return state


def evaluate_checkpoint(req: WatchRequest, checkpoint: str, *, cluster_cpus: float, cluster_gpus: float,
                        cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
                        log=print) -> dict:
    """Generate and score with ``checkpoint`` in place of its stage; returns {step, checkpoint, folder, scalars}."""
    info = ckpt.read_stage(checkpoint)
    name = f"step_{info.step:06d}"
    models = dataclasses.replace(req.models, **{info.stage: checkpoint})
    out = storage.join(req.eval_dir, name)
    rows = evaluate(req.prompts, {SET: models}, req.settings, out, cluster_cpus=cluster_cpus,
                    cluster_gpus=cluster_gpus, actors=1, cpus_per_actor=cpus_per_actor,
                    gpus_per_actor=gpus_per_actor, references=req.references,
                    reference_cache=storage.join(req.eval_dir, "reference_embeddings.npz"), log=log)
    scalars = {"eval/clap_score": mean_of_known(r["best_score"] for r in rows),
               "eval/clap_score_random": mean_of_known(r["random_score"] for r in rows)}
    if req.references:
        fads = storage.read_json(storage.join(out, "fad.json"))["sets"][SET]
        scalars.update({"eval/fad_clap": fads.get("fad_clap", {}).get("fad"),
                        "eval/fad_semantic": fads.get("fad_semantic", {}).get("fad")})
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    return {"step": info.step, "stage": info.stage, "checkpoint": checkpoint, "folder": out, "scalars": scalars,
            "failed_prompts": sum(1 for r in rows if r["error"])}


def record(req: WatchRequest, state: dict, name: str, result: dict) -> None:
    """The result into evaluated.json, the run's TensorBoard and summary.json's "eval" (read, changed, written:
    training keeps that key when it writes its summary)."""
    from ..train.metrics import TensorBoard

    state["checkpoints"][name] = result
    storage.write_json(storage.join(req.eval_dir, STATE), state)  # first: a stop after it leaves log_missing's work
    if result.get("scalars"):
        board = TensorBoard(storage.join(req.run_dir, "tensorboard"))
        board.scalars(result["scalars"], result["step"])
        board.close()
    _write_summary_eval(req, state)


def log_missing(req: WatchRequest, log=print) -> None:
    """Scalars evaluated.json holds that the run's TensorBoard lacks (a stop between ``record``'s writes: the
    state is written first, the record of what was evaluated) are written at their steps, and summary.json's
    "eval" rebuilt: a stop at any point leaves nothing missing after the rerun, and nothing twice."""
    from ..train.metrics import TensorBoard, tensorboard_steps

    recorded = sorted((r for r in read_state(req)["checkpoints"].values() if r.get("scalars")),
                      key=lambda r: r["step"])
    if not recorded:
        return
    board_dir = storage.join(req.run_dir, "tensorboard")
    logged = tensorboard_steps(board_dir) if storage.list_files(board_dir, "events.*") else {}
    missing = [r for r in recorded if any(r["step"] not in logged.get(tag, []) for tag in r["scalars"])]
    if missing:
        board = TensorBoard(board_dir)
        for r in missing:
            board.scalars({k: v for k, v in r["scalars"].items() if r["step"] not in logged.get(k, [])}, r["step"])
        board.close()
        log(f"watch-eval: wrote the TensorBoard points of step(s) {', '.join(str(r['step']) for r in missing)}, "
            f"recorded but not logged when an earlier run stopped")
    _write_summary_eval(req, read_state(req))


def _write_summary_eval(req: WatchRequest, state: dict) -> None:
    from ..train.run import SUMMARY

    summary_path = storage.join(req.run_dir, SUMMARY)
    summary = storage.read_json(summary_path) if storage.exists(summary_path) else {}
    summary["eval"] = {str(r["step"]): r["scalars"] for r in sorted(state["checkpoints"].values(),
                                                                     key=lambda r: r.get("step", -1))
                       if r.get("scalars")}
    storage.write_json(summary_path, summary)


def evaluate_new(req: WatchRequest, *, cluster_cpus: float, cluster_gpus: float, cpus_per_actor: float | None = None,
                 gpus_per_actor: float | None = None, log=print) -> list[dict]:
    """One look at the run: evaluate every ready checkpoint not evaluated before; returns the new results."""
    state = read_state(req)
    new = []
    for checkpoint in ready_checkpoints(req.run_dir):
        name = storage.name(checkpoint)
        if name in state["checkpoints"]:
            continue
        try:
            result = evaluate_checkpoint(req, checkpoint, cluster_cpus=cluster_cpus, cluster_gpus=cluster_gpus,
                                         cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, log=log)
        except (ckpt.CheckpointError, FileNotFoundError) as e:
            if storage.exists(checkpoint):
                raise
            # Ray Train removed it (keep_best) before its turn came: nothing left to evaluate
            result = {"checkpoint": checkpoint, "skipped": f"deleted before evaluation ({type(e).__name__})"}
            log(f"watch-eval: {name} was deleted by the run before it was evaluated; skipped")
        else:
            described = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in result["scalars"].items())
            log(f"watch-eval: step {result['step']}: {described}")
        record(req, state, name, result)
        new.append(result)
    return new


def watch(req: WatchRequest, *, cluster_cpus: float, cluster_gpus: float, cpus_per_actor: float | None = None,
          gpus_per_actor: float | None = None, follow: bool = False, until: Callable[[], bool] | None = None,
          until_step: int | None = None, poll_s: float = 30.0, log=print) -> list[dict]:
    """Evaluate what the run has; with ``follow``, keep looking every ``poll_s`` seconds until ``until()`` is
    true (then one last look: the final checkpoint) or a checkpoint at ``until_step`` or later is evaluated."""
    log_missing(req, log)
    results = []
    while True:
        finished = until is not None and until()  # asked before the look, so that the last look sees everything
        results += evaluate_new(req, cluster_cpus=cluster_cpus, cluster_gpus=cluster_gpus,
                                cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, log=log)
        reached = until_step is not None and any(r.get("step", -1) >= until_step
                                                 for r in read_state(req)["checkpoints"].values())
        if not follow or finished or reached:
            break
        time.sleep(poll_s)
    if not results:
        log(f"watch-eval: no new checkpoints in {req.run_dir}; evaluated: {len(read_state(req)['checkpoints'])}")
    return results


class Beside:
    """``watch`` in a thread of the training driver, following the run until the ``with`` block (the training)
    ends, then looking once more for the last checkpoints. An evaluation error is logged, never raised into the
    training: the user reruns it with `musiclm watch-eval`."""

    def __init__(self, req: WatchRequest, *, poll_s: float = 30.0, log=print, **resources):
        import threading

        self.req, self.poll_s, self.log, self.resources = req, poll_s, log, resources
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watch-eval", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            watch(self.req, follow=True, until=self.done.is_set, poll_s=self.poll_s, log=self.log, **self.resources)
        except BaseException as e:  # reported by __exit__, after training
            self.error = e

    def __enter__(self) -> "Beside":
        read_state(self.req)  # refuse other prompts or settings before training starts, not after
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.log("watch-eval: training ended; evaluating the checkpoints not evaluated yet")
        self.thread.join()
        if self.error is not None:
            self.log(f"watch-eval failed ({type(self.error).__name__}: {self.error}); training is unaffected. Run "
                     f"`musiclm watch-eval --run {self.req.run_dir} ...` to evaluate what is left")


__all__ = ["WatchRequest", "watch", "Beside", "evaluate_new", "evaluate_checkpoint", "ready_checkpoints", "read_state",
           "SCALARS", "EVAL_DIR", "STATE"]
