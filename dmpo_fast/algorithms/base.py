"""The interface every algorithm implements, and the rollout buffer it fills.

The trainer (``dmpo_fast.trainer``) owns everything the algorithms share: prompts, rollouts, rewards, the
optimizer, micro-batches, processes, checkpoints and evaluation. An algorithm owns what differs:

    build(policy, rollout, rewards, ...) -> Buffer      once per rollout buffer, no gradient
    loss(policy, buffer_slice, step)     -> LossOutput  once per optimizer step and micro-batch
    log_columns(rows, totals, sums)      -> dict         its columns of the metrics row

plus what it needs (``needs_reference``, ``needs_scorer``) and the checks of its own config fields
(``validate``). Micro-batches and processes must add up to the one-batch loss: a slice's loss uses the
whole step's denominators, which live in ``Buffer.totals`` (summed over processes once, when the buffer is
built), and its random draws are keyed by the rows' global index (``Buffer.meta["first_row"]``).

The buffer has three parts with one rule each:

    rows    [N, ...] tensors, one row per rollout: sliced per micro-batch, concatenated over processes
            for the log
    totals  numbers of the whole step, all processes together (loss denominators, log counts): summed over
            processes once by ``sum_totals``, never sliced
    meta    everything else (seeds, mask id, prompt length, the first row's global index): never sliced or
            summed (a slice shifts ``first_row`` only)

Checkpoints store a buffer as one flat dict (``to_dict``), the format of earlier releases plus a
``buffer_version`` key; ``from_dict`` reads both (an older dict's counts were per process: they are summed
over the saved processes' buffers when a run resumes from one).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dmpo_fast.dmpo import LossOutput, NoiseConfig, completion_mask

if TYPE_CHECKING:
    from dmpo_fast.config import TrainConfig

BUFFER_VERSION = 2


def derive_seed(*parts) -> int:
    """A 62-bit seed from the run seed and a purpose tag: independent streams, reproducible on resume.

    The tags in use ("prompts", "rollout", "elbo", "loss", "eval", and an algorithm's name) are part of
    the published results: changing one changes every run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def completion_positions(rollout, eos_id: int | None, include_eos_padding: bool) -> torch.Tensor:
    """[N, L] bool: the completion positions a loss may mask (``dmpo.completion_mask``); never the prompt."""
    P = rollout.prompt_length
    maskable = torch.zeros_like(rollout.ids, dtype=torch.bool)
    maskable[:, P:] = completion_mask(rollout.ids[:, P:], eos_id, include_eos_padding=include_eos_padding)
    return maskable


def noise_of(cfg: TrainConfig, replicates: int) -> NoiseConfig:
    """The forward-mask settings of the config with ``replicates`` noisy copies per rollout."""
    return NoiseConfig(replicates, cfg.antithetic, cfg.mask_rate_min, cfg.mask_rate_max)


def require_groups(cfg: TrainConfig) -> None:
    """An algorithm that compares the rollouts of a group needs two of them."""
    if cfg.num_generations < 2:
        raise ValueError(
            f"num_generations must be >= 2 for algorithm={cfg.algorithm!r} (it compares the rollouts "
            f"of a group: one rollout has nothing to compare with), got {cfg.num_generations}"
        )


@dataclass
class Buffer:
    """One rollout buffer (or a row slice of one); see the module docstring for the three parts."""

    rows: dict[str, torch.Tensor]
    totals: dict[str, int | float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        lengths = {k: v.shape[0] for k, v in self.rows.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"buffer rows must have one length, got {lengths}")
        self.meta.setdefault("first_row", 0)

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0] if self.rows else 0

    def __getitem__(self, key: str):
        for part in (self.rows, self.totals, self.meta):
            if key in part:
                return part[key]
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return key in self.rows or key in self.totals or key in self.meta

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    @property
    def first_row(self) -> int:
        return self.meta["first_row"]

    def slice(self, start: int, stop: int) -> Buffer:
        """Rows start..stop-1 (whole prompt groups), keeping their global row index."""
        meta = {**self.meta, "first_row": self.first_row + start}
        return Buffer({k: v[start:stop] for k, v in self.rows.items()}, dict(self.totals), meta)

    def to(self, device) -> Buffer:
        return Buffer({k: v.to(device) for k, v in self.rows.items()}, dict(self.totals), dict(self.meta))

    def sum_totals(self, procs) -> None:
        """Replace this process's totals by the sums over every process (one collective, sorted keys)."""
        if procs is None or procs.world == 1 or not self.totals:
            return
        keys = sorted(self.totals)
        summed = procs.sum([float(self.totals[k]) for k in keys])
        self.totals = {k: type(self.totals[k])(v) for k, v in zip(keys, summed, strict=True)}

    def to_dict(self) -> dict:
        """The flat dict a checkpoint stores."""
        return {**self.rows, **self.totals, **self.meta, "buffer_version": BUFFER_VERSION}

    @classmethod
    def from_dict(cls, d: dict, total_keys: tuple[str, ...], *, first_row: int | None = None) -> Buffer:
        """A buffer from a flat dict (a checkpoint's, or a math module's ``make_buffer``): ``total_keys`` name
        the totals, tensors with the rows' length are rows, everything else is metadata; ``first_row`` sets
        the rows' global index when the dict does not hold it."""
        version = d.get("buffer_version", 1)
        if version > BUFFER_VERSION:
            raise ValueError(
                f"the checkpoint's rollout buffer has format {version}, newer than this dmpo_fast reads "
                f"({BUFFER_VERSION}): upgrade dmpo_fast, or resume from a checkpoint at a multiple of "
                "num_iterations (those start a new buffer)"
            )
        n = d["ids"].shape[0]
        rows = {k: v for k, v in d.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n}
        totals = {k: d[k] for k in total_keys if k in d}
        meta = {k: v for k, v in d.items() if k not in rows and k not in totals and k != "buffer_version"}
        if first_row is not None:
            meta["first_row"] = first_row
        return cls(rows, totals, meta)


def merge_for_log(parts: list[Buffer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every process's per-rollout values ([N] rows), concatenated in rank order, and the step's totals."""
    rows = {k: torch.cat([p.rows[k].cpu() for p in parts]) for k, v in parts[0].rows.items() if v.dim() == 1}
    return rows, dict(parts[0].totals)


class Algorithm:
    """One RL algorithm behind the trainer's loop (see the module docstring).

    Subclasses set ``name`` (the ``algorithm`` config value), ``total_keys`` (the buffer's totals, for
    reading checkpoints) and ``summed_stats`` (loss statistics besides ``masked_tokens`` that the trainer
    adds up over micro-batches and processes), and implement ``build``, ``loss`` and ``log_columns``.
    """

    name: ClassVar[str]
    total_keys: ClassVar[tuple[str, ...]] = ("n_failed",)
    summed_stats: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.group_size = cfg.num_generations
        self.seed = cfg.seed
        self.impl = cfg.impl

    # ---- config ----------------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        """Check this algorithm's own config fields (always), and what it needs when it is the one chosen
        (``cfg.algorithm == cls.name``). Raise ``ValueError`` naming the field and the allowed values."""

    # ---- what it needs -----------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return False

    @property
    def needs_scorer(self) -> bool:
        return False

    def notes(self) -> list[str]:
        """Warnings the trainer shows once at the start of a run."""
        return []

    def rollout_tts(self, policy, scorer) -> dict | None:
        """``generate_tts`` options for the training rollouts (``mro_rs``: step-wise group sampling); None:
        the run's sampler alone."""
        return None

    # ---- the work ------------------------------------------------------------------------------------
    def build(self, policy, rollout, rewards: torch.Tensor, *, reference, scorer, buffer_index: int,
              first_row: int, solved: torch.Tensor | None = None) -> Buffer:  # fmt: skip
        """The buffer of one batch of rollouts (``rewards`` [N], NaN = failed) on the rollout's device.
        ``reference`` is a zero-argument callable returning a context manager that yields the reference
        model; ``first_row`` the global index of this batch's first rollout; ``solved`` [N] the task's 0/1
        judgement of each rollout (None where the caller has none)."""
        raise NotImplementedError

    def loss(self, policy, buf: Buffer, step: int) -> LossOutput:
        """The loss of optimizer step ``step`` on a buffer or a row slice of it (on the policy's device);
        its stats hold ``masked_tokens`` and ``summed_stats`` as detached tensors."""
        raise NotImplementedError

    def log_columns(self, rows: dict[str, torch.Tensor], totals: dict, sums: dict) -> dict:
        """This algorithm's columns of the metrics row, from the step's merged rows, its totals and the loss
        sums (``masked_tokens`` and ``summed_stats`` over micro-batches and processes)."""
        return {}

    def from_saved(self, parts: list[dict]) -> list[Buffer]:
        """The saved buffers of a checkpoint (one flat dict per process) as buffers."""
        bufs = [Buffer.from_dict(p, self.total_keys) for p in parts]
        if bufs and parts[0].get("buffer_version", 1) < 2:  # per-process counts: sum them now
            summed = {k: sum(b.totals.get(k, 0) for b in bufs) for k in _LEGACY_COUNTS if k in bufs[0].totals}
            for b in bufs:
                b.totals.update(summed)
        return bufs


# Counts that buffers of format 1 held per process (their denominators were whole-step values already).
_LEGACY_COUNTS = ("n_failed", "dropped", "tied_groups")
