"""Experiment trackers of a run (``report_to``): TensorBoard by default, wandb, trackio, mlflow or comet_ml
through accelerate's trackers when they are installed, or "none".

What a run reports, on the main process only:

    train/<metric>      every metrics.jsonl column, each optimizer step
    eval/accuracy, eval/reward_mean   before training (step 0), every eval_every steps, after (max_steps)
    completions         a table of sample rollouts (prompt, completion, reward) every log_completions_every
                        steps: a text table in TensorBoard, a table in wandb / comet_ml, and always
                        completions.jsonl in the run directory

TensorBoard writes its events under ``<output_dir>/tb`` as before. A tracker that is asked for but not
installed is skipped with one warning naming the package to install.
"""

from __future__ import annotations

import json
import math
import warnings

from dmpo_fast.run_io import RunDir, finite_or_none

# report_to name -> (accelerate's availability check, the package to install)
TRACKERS = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "trackio": ("is_trackio_available", "trackio"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "comet_ml": ("is_comet_ml_available", "comet_ml"),
}
REPORT_TO = (*TRACKERS, "none")


def report_to_names(report_to, tensorboard: bool = True) -> list[str]:
    """The trackers a config asks for: ``report_to`` (a name, a list of names, "none"), less TensorBoard when
    the legacy switch ``tensorboard`` is off. ``ValueError`` names an unknown one."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in REPORT_TO:
            raise ValueError(f"report_to must name trackers from {REPORT_TO}, got {name!r}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"report_to 'none' cannot be combined with other trackers, got {names}")
        return []
    return [n for n in dict.fromkeys(names) if n != "tensorboard" or tensorboard]


class Trackers:
    """The run's trackers; every method is a no-op off the main process."""

    def __init__(self, run: RunDir, cfg, *, main: bool):
        self.run, self.trackers = run, []
        if not main:
            return
        import accelerate.utils
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        name = run.path.name or "run"
        for kind in report_to_names(cfg.report_to, cfg.tensorboard):
            check, package = TRACKERS[kind]
            if not getattr(accelerate.utils, check)():
                warnings.warn(
                    f"report_to includes {kind!r} but {package} is not installed: pip install {package} (or drop it "
                    f"from report_to{'; tensorboard=false' if kind == 'tensorboard' else ''}); not reporting there",
                    stacklevel=3,
                )
                continue
            cls = LOGGER_TYPE_TO_CLASS[kind]
            tracker = cls("tb", logging_dir=run.path) if kind == "tensorboard" else cls(name)
            tracker.start()
            if kind != "tensorboard":  # TensorBoard's hparams file would land in tb/; config.yaml has it
                tracker.store_init_configuration(json.loads(json.dumps(cfg.to_dict(), default=str)))
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def log_eval(self, evaluation: dict, step: int) -> None:
        self.log({f"eval/{k}": evaluation[k] for k in ("accuracy", "reward_mean")}, step)

    def log_completions(self, rows: list[dict], step: int) -> None:
        """A table of sample rollouts: completions.jsonl, and each tracker's table or text."""
        if not self.run.main:
            return
        with (self.run.path / "completions.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **{k: finite_or_none(v) for k, v in row.items()}}) + "\n")
        columns = list(rows[0]) if rows else []
        for tracker in self.trackers:
            if tracker.name in ("wandb", "comet_ml"):
                tracker.log_table("completions", columns=columns, data=[[r[c] for c in columns] for r in rows],
                                  step=step)  # fmt: skip
            elif tracker.name == "tensorboard":
                head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                body = "".join(
                    "| " + " | ".join(str(r[c]).replace("\n", " ").replace("|", "\\|") for c in columns) + " |\n"
                    for r in rows
                )
                tracker.log({"completions": head + body}, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
