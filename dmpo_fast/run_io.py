"""The output directory of a run: metrics, checkpoints, summary and plot, written so nothing is lost.

    output_dir/
      config.yaml            the full config of the run
      metrics.jsonl          one JSON line per optimizer step (appended, flushed each line)
      summary.json           eval_before / eval_after, steps, wall_seconds, config (written at the end)
      reward.png             reward and accuracy over steps
      tb/                    TensorBoard events (when tensorboard is installed and enabled)
      checkpoints/step-000010/ ...   the newest ``keep`` checkpoints

Every file that replaces an older one is written to a temporary name in the same directory and then
renamed (atomic on POSIX), so a run killed at any instant leaves the last good checkpoint intact.
A non-empty output directory is never overwritten unless the run resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "step-"
MODEL_INFO = "dmpo_fast.json"  # a checkpoint's model: its form (full / adapter), base model, quantization
ADAPTER_NAME = "default"  # PEFT's adapter name in the policy; adapter files leave it out of the names


def finite_or_none(value):
    """A JSON-safe number: NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_json(row: dict[str, Any]) -> str:
    """One line of strict JSON (no bare NaN or Infinity: non-finite numbers are written as null)."""
    return json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """The run directory. ``main=False`` (the other processes of a multi-process run, or a reader)
    checks nothing and creates nothing: only the main process writes."""

    def __init__(self, path: str | os.PathLike, *, resume: bool, main: bool = True):
        self.path = Path(path)
        self.main = main
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.evals_path = self.path / "evals.jsonl"
        if not main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output_dir {str(self.path)!r} exists and is not a directory")
        if not resume and self.path.is_dir() and any(self.path.iterdir()):
            raise ValueError(
                f"output_dir {str(self.path)!r} is not empty: pass resume=true (--resume) to continue that run, "
                "or choose another output_dir; an existing run is never overwritten"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            import yaml

            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def tensorboard(self):
        """A TensorBoard ``SummaryWriter`` on ``tb/`` (None, with one warning, when tensorboard is missing)."""
        if not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            import warnings

            warnings.warn(f"tensorboard=true but TensorBoard is not installed ({e}); pip install tensorboard, "
                          "or set tensorboard=false to silence this", stacklevel=2)  # fmt: skip
            return None
        return SummaryWriter(log_dir=str(self.path / "tb"))

    # --- metrics -----------------------------------------------------------------------------------
    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric and eval lines after ``last_step`` (a resumed run rewrites the steps it repeats)."""
        for path in (self.metrics_path, self.evals_path):
            if not path.exists():
                continue
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= last_step:
                        keep.append(ln)
                except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
                    continue
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def log_eval(self, step: int, evaluation: dict[str, Any]) -> None:
        with self.evals_path.open("a") as f:
            f.write(strict_json({"step": step, **evaluation}) + "\n")

    def read_evals(self) -> list[dict]:
        if not self.evals_path.exists():
            return []
        return [json.loads(ln) for ln in self.evals_path.read_text().splitlines() if ln]

    def log(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(strict_json(row) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln]

    # --- checkpoints -------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = sorted(
            p for p in self.checkpoints.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()
        )
        return done[-1] if done else None

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int, write_files=None) -> Path:
        """Write ``state`` (tensors / picklable objects) as checkpoints/step-NNNNNN atomically; ``write_files``
        (a function of the folder) adds the model's files (``checkpointing.save_model_files``)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=".tmp-"))
        if write_files is not None:
            write_files(tmp)
        torch.save(state, tmp / "state.pt")
        atomic_write_text(tmp / "step.json", json.dumps({"step": step}))
        if final.exists():  # the same step written again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in self.checkpoints.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))[
            :-keep
        ]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint(path: Path, *, with_model: bool = True) -> dict[str, Any]:
        """A checkpoint's training state; with ``with_model`` its ``"model"`` too: the policy's state dict of
        the fine-tuned tensors (every parameter after full fine-tuning, the adapter's after LoRA), read from
        the model files (older releases kept it in state.pt)."""
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
        if with_model and "model" not in state:
            state["model"] = RunDir.read_model_files(path)["tensors"]
        return state

    @staticmethod
    def read_model_files(path) -> dict[str, Any]:
        """{"form": "full" | "adapter", "tensors": the checkpoint's model tensors under the policy's names}."""
        from safetensors.torch import load_file

        path = Path(path)
        if (path / "adapter_model.safetensors").is_file():
            tensors = {}
            for k, v in load_file(path / "adapter_model.safetensors").items():
                head, leaf = k.rsplit(".", 1)
                tensors[f"model.{head}.{ADAPTER_NAME}.{leaf}"] = v
            return {"form": "adapter", "tensors": tensors}
        if (path / "model.safetensors").is_file():
            return {"form": "full", "tensors": {"model." + k: v for k, v in load_file(path / "model.safetensors").items()}}
        raise ValueError(
            f"checkpoint {str(path)!r} has no model: neither model.safetensors nor adapter_model.safetensors "
            "(nor a model in state.pt, as older releases wrote)"
        )

    # --- summary and plot --------------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def plot(self, eval_before: dict | None = None, eval_after: dict | None = None) -> Path | None:
        """reward.png: mean reward (and accuracy when known) per step, with the evals as dashed lines."""
        rows = self.read_metrics()
        if not rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        reward = [r["reward_mean"] for r in rows]
        accuracy = [r.get("accuracy") for r in rows]
        if None in accuracy or accuracy != reward:  # a 0/1 reward is the solve rate: one line, not two
            ax.plot(steps, reward, alpha=0.8, label="rollout reward (mean)")
        if None not in accuracy:
            ax.plot(steps, accuracy, alpha=0.8, label="rollout solve rate")
        # The held-out curve: before (step 0), every eval_every steps (evals.jsonl), after.
        held = [(0, eval_before)] if eval_before is not None else []
        held += [(e["step"], e) for e in self.read_evals()]
        if eval_after is not None:
            held.append((steps[-1], eval_after))
        if held:
            ax.plot([s for s, _ in held], [e["accuracy"] for _, e in held], "o-", color="black", lw=1.5,
                    label="held-out solve rate (greedy)")  # fmt: skip
        for name, ev, style in (("before", eval_before, ":"), ("after", eval_after, "--")):
            if ev is not None:
                ax.axhline(ev["accuracy"], linestyle=style, color="gray", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward / accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        out = self.path / "reward.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
