"""``TrainConfig``: every option of a run as a typed, validated dataclass.

Loaded from YAML (``TrainConfig.from_yaml``), overridden by ``key=value`` strings
(``TrainConfig.with_overrides``: values are parsed as YAML scalars, so ``alpha=0.04``,
``lora=true``, ``ess_target=null`` do what they say), and validated in ``__post_init__``: a bad field
raises ``ValueError`` naming the field and the allowed values. A config is never mutated after
validation; ``replace`` returns a new, re-validated one.

The defaults are the embedded run: DMPO on the built-in tiny model and the 4x4 Sudoku task, on CPU.
DMPO's defaults are defined once, in ``dmpo_fast.algorithms.dmpo.DMPOOptions`` (which ``DMPOLoss`` and the
TRL ``DMPOConfig`` share): alpha 0.04 and 4 antithetic mask replicates with rate in [0.1, 1.0) as in the
paper and its reference code; no weight baseline ("none", where the paper uses "individual") and groups
whose rollouts all scored the same dropped, because the paper's settings made the 0.8M-parameter model worse
(docs/default_run.md). The run itself also differs: F = 2 instead of 8, and 32 prompts per buffer so an
update never rests on a handful of sequences. The recipes in configs/ carry the paper's values for the 7-8B
models.

Each algorithm checks its own fields (``Algorithm.validate`` in ``dmpo_fast.algorithms``); the fields shared
by every run are checked here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmpo_fast.algorithms.dmpo import DEFAULTS as DMPO_DEFAULTS

# The registry dmpo_fast.algorithms.ALGORITHMS holds exactly these names (tests/test_algorithms.py checks).
Algorithm = Literal["dmpo", "mro", "diffu_grpo", "rejection_sft", "wd1", "mro_rs"]
LossName = Literal["wdce", "wddo"]
BaselineName = Literal["none", "group", "individual", "model"]
SamplerName = Literal["llada", "fast_dllm", "roar"]
CacheName = Literal["none", "prefix", "dual"]
Remasking = Literal["low_confidence", "random"]
Reference = Literal["adapter_disabled", "frozen_copy", "none"]
Scheduler = Literal["constant", "constant_with_warmup", "cosine", "linear"]
DType = Literal["float32", "bfloat16", "float16"]
ImplName = Literal["auto", "triton", "native", "chunked", "eager"]
ScaleRewards = Literal["none", "std"]
GRPONormalize = Literal["token", "sequence"]
Verification = Literal["leave_one_out", "pre_step", "final"]
VerificationScore = Literal["prob", "logprob"]
VerificationTokens = Literal["all", "one"]
PPLText = Literal["visible", "prefix"]
Shaping = Literal["none", "potential"]
Returns = Literal["reward_to_go", "window"]
Importance = Literal["none", "uniform", "advantage"]
RewardPreset = Literal["default", "d1"]  # = tasks.presets.REWARD_PRESETS (tests/test_rewards.py checks)
MROBaseline = Literal["none", "group"]
MROAnchor = Literal["none", "denoise", "best", "kl"]
WindowReward = Literal["sum", "mean"]
RSKeep = Literal["best", "solved"]


# The task options used when task_kwargs is None. The embedded Sudoku run rewards a solved grid (1) or not
# (0): the papers' cell reward pays for near misses, and DMPO's per-group softmax then trains on the best
# wrong answer of a group that solved nothing (docs/default_run.md). Other tasks keep their own defaults.
DEFAULT_TASK_KWARGS: dict[str, dict] = {"sudoku": {"reward_type": "solved"}}

# Defaults that depend on the algorithm: (the default, {algorithm: its own}) of a field left at None. They
# are resolved when the config is made, so a saved config holds the number.
ALGORITHM_DEFAULTS: dict[str, tuple[object, dict[str, object]]] = {
    # MRO's REINFORCE loss has no policy ratio: one optimizer step per buffer keeps it on-policy.
    "num_iterations": (2, {"mro": 1}),
    # Sudoku probes with the tiny model (docs/mro.md): at 3e-4 MRO's per-step REINFORCE and wd1's summed
    # one-step log-likelihoods wear the denoiser down (wd1 0.435 -> 0.000 held-out in 15 buffers), and MRO
    # still loses 5-7 points in 20 steps at 1e-4; at 3e-5 both keep it.
    "learning_rate": (3e-4, {"mro": 3e-5, "wd1": 3e-5}),
    # MRO's rejection sampling ranks by the multi-reward, so in a group that solved nothing it keeps the most
    # confident failure; SFT on those wore the tiny Sudoku model down (0.435 -> 0.180 held-out in 30 steps at
    # 3e-4, 0.420 when only solved rollouts were kept; docs/mro.md). Plain rejection_sft keeps every best.
    "rs_keep": ("best", {"mro_rs": "solved"}),
}

# Fields added after runs were saved without them, with the value that reproduces such a run: a saved config
# that lacks one had this behaviour, not the field's default. ``from_saved`` fills them in, and a resume
# that would change one is refused like any other change.
SAVED_WITHOUT: dict[str, object] = {
    "mro_anchor": "none",
    "mro_verification_tokens": "all",
    "mro_tts_vote": False,
    "mro_states_per_window": None,
    "mro_verification_steps": None,
    "rs_keep": "best",
}

# The largest eval_size: the held-out rows are built in memory before the first step (GSM8K's test set has
# 1319 rows, MATH-500's 500; the procedural tasks draw as many as asked, 1e8 of them never finishes).
MAX_EVAL_SIZE = 100_000


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    model: str = "tiny"  # "tiny" (built in), a local directory or a hub name
    trust_remote_code: bool = False  # needed for models whose code lives in the checkpoint (Dream)
    dtype: DType = "float32"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    task: str = "sudoku"  # a registered task name or "package.module:TaskClass"
    # None: the task's options of the embedded run (DEFAULT_TASK_KWARGS); see task_options().
    task_kwargs: dict | None = None
    chat_template: bool = (
        True  # wrap prompts in the tokenizer's chat template when it has one (instruct models)
    )
    reward_funcs: list = field(default_factory=list)  # extra TRL-style rewards: import paths or functions
    reward_preset: RewardPreset = "default"  # the task's rewards: its own, or d1's (the DMPO paper's scale)
    reward_timeout: float = 60.0  # seconds a reward function may take on a batch (0: no limit)
    algorithm: Algorithm = "dmpo"
    loss: LossName = DMPO_DEFAULTS.loss

    # --- rollouts ------------------------------------------------------------------------------
    prompts_per_step: int = 32
    num_generations: int = 8  # group size G: rollouts per prompt
    sampler: SamplerName = "fast_dllm"
    cache: CacheName = "prefix"
    gen_length: int = 24
    block_length: int = 24
    steps: int = 12  # denoising steps for the whole completion
    temperature: float = 0.7
    remasking: Remasking = "low_confidence"
    threshold: float | None = None  # fast_dllm confidence threshold (None: fixed tokens per step)

    # --- DMPO ----------------------------------------------------------------------------------
    num_iterations: int | None = None  # F: optimizer steps per rollout buffer (None: ALGORITHM_DEFAULTS)
    num_replicates: int = DMPO_DEFAULTS.num_replicates  # noisy copies per rollout in the loss
    elbo_replicates: int = DMPO_DEFAULTS.elbo_replicates  # noisy copies per rollout for log p_ref / log p_old
    antithetic: bool = DMPO_DEFAULTS.antithetic
    mask_rate_min: float = DMPO_DEFAULTS.mask_rate_min
    mask_rate_max: float = DMPO_DEFAULTS.mask_rate_max
    alpha: float = DMPO_DEFAULTS.alpha
    coeff: float = DMPO_DEFAULTS.coeff
    ess_target: float | None = DMPO_DEFAULTS.ess_target
    baseline: BaselineName = DMPO_DEFAULTS.baseline
    centering_strength: float = DMPO_DEFAULTS.centering_strength
    include_eos_padding: bool = DMPO_DEFAULTS.include_eos_padding
    drop_tied_groups: bool = DMPO_DEFAULTS.drop_tied_groups  # weight 0 for all-tied groups (DAPO's filter)
    ddo_beta: float = DMPO_DEFAULTS.ddo_beta
    ddo_a: float = DMPO_DEFAULTS.ddo_a
    ddo_independent_sets: bool = DMPO_DEFAULTS.ddo_independent_sets
    reference: Reference = "frozen_copy"

    # --- diffu-GRPO (algorithm: diffu_grpo; μ is num_iterations, the reference is `reference`) ----
    grpo_epsilon: float = 0.2
    grpo_beta: float = 0.04
    grpo_p_mask_prompt: float = 0.15
    grpo_random_masking: bool = True
    grpo_scale_rewards: ScaleRewards = "none"
    grpo_normalize: GRPONormalize = "token"

    # --- MRO (algorithm: mro; SGRO over windows of denoising steps) -----------------------------
    mro_window: int = 8
    mro_verification: Verification = "leave_one_out"
    mro_verification_score: VerificationScore = "prob"  # logprob (the paper's Eq. 4) scored worse here
    mro_verification_tokens: VerificationTokens = "one"  # the paper verifies one sampled token per step
    mro_verification_steps: int | None = 1  # steps per window whose token is verified (None: every step)
    mro_tv_weight: float = 1.0
    mro_ppl_weight: float | None = None  # None: 1 when there is a perplexity scorer (ppl_model), else 0
    # A causal LM (hub name or directory) scoring the perplexity reward; "auto": the task's built-in scorer.
    mro_ppl_model: str | None = "auto"
    mro_ppl_text: PPLText = "visible"
    mro_task_weight: float = 1.0
    mro_shaping: Shaping = "none"
    mro_returns: Returns = "reward_to_go"
    mro_window_reward: WindowReward = "sum"  # "mean": averaged over the window's steps
    mro_scale_rewards: ScaleRewards = "none"
    # The loss's states are sampled, each reweighted so the loss stays unbiased: one window per rollout,
    # one state of it (with mro_verification_steps=1, an MRO buffer costs 1.2x a DMPO one; docs/mro.md).
    mro_importance: Importance = "uniform"
    mro_windows_per_rollout: int = 1
    mro_states_per_window: int | None = 1  # states of each window run in the loss per step (None: all)
    mro_baseline: MROBaseline = "group"
    mro_anchor: MROAnchor = "best"  # the masked-diffusion loss of each group's best rollout next to SGRO
    mro_anchor_weight: float = 1.0
    mro_tts_vote: bool = True  # test-time scaling: the majority-vote quality reward on the final candidates
    mro_rs_window: int = 4  # algorithm mro_rs: model calls between the branch points of a rollout group
    # --- rejection sampling (algorithm: rejection_sft; MRO's SFT on each group's best rollout) ----
    rs_min_reward: float | None = None  # keep a group's best only when its reward is at least this
    rs_keep: RSKeep | None = None  # "solved": keep a group's best only when solved (None: ALGORITHM_DEFAULTS)
    # --- wd1 (algorithm: wd1; ratio-free weighted likelihood, μ is num_iterations) ---------------------
    wd1_psi: float = 1.0
    wd1_negative_weight: float = 1.0
    wd1_p_mask_prompt: float = 0.15
    wd1_random_masking: bool = True

    # --- optimisation --------------------------------------------------------------------------
    learning_rate: float | None = None  # None: ALGORITHM_DEFAULTS (3e-4; MRO and wd1 3e-5)
    lr_scheduler: Scheduler = "constant_with_warmup"
    warmup_steps: int = 2
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_steps: int = 120
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "attn_out"])
    load_in_4bit: bool = False  # QLoRA: the base in 4-bit NF4 (bitsandbytes), LoRA on top (needs lora)
    load_in_8bit: bool = False  # the base in 8-bit LLM.int8 (bitsandbytes), LoRA on top (needs lora)
    gradient_checkpointing: bool = False
    undo_non_finite: bool = True  # copy the trainable parameters and AdamW state before each step to undo it
    fsdp: bool = False  # shard over the processes with FSDP2 (also on with accelerate's FSDP configs)
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2 (False) with fsdp
    impl: ImplName = "auto"
    seed: int = 0

    # --- evaluation, logging, checkpoints ------------------------------------------------------
    eval_size: int = 200
    eval_every: int = 30  # steps between evaluations during training (0: only before and after)
    eval_temperature: float = 0.0
    eval_tts_k: int = 0  # test-time scaling: candidates per prompt (0: plain decoding)
    eval_tts_window: int = 4  # test-time scaling: model calls between branch points
    output_dir: str = "runs/dmpo-sudoku"
    save_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = False
    tensorboard: bool = True  # false drops "tensorboard" from report_to
    report_to: str | list = "tensorboard"  # tracking.REPORT_TO: tensorboard, wandb, trackio, mlflow, comet_ml, none
    log_completions_every: int = 30  # steps between tables of sample completions (0: never)
    plot: bool = True
    progress: bool = True

    def __post_init__(self):
        defaulted = []
        for name, (default, per_algorithm) in ALGORITHM_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, per_algorithm.get(self.algorithm, default))
                defaulted.append(name)
        # Not a field: replace() leaves these to the new algorithm's defaults unless it sets them.
        object.__setattr__(self, "_algorithm_defaulted", tuple(defaulted))
        _check_types(self)
        positive = [
            "prompts_per_step", "num_generations", "gen_length", "block_length", "steps", "num_iterations",
            "num_replicates", "elbo_replicates", "gradient_accumulation_steps", "max_steps", "lora_r",
            "eval_size", "save_every", "keep_checkpoints", "mro_window", "mro_windows_per_rollout",
            "eval_tts_window",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("mro_states_per_window", "mro_verification_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be an int >= 1 or null (every step), got {getattr(self, name)!r}"
                )
        for name in ("warmup_steps", "eval_every", "seed", "eval_tts_k", "log_completions_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.seed >= 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed}")
        if self.eval_size > MAX_EVAL_SIZE:
            raise ValueError(
                f"eval_size must be at most {MAX_EVAL_SIZE} (the held-out rows are built in memory before "
                f"training starts), got {self.eval_size}"
            )
        if self.steps > self.gen_length:
            raise ValueError(
                f"steps ({self.steps}) must be <= gen_length ({self.gen_length}): each denoising step commits "
                "at least one token"
            )
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError(FLOAT16_ON_CPU)
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})"
            )
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the number of blocks ({blocks})")
        if self.reference == "adapter_disabled" and not self.lora:
            raise ValueError(
                "reference='adapter_disabled' needs lora=true (the base model is the adapter-off policy)"
            )
        if self.temperature < 0 or self.eval_temperature < 0:
            raise ValueError("temperature and eval_temperature must be >= 0")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or null, got {self.threshold}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(
                f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self._check_quantization()
        from dmpo_fast.tracking import report_to_names

        report_to_names(self.report_to)
        self._check_rewards()
        from dmpo_fast.algorithms import ALGORITHMS

        for algorithm in ALGORITHMS.values():  # each checks its own fields, and its needs when chosen
            algorithm.validate(self)

    def _check_quantization(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: set at most one of them to true")
        flag = "load_in_4bit" if self.load_in_4bit else "load_in_8bit" if self.load_in_8bit else None
        if flag is None:
            return
        if not self.lora:
            raise ValueError(
                f"{flag}=true needs lora=true: a quantized base is frozen and cannot be trained in full "
                f"(set lora=true to train an adapter on it, or {flag}=false)"
            )
        if self.fsdp:
            raise ValueError(
                f"{flag}=true does not work with fsdp=true: FSDP cannot shard bitsandbytes' quantized weights "
                "(a 4-bit 8B base fits one GPU; use data parallelism, configs/accelerate/ddp.yaml)"
            )

    def _check_rewards(self) -> None:
        from dmpo_fast.tasks import answers, get_task, reward_path

        if not (0 <= self.reward_timeout < float("inf")):
            raise ValueError(
                "reward_timeout must be a finite number of seconds >= 0 (0: no limit), got "
                f"{self.reward_timeout!r}"
            )
        for fn in self.reward_funcs:
            if isinstance(fn, str) and fn.strip():
                continue
            if not callable(fn):
                raise ValueError(
                    f"reward_funcs must hold import paths 'module:function' or functions, got {fn!r}"
                )
            if reward_path(fn) is None:
                raise ValueError(
                    f"reward_funcs: {fn!r} has no import path, so config.yaml could not record it (a "
                    "lambda, a nested function, a partial or an instance): define it at the top level of a "
                    "module, or "
                    "give its path 'module:function'"
                )
        if self.task in ("gsm8k", "math500"):
            try:
                answers.require_math_verify(self.task)
            except ImportError as e:
                raise ValueError(f"task={self.task!r}: {e}") from None
        if "reward_preset" in (self.task_kwargs or {}):
            raise ValueError("set the reward preset with the field reward_preset, not in task_kwargs")
        if self.reward_preset != "default":
            if self.task not in ("countdown", "gsm8k", "math500", "sudoku"):
                raise ValueError(
                    f"reward_preset={self.reward_preset!r} is defined for the built-in tasks countdown, "
                    f"gsm8k, math500 and sudoku, not task={self.task!r}"
                )
            try:  # the task checks that its options fit the preset (e.g. prompt_style instruct)
                get_task(self.task, **self.task_options())
            except ValueError as e:
                raise ValueError(f"reward_preset={self.reward_preset!r}, task={self.task!r}: {e}") from None

    # ---------------------------------------------------------------------------------------------
    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def ppl_model(self) -> str | None:
        """MRO's perplexity scorer: mro_ppl_model, where "auto" is the task's built-in scorer
        (``dmpo_fast.assets.TINY_AR_SCORERS``: Sudoku and Countdown) and None for any other task."""
        if self.mro_ppl_model != "auto":
            return self.mro_ppl_model
        from dmpo_fast.assets import TINY_AR_SCORERS

        return next((name for name, task in TINY_AR_SCORERS.items() if task == self.task), None)

    @property
    def effective_ppl_weight(self) -> float:
        """λ_ppl of MRO's perplexity reward: mro_ppl_weight, or (null) 1 with a scorer (ppl_model), else 0."""
        if self.mro_ppl_weight is not None:
            return float(self.mro_ppl_weight)
        return 1.0 if self.ppl_model is not None else 0.0

    def task_options(self) -> dict:
        """The task's constructor options: ``task_kwargs``, or for None the embedded defaults of the task, and
        ``reward_preset`` when it is not "default"."""
        given = self.task_kwargs if self.task_kwargs is not None else DEFAULT_TASK_KWARGS.get(self.task, {})
        options = dict(given)
        if self.reward_preset != "default":
            options["reward_preset"] = self.reward_preset
        return options

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (config.yaml, checkpoints): a reward function given as a function
        appears as its import path."""
        from dmpo_fast.tasks import reward_path

        d = dataclasses.asdict(self)
        d["reward_funcs"] = [f if isinstance(f, str) else reward_path(f) for f in self.reward_funcs]
        return d

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``; fields that took their algorithm's default (``ALGORITHM_DEFAULTS``) take
        the new algorithm's unless ``changes`` sets them."""
        _check_names(changes)
        return dataclasses.replace(self, **{**dict.fromkeys(self._algorithm_defaulted), **changes})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a mapping of field names to values, got {type(d).__name__}")
        _check_names(d)
        return cls(**{k: _coerce_number(k, v) for k, v in d.items()})

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of a saved run (a checkpoint's or its ``config.yaml``): ``from_dict``, with the
        fields the run predates set to the behaviour it had (``SAVED_WITHOUT``)."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a mapping of field names to values, got {type(d).__name__}")
        return cls.from_dict({**{k: v for k, v in SAVED_WITHOUT.items() if k not in d}, **d})

    @classmethod
    def from_yaml(cls, path: str | Path, *, saved: bool = False) -> TrainConfig:
        """A YAML file of fields; ``saved``: a run's own ``config.yaml`` (``from_saved``)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {str(path)!r} cannot be read: {e}") from e
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(
                f"config file {str(path)!r} must hold a mapping of field names to values, got "
                f"{type(data).__name__}"
            )
        try:
            return cls.from_saved(data) if saved else cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{e} (in config file {str(path)!r})") from e

    def with_overrides(self, overrides: list[str], **changes) -> TrainConfig:
        """Apply ``key=value`` strings; values are parsed as YAML (``3``, ``0.1``, ``true``, ``null``, ``[a, b]``).

        ``changes`` (field values, e.g. from command-line options) are applied in the same step, so the checks
        that relate fields see both; an override wins over a change of the same field."""
        import yaml

        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            key, raw = item.split("=", 1)
            try:
                changes[key.strip()] = _parse_value(raw)
            except yaml.YAMLError as e:
                raise ValueError(
                    f"override {item!r}: {key.strip()} is not a YAML value ({_yaml_problem(e)})"
                ) from e
        return self.replace(**changes)


def _yaml_problem(e) -> str:
    """A YAML error as "line L, column C: problem" (PyYAML counts from 0; editors from 1)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if "\\t" in problem:  # PyYAML: "found character '\\t' that cannot start any token"
        problem += " (a tab: YAML indents and separates with spaces)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _parse_value(raw: str):
    """A YAML scalar, except that numbers YAML 1.1 leaves as strings ("1e-5", "3E-6") become floats."""
    import yaml

    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return (
                float(value)
                if any(c in value for c in ".eE") and value.strip().lower() not in ("inf", "nan")
                else value
            )
        except ValueError:
            return value
    return value


def _coerce_number(name: str, value):
    """YAML 1.1 reads ``3e-6`` (no dot) as a string: turn such strings into floats for number fields."""
    if isinstance(value, str) and float in typing.get_args(typing.get_type_hints(TrainConfig)[name]) + (
        typing.get_type_hints(TrainConfig)[name],
    ):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_names(d: dict) -> None:
    known = set(field_names())
    unknown = sorted((str(k) for k in set(d) - known), key=str)
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown config field(s): {', '.join(hints)}")


FLOAT16_ON_CPU = (
    "dtype='float16' on the CPU gives NaN parameters after a few steps (CPU float16 matmuls overflow and "
    "round badly): use dtype='float32' or 'bfloat16' on the CPU"
)


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        ok, allowed = _matches(value, hints[f.name])
        if not ok:
            raise ValueError(f"{f.name} must be {allowed}, got {value!r}")
        # No field has a use for inf or NaN: learning_rate=.inf or max_grad_norm=.nan pass every comparison
        # below (or fail none) and write NaN parameters.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")


def _matches(value, hint) -> tuple[bool, str]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return value in choices, "one of " + ", ".join(repr(c) for c in choices)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, h) for h in typing.get_args(hint)]
        return any(ok for ok, _ in results), " or ".join(a for _, a in results)
    if hint is type(None):
        return value is None, "null"
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an int"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    if hint is dict or origin is dict:
        return isinstance(value, dict), "a mapping"
    if hint is list or origin is list:
        return isinstance(value, list), "a list"
    return True, str(hint)


# One line per field: what it does (the CLI's ``dmpo-fast config --markdown`` and docs/config.md use it).
FIELD_DOCS: dict[str, str] = {
    "model": '"tiny" (the built-in Sudoku model), "tiny_countdown" (once built by scripts/pretrain_tiny.py '
    "--task countdown), a local checkpoint directory, or a hub name (LLaDA, Dream, other HF dLLMs)",
    "trust_remote_code": "allow model code shipped with the checkpoint (Dream needs it; LLaDA never does)",
    "dtype": "parameter dtype: float32, bfloat16 or float16 (not on the CPU: its float16 math gives NaNs)",
    "device": '"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; under accelerate each process takes its own',
    "task": 'a registered task (sudoku, countdown, gsm8k, math500) or "package.module:TaskClass"',
    "task_kwargs": "keyword arguments of the task's constructor (e.g. {prompt_style: instruct}); null: the "
    "embedded defaults (sudoku: {reward_type: solved}; other tasks: their own)",
    "chat_template": "wrap prompts in the tokenizer's chat template when it has one (instruct models)",
    "reward_funcs": (
        "extra TRL-style rewards fn(prompts, completions, **columns), summed with the task reward: import "
        'paths "module:function" (looked up on sys.path, then in the current directory) or, from Python, '
        "module-level functions (recorded in config.yaml by their path); each one's mean is logged as "
        "rewards/<name>/mean"
    ),
    "reward_preset": (
        "the task's reward functions: default (its own, at most 1.1) or d1 (d1's, as DMPO's reference code: "
        "up to 4.0 on gsm8k, 3.0 on math500; countdown and sudoku need task_kwargs prompt_style instruct); "
        "see 'Reward scale' below"
    ),
    "reward_timeout": (
        "seconds a reward function may take on a batch; past it, its samples count as failed (weight 0, "
        "reward_failures) and the call is abandoned in a daemon thread; 0: no limit (the main thread)"
    ),
    "algorithm": (
        "dmpo, mro (step rewards + SGRO, docs/mro.md), diffu_grpo (d1's clipped GRPO), rejection_sft "
        "(masked-diffusion SFT on each group's best rollout), wd1 (ratio-free weighted likelihood, arXiv "
        "2507.08838) or mro_rs (MRO's rejection sampling: step-wise group sampling, the best by the multi-reward, "
        "masked-diffusion SFT on it)"
    ),
    "loss": "wdce (weighted denoising cross-entropy) or wddo (weighted direct discriminative optimisation)",
    "prompts_per_step": "prompts per rollout buffer, all processes together (a multiple of the process count)",
    "num_generations": "G: rollouts per prompt, the group of the per-prompt softmax",
    "sampler": "llada (fixed steps), fast_dllm (confidence-parallel, KV cache) or roar (one token per step, exact log-probs)",
    "cache": "fast_dllm KV cache: none, prefix or dual",
    "gen_length": "completion tokens generated per rollout",
    "block_length": "semi-autoregressive block size (gen_length must be a multiple)",
    "steps": "denoising steps for the whole completion (a multiple of the number of blocks)",
    "temperature": "rollout sampling temperature (Gumbel-max)",
    "remasking": "which tokens a step commits: low_confidence or random",
    "threshold": "fast_dllm confidence threshold (null: the fixed schedule of `steps`)",
    "num_iterations": (
        "F (DMPO) or μ (diffu-GRPO, wd1): optimizer steps per rollout buffer (off-policy reuse, fresh masks "
        "each step); null: 2, or 1 for mro (its REINFORCE loss has no policy ratio: 1 keeps it on-policy)"
    ),
    "num_replicates": "noisy copies of each rollout in the loss",
    "elbo_replicates": "noisy copies of each rollout for the ELBO of log p_ref and log p_old",
    "antithetic": "pair each mask with its complement (even replicate counts)",
    "mask_rate_min": "lower end of the per-row mask rate U[min, max)",
    "mask_rate_max": "upper end of the per-row mask rate U[min, max)",
    "alpha": "α of the target p* ∝ p_ref·exp(r/α); 0 = no reference, weights softmax(coeff·r)",
    "coeff": "inverse temperature of the importance weights",
    "ess_target": "solve coeff per group so the normalised ESS hits this value (null: use coeff)",
    "baseline": "weight baseline: none, group (mean), individual (oppositely tilted target) or model (current ELBO)",
    "centering_strength": "s in [0, 1]: how much of the baseline is subtracted",
    "include_eos_padding": "EOS padding after the answer counts as completion (maskable) tokens",
    "drop_tied_groups": "weight 0 for prompt groups whose rollouts all got the same reward (DAPO's dynamic "
    "sampling filter, not in the DMPO paper); under baseline none they would re-fit the policy to its own "
    "samples",
    "ddo_beta": "β of WDDO's log-sigmoid",
    "ddo_a": "weight of WDDO's fake-sample term",
    "ddo_independent_sets": "WDDO: estimate the real and fake gaps from disjoint replicate halves",
    "reference": (
        "reference model of DMPO (alpha > 0) and diffu-GRPO (grpo_beta > 0): frozen_copy, adapter_disabled "
        "(LoRA policy with the adapter off) or none"
    ),
    "grpo_epsilon": "diffu-GRPO: clip range ε of the policy ratio (GRPO paper 0.2; d1's configs 0.5)",
    "grpo_beta": "diffu-GRPO: coefficient β of the k3 KL to `reference` (0: no reference model)",
    "grpo_p_mask_prompt": "diffu-GRPO: probability of masking each prompt token in the one-step log-probs",
    "grpo_random_masking": "diffu-GRPO: a fresh prompt mask for each of the μ updates (false: one mask)",
    "grpo_scale_rewards": "diffu-GRPO advantages: none (r − group mean, d1) or std (also ÷ group std, GRPO)",
    "grpo_normalize": (
        "diffu-GRPO loss: token (mean over the buffer's completion tokens, d1) or sequence (mean per "
        "sequence, then over sequences)"
    ),
    "mro_window": "MRO: denoising steps per SGRO window (the unit of rewards, returns and advantages)",
    "mro_verification": "MRO token-verification context: leave_one_out, pre_step or final (docs/mro.md)",
    "mro_verification_score": (
        "MRO token verification scores a re-masked token by its prob or logprob (logprob with leave_one_out "
        "is the paper's Eq. 4)"
    ),
    "mro_verification_tokens": (
        "MRO token verification of one token per step, drawn uniformly (the paper's; one forward per step) "
        "or of all of them (one forward per committed token with leave_one_out)"
    ),
    "mro_tv_weight": "MRO: weight of the token-verification reward",
    "mro_ppl_weight": "MRO: weight of the perplexity reward (null: 1 when mro_ppl_model gives a scorer, else 0)",
    "mro_ppl_model": (
        "MRO: causal LM of the perplexity reward: auto (the task's built-in scorer, tiny_ar_sudoku or "
        "tiny_ar_countdown, offline; none for other tasks), a built-in name, a hub name or a directory with "
        "its tokenizer, or null (no perplexity reward)"
    ),
    "mro_ppl_text": "MRO perplexity of the visible committed tokens, or of the committed prefix only",
    "mro_task_weight": "MRO: weight of the task reward, added to each rollout's last window",
    "mro_shaping": "MRO perplexity reward: none (summed per state) or potential (its change per step)",
    "mro_window_reward": (
        "MRO: a window's reward from its step rewards: sum, or mean (over its steps, so token verification "
        "and perplexity weigh like the task reward)"
    ),
    "mro_returns": "MRO window return: reward_to_go (this and later windows) or window (this window only)",
    "mro_scale_rewards": "MRO advantages: none (return − group mean) or std (also ÷ group std)",
    "mro_importance": (
        "MRO: windows in each step's loss: none (all), or mro_windows_per_rollout draws, reweighted, uniform "
        "or ∝ abs(advantage)"
    ),
    "mro_windows_per_rollout": "MRO: window draws per rollout with mro_importance uniform or advantage",
    "mro_verification_steps": (
        "MRO: steps of each window whose token is verified, drawn once per buffer and reweighted in the window's "
        "reward (an unbiased estimate of its sum at k / window of the verification forwards); null: every step"
    ),
    "mro_states_per_window": (
        "MRO: denoising states of each window in an optimizer step's SGRO loss, drawn afresh and reweighted "
        "(an unbiased estimate of the window's sum at k / window of its cost); null: every state"
    ),
    "mro_baseline": (
        "MRO advantages: group (window return − the group's mean return of that window) or none (the return "
        "itself, the paper's REINFORCE)"
    ),
    "mro_anchor": (
        "MRO: best adds the masked-diffusion loss (fresh masks, num_replicates, mask_rate_min/max) of each "
        "group's best rollout by task reward to the SGRO loss (rejection sampling's rows), denoise that of every "
        "rollout, so REINFORCE cannot wear the denoiser down; kl the KL to the reference model (k3, on the "
        "tokens of the loss's states; needs reference); none: SGRO alone (docs/mro.md)"
    ),
    "mro_anchor_weight": "MRO: weight of the mro_anchor loss next to the SGRO loss",
    "mro_tts_vote": (
        "test-time scaling (eval_tts_k): the final candidates whose answer is the most common among the "
        "prompt's candidates earn mro_task_weight (MRO's quality reward by majority vote, never the truth)"
    ),
    "mro_rs_window": (
        "mro_rs: model calls between branch points of step-wise group sampling (the G rollouts of a prompt "
        "continue from the best partial state by the step rewards)"
    ),
    "rs_min_reward": (
        "rejection_sft, mro_rs: train on a group's best rollout only when its reward is at least this (e.g. 1.0 "
        "for solved); null: every group's best"
    ),
    "rs_keep": (
        "rejection_sft, mro_rs: best (each group's best rollout) or solved (the best only when the task judges it "
        "solved: a group that solved nothing is skipped); null: the algorithm's default (mro_rs solved, "
        "rejection_sft best)"
    ),
    "wd1_psi": "wd1: inverse temperature ψ of the group softmax of ±advantages (the paper's code: 1)",
    "wd1_negative_weight": "wd1: weight λ of the negative term λ·softmax(−ψA) (the paper's code: 1)",
    "wd1_p_mask_prompt": "wd1: probability of masking each prompt token in the one-step log-likelihood",
    "wd1_random_masking": "wd1: a fresh prompt mask for each of the μ steps on a buffer (false: one mask)",
    "learning_rate": "AdamW learning rate (null: 3e-4, or 3e-5 for mro and wd1)",
    "lr_scheduler": "constant, constant_with_warmup, cosine or linear",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "adam_beta1": "AdamW β1",
    "adam_beta2": "AdamW β2",
    "gradient_accumulation_steps": "micro-batches (of whole prompt groups) per optimizer step",
    "max_grad_norm": "gradient clipping norm",
    "max_steps": "optimizer steps of the run",
    "lora": "train a LoRA adapter (PEFT, pip install 'dmpo-fast[lora]') instead of every weight",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator",
    "lora_dropout": "LoRA dropout (not allowed on the output head: the fused loss reads the head as one matrix)",
    "lora_target_modules": "module names that get adapters",
    "load_in_4bit": (
        "QLoRA: load the base in 4-bit NF4 with double quantization, computing in `dtype` (bitsandbytes, pip "
        "install 'dmpo-fast[quant]'); the output head stays 16-bit; needs lora=true (docs/memory.md)"
    ),
    "load_in_8bit": (
        "load the base in 8-bit LLM.int8 (bitsandbytes); the output head stays 16-bit; needs lora=true; exclusive "
        "with load_in_4bit"
    ),
    "gradient_checkpointing": "recompute each block in backward (less memory, ~30% more compute)",
    "undo_non_finite": (
        "keep a copy of the trainable parameters and their AdamW state through each step, to undo a step that "
        "makes them non-finite (LoRA: a few MB; a full fine-tune: 3x the trainable parameters' memory); false: "
        "no copy, and such a step stops the run with the last good checkpoint intact"
    ),
    "fsdp": (
        "shard parameters, gradients and AdamW state over the processes (PyTorch FSDP2; on by itself under "
        "accelerate launch with configs/accelerate/fsdp.yaml); rollouts and evaluation run gathered"
    ),
    "fsdp_reshard_after_forward": (
        "with fsdp: re-shard each block after its forward (ZeRO-3, least memory) or keep it gathered until "
        "backward (ZeRO-2, less communication)"
    ),
    "impl": "kernel backend: auto (triton on CUDA, else native if built, else chunked), triton, native, chunked, eager",
    "seed": "seed of every random stream (prompts, rollouts, masks): a resumed run repeats an uninterrupted one",
    "eval_size": "held-out examples evaluated before and after training (at most 100000; fixed for a run)",
    "eval_every": "steps between extra evaluations (0: only before and after)",
    "eval_temperature": "sampling temperature of the evaluations (0 = greedy)",
    "eval_tts_k": (
        "evaluate with MRO test-time scaling: k candidates per prompt ranked by the MRO step rewards "
        "(mro_tv_weight, mro_ppl_*) and the majority vote of their answers (mro_tts_vote; never the truth); "
        "0: plain decoding"
    ),
    "eval_tts_window": "test-time scaling: model calls between branch points (all continue from the best)",
    "output_dir": "the run directory (never overwritten: a non-empty one needs resume)",
    "save_every": "steps between checkpoints (and at the end)",
    "keep_checkpoints": "newest checkpoints kept",
    "resume": "continue the run in output_dir from its newest intact checkpoint (docs/reliability.md)",
    "tensorboard": "write TensorBoard events under output_dir/tb (false drops tensorboard from report_to)",
    "report_to": "experiment trackers: tensorboard (output_dir/tb), wandb, trackio, mlflow, comet_ml (through "
    "accelerate's trackers, when installed), a list of them, or none",
    "log_completions_every": "steps between tables of sample completions (completions.jsonl and the trackers); 0: never",
    "plot": "write output_dir/reward.png at the end",
    "progress": "show progress bars",
}


def default_dict() -> dict[str, Any]:
    """Every field's default as ``dmpo-fast config`` prints it: the fields whose default depends on the
    algorithm (``ALGORITHM_DEFAULTS``) as null, so a YAML file made from it follows its ``algorithm``."""
    return {**TrainConfig().to_dict(), **dict.fromkeys(ALGORITHM_DEFAULTS)}


def markdown_table() -> str:
    """Every field with its type, default and description, as the markdown table of docs/config.md."""
    hints = typing.get_type_hints(TrainConfig)
    lines = ["| field | type | default | what it does |", "|---|---|---|---|"]
    defaults = default_dict()
    for name in field_names():
        hint = hints[name]
        if typing.get_origin(hint) is Literal:
            kind = " \\| ".join(str(a) for a in typing.get_args(hint))
        else:
            kind = getattr(hint, "__name__", str(hint)).replace("|", "\\|")
        default = defaults[name]
        json_default = (
            "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        )
        lines.append(f"| `{name}` | {kind} | `{json_default}` | {FIELD_DOCS[name]} |")
    return "\n".join(lines) + "\n"
