"""One Tune trial: the same driver and per-worker loop as ``jobs.train``, run as a function trainable
(Ray 2.60 / Train V2: the trial function builds a ``TorchTrainer`` and forwards its reports to Tune).

Each trial trains into ``SWEEP/trials/<trial id>`` with its own TensorBoard folder; a retried trial (Tune's
FailureConfig, or a resumed sweep) finds its checkpoints there and continues from the latest.
"""
from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from musiclm.config import Config, apply_overrides, from_dict
from musiclm.infra import storage
from musiclm.train.loop import worker_print
from musiclm.train.run import TrainRequest, build_trainer, check_request


class ValidationReports(TuneReportCallback):
    """Forward only the reports that carry a fresh validation: ASHA compares ``valid/loss`` at ``step``, and a
    diverged run (loss inf or nan) must compare as the worst, not be skipped."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get("fresh_valid"):
            fixed = dict(metrics[0])
            loss = fixed.get("valid/loss")
            if loss is None or loss != loss or loss == float("inf"):
                fixed["valid/loss"] = 1e9
            super().after_report(run_context, [fixed, *metrics[1:]], checkpoint)


def run_trial(params: dict, *, base: dict, data: str, sweep_dir: str, cluster_cpus: float,
              init_from: str | None = None, token_system: str | None = None) -> None:
    import ray.tune

    cfg = apply_overrides(from_dict(Config, base, "config"), params)
    trial_id = ray.tune.get_context().get_trial_id()
    req = TrainRequest(cfg, data, f"trial_{trial_id}", storage.join(sweep_dir, "trials"), init_from, token_system)
    loop_cfg = check_request(req, log=lambda m: worker_print(f"[trial {trial_id}] {m}"))
    build_trainer(req, loop_cfg, cluster_cpus, callbacks=[ValidationReports()]).fit()
