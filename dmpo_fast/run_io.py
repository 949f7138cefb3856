"""The output directory of a run: metrics, checkpoints, summary and plot, written so nothing is lost.

    output_dir/
      config.yaml            the full config of the run
      metrics.jsonl          one JSON line per optimizer step (appended, flushed each line)
      summary.json           eval_before / eval_after, steps, wall_seconds, config (written at the end)
      reward.png             reward and accuracy over steps
      tb/                    TensorBoard events (when tensorboard is installed and enabled)
      checkpoints/step-000010/ ...   the newest ``keep`` checkpoints

Every file that replaces an older one is written to a temporary name in the same directory and then
renamed (atomic on POSIX), so a run killed at any instant leaves the last good checkpoint intact; the
temporaries a kill leaves behind are removed when the run directory is opened again. A checkpoint carries a
``manifest.json`` with the size and SHA-256 of each of its files: ``latest_checkpoint`` returns the newest
checkpoint that matches its manifest and names, in a warning, each newer one it skipped. A write that runs
out of disk space removes what it wrote and raises ``DiskFullError`` naming the directory and the bytes
needed. A non-empty output directory is never overwritten unless the run resumes from it (docs/reliability.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "step-"
MODEL_INFO = "dmpo_fast.json"  # a checkpoint's model: its form (full / adapter), base model, quantization
ADAPTER_NAME = "default"  # PEFT's adapter name in the policy; adapter files leave it out of the names
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"  # a checkpoint being written (or the one it replaces)


class DiskFullError(OSError):
    """A write of the run directory ran out of space; what it had written is removed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-", suffix=".tmp")  # noqa: SIM115
            probe.close()
        except OSError as e:
            raise ValueError(
                f"output_dir {str(self.path)!r} cannot be created or written: {e.strerror or e}"
            ) from e
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        """Delete what a killed run left half written: checkpoint directories being written (``.tmp-*``,
        up to a whole checkpoint each) and the temporary files of atomic writes. Main process only."""
        if not self.main:
            return
        for parent in (self.path, self.checkpoints):
            if not parent.is_dir():
                continue
            for p in parent.iterdir():
                if p.name.startswith(TEMP_PREFIX) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)

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
    def checkpoint_dirs(self) -> list[Path]:
        """Every checkpoint directory, oldest first (intact or not)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            p for p in self.checkpoints.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()
        )

    def latest_checkpoint(self) -> Path | None:
        """The newest intact checkpoint (``checkpoint_problem``), or None. Newer checkpoints that fail the
        check are skipped with one warning that names each and why."""
        skipped = []
        for path in reversed(self.checkpoint_dirs()):
            problem = checkpoint_problem(path)
            if problem is None:
                break
            skipped.append(f"{path.name} ({problem})")
        else:
            path = None
        if skipped:
            use = f"using {path.name}" if path is not None else "no intact checkpoint is left"
            warnings.warn(
                f"skipped checkpoint(s) in {str(self.checkpoints)!r} that fail verification: {'; '.join(skipped)}; "
                f"{use}",
                stacklevel=2,
            )
        return path

    def discard_checkpoints_after(self, step: int) -> None:
        """Remove the checkpoints newer than ``step`` (the ones a resume skipped as damaged): the run writes
        those steps again, and pruning to the newest ``keep`` must never count a damaged one."""
        for path in self.checkpoint_dirs() if self.main else ():
            if checkpoint_step(path) > step:
                shutil.rmtree(path, ignore_errors=True)

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int, write_files=None) -> Path:
        """Write ``state`` (tensors / picklable objects) as checkpoints/step-NNNNNN atomically: a hidden
        temporary directory with the model's files (``write_files``, a function of the folder:
        ``checkpointing.save_model_files``), state.pt, step.json and their manifest, renamed into place once
        complete.
        Out of disk space, the temporary is removed and ``DiskFullError`` says where and how much."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=TEMP_PREFIX))
            if write_files is not None:  # the model's files, inside the manifest like state.pt
                write_files(tmp)
            torch.save(state, tmp / "state.pt")
            _fsync(
                tmp / "state.pt"
            )  # a delayed-allocation file system reports a full disk here, not in write
            atomic_write_text(tmp / "step.json", json.dumps({"step": step}))
            write_manifest(tmp)
        except BaseException as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if _out_of_space(e):
                raise self._disk_full(f"checkpoint {final.name}", _state_bytes(state)) from e
            raise
        if final.exists():  # the same step written again: move the old one aside, then replace it
            old = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=TEMP_PREFIX))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(self.checkpoints)
        for old in self.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _disk_full(self, what: str, needed: int | None) -> DiskFullError:
        free = shutil.disk_usage(self.checkpoints if self.checkpoints.is_dir() else self.path).free
        need = f"needs about {_bytes(needed)}, " if needed else ""
        intact = self.latest_checkpoint()
        kept = (
            f"the last checkpoint, {intact.name}, is intact"
            if intact is not None
            else "no checkpoint was written"
        )
        return DiskFullError(
            f"the disk is full: writing {what} in {str(self.checkpoints)!r} {need}{_bytes(free)} free. Nothing "
            f"partial was left and {kept}: free some space, then resume the run (--resume)"
        )

    @staticmethod
    def load_checkpoint(path: Path, *, verify: bool = True, with_model: bool = True) -> dict[str, Any]:
        """The state of checkpoint directory ``path``; a damaged one (``checkpoint_problem``, checked unless
        ``verify=False`` says it just was) is a ``ValueError`` naming it, never an EOFError. With
        ``with_model`` its ``"model"`` too: the policy's state dict of the fine-tuned tensors (every parameter
        after full fine-tuning, the adapter's after LoRA), read from the model files (older releases kept it
        in state.pt)."""
        path = Path(path)
        problem = checkpoint_problem(path) if verify else None
        if problem is not None:
            raise ValueError(f"checkpoint {str(path)!r} is damaged: {problem}")
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
            raise ValueError(f"checkpoint {str(path / 'state.pt')!r} cannot be read: {e}") from e
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
            tensors = load_file(path / "model.safetensors")
            return {"form": "full", "tensors": {"model." + k: v for k, v in tensors.items()}}
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


# --- checkpoint verification ---------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory ``path`` (from its name, step-NNNNNN)."""
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def write_manifest(path: Path) -> None:
    """``path``/manifest.json: the size and SHA-256 of every file in checkpoint directory ``path``."""
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(path.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    atomic_write_text(path / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint directory ``path`` cannot be trusted, or None when it is intact: each file of its
    manifest is there with the recorded size and SHA-256. A checkpoint of an earlier release (no manifest)
    is trusted when its state.pt is a complete zip archive (torch.save's format; a file cut short is not)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        state = path / "state.pt"
        if not state.is_file():
            return "state.pt is missing"
        return None if zipfile.is_zipfile(state) else "state.pt is cut short or not a torch checkpoint"
    try:
        files = json.loads(manifest.read_text())["files"]
        records = [(name, int(r["bytes"]), str(r["sha256"])) for name, r in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    if "state.pt" not in files:
        return f"{MANIFEST} lists no state.pt"
    for name, size, _ in records:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for name, _, digest in records:  # sizes first: a cut-short file is found without reading anything
        if _sha256(path / name) != digest:
            return f"{name} does not match its SHA-256"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _out_of_space(e: BaseException) -> bool:
    """Whether ``e`` is a write that ran out of space: ENOSPC / EDQUOT, or torch.save's zip writer failing
    on a short write ("[enforce fail at inline_container.cc:...] unexpected pos ...")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("unexpected pos", "No space left", "file write failed")
    )


def _state_bytes(state) -> int:
    """The bytes of the tensors in a nested state (what state.pt needs, give or take its pickle)."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _bytes(n: int) -> str:
    """``n`` bytes as "1.5 GiB (1610612736 bytes)"."""
    if n < 1024:
        return f"{n} bytes"
    scaled, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while scaled >= 1024 and len(units) > 1:
        scaled, units = scaled / 1024, units[1:]
    return f"{scaled:.1f} {units[0]} ({n} bytes)"
