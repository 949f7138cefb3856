"""DMPO in TRL: ``DMPOConfig`` (a ``GRPOConfig`` with DMPO's fields) and ``DMPOTrainer`` (a ``GRPOTrainer``).

    from dmpo_fast.integrations.trl import DMPOConfig, DMPOTrainer
    trainer = DMPOTrainer(model=lm, reward_funcs=my_reward, args=DMPOConfig(num_generations=8, alpha=0.04),
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Everything TRL does around the loss stays TRL's: the dataset and its prompt-repeating sampler, reward
functions (callables, async callables, reward models, ``log_extra`` / ``log_metric``), the generation buffer
reused for ``num_iterations`` steps (DMPO's F) and ``steps_per_generation`` micro-steps, logging and
completion tables, checkpoints, accelerate / DDP wrapping (DeepSpeed ZeRO-1/2 goes through the same engine
forward, not yet tried), PEFT via ``peft_config``. Two methods differ, and they are the only GRPOTrainer
internals overridden (both live in this file):

``_generate_and_score_completions`` (one rollout buffer; GRPO: AR sampling, rewards, group advantages)
    prompts --dmpo_fast.generate (blockwise diffusion sampler)--> rollouts [n, P+G]
    --TRL's reward functions (gathered over processes)--> r [N]
    --dmpo.elbo(reference), dmpo.elbo(policy), same masks--> log p_ref − log p_old, gathered [N]
    --importance_weights (softmax per prompt group, baseline)--> w [N], this process's slice kept
``compute_loss`` (GRPO: clipped token-level surrogate)
    fresh masks --dmpo.wdce: the policy's hidden states + the fused wdce_loss--> Σ_b w_b·WDCE_b
    run inside the model's forward (so DDP / DeepSpeed see a forward and reduce the gradients), divided by
    the gradient-accumulation steps as GRPOTrainer's own loss is.

The policy is seen through a ``DiffusionLM`` (``dmpo_fast.models.wrap``): hidden states after the final norm,
``head_weight`` (a LoRA adapter on the head included), never the ``[B, L, V]`` logits. The reference model is
the policy with its PEFT adapter disabled, a frozen copy made at construction (full fine-tuning with
alpha > 0), or ``ref_model``. Not supported (a ``ValueError`` says so): vLLM, tools / environments /
``rollout_func``, vision-language processors, ``beta`` != 0 (DMPO's reference enters through ``alpha``),
the "model" baseline (the micro-batches TRL cuts from a buffer are shuffled, so prompt groups are not
together in the loss). LoRA on the output layer works where GRPOTrainer accepts it (trl 1.0 does; 1.16
refuses it for reasons of its own: use ``modules_to_save`` for the head there). DeepSpeed ZeRO-3 has not
been tried: the policy's parameters are read outside their modules' calls there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import types
from dataclasses import dataclass, field

import torch
from packaging.version import Version

try:
    import trl
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError('dmpo_fast.integrations.trl needs TRL: pip install "dmpo-fast[trl]"') from err

TRL_MIN, TRL_BELOW = "1.0.0", "2.0.0"


def check_trl_version(version: str) -> None:
    """``ImportError`` unless ``TRL_MIN <= version < TRL_BELOW``: the range whose GRPOTrainer internals
    (``_generate_and_score_completions``, ``_calculate_rewards``, metric and log buffers) this file uses."""
    if not Version(TRL_MIN) <= Version(version) < Version(TRL_BELOW):
        raise ImportError(
            f"dmpo_fast.integrations.trl supports trl>={TRL_MIN},<{TRL_BELOW} (it overrides GRPOTrainer's "
            f"_generate_and_score_completions and compute_loss); found trl {version}. Install a supported "
            f'version: pip install "trl>={TRL_MIN},<{TRL_BELOW}"'
        )


check_trl_version(trl.__version__)

from accelerate.utils import gather_object  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.data_utils import is_conversational, maybe_apply_chat_template  # noqa: E402

from dmpo_fast import dmpo  # noqa: E402
from dmpo_fast.algorithms.dmpo import (  # noqa: E402
    DEFAULTS,
    DMPOOptions,
    check_options,
    dmpo_loss,
    dmpo_weights,
    elbo_log_ratio,
    loss_weights,
)
from dmpo_fast.models import DiffusionLM, load, load_tokenizer, wrap  # noqa: E402
from dmpo_fast.ops._common import IMPLS  # noqa: E402
from dmpo_fast.ops.denoise_step import REMASKING  # noqa: E402
from dmpo_fast.sampling import CACHES, SAMPLERS, generate  # noqa: E402

_BASELINES = ("none", "group", "individual")


def _help(text: str) -> dict:
    return {"metadata": {"help": text}}


@dataclass
class DMPOConfig(GRPOConfig):
    """``GRPOConfig`` plus DMPO's options (defaults from the paper and its reference code).

    Reused GRPO fields: ``num_generations`` (group size G), ``max_completion_length`` (the diffusion
    sampler's gen_length), ``temperature``, ``num_iterations`` (buffer reuse F), ``steps_per_generation``.
    GRPO's loss fields (``loss_type``, ``epsilon``, ``scale_rewards``, entropy options ...) have no effect.
    """

    beta: float = field(default=0.0, **_help("Must stay 0.0: DMPO's reference enters through alpha."))
    max_completion_length: int | None = field(
        default=256, **_help("Generated tokens per rollout (gen_length).")
    )
    alpha: float = field(default=DEFAULTS.alpha, **_help("Target p_ref·exp(r/alpha); 0 uses the rewards alone."))
    coeff: float = field(default=DEFAULTS.coeff, **_help("Softmax coefficient of the importance weights."))
    ess_target: float | None = field(
        default=DEFAULTS.ess_target, **_help("Target ESS in (0, 1]: coeff found per group.")
    )
    baseline: str = field(default=DEFAULTS.baseline, **_help(f"Weight baseline, one of {_BASELINES}."))
    centering_strength: float = field(
        default=DEFAULTS.centering_strength, **_help("Strength s of the baseline, in [0, 1].")
    )
    drop_tied_groups: bool = field(
        default=DEFAULTS.drop_tied_groups, **_help("Weight 0 for prompt groups whose rewards are all equal.")
    )
    num_replicates: int = field(default=DEFAULTS.num_replicates, **_help("Noisy copies of each rollout in the loss."))
    elbo_replicates: int = field(
        default=DEFAULTS.elbo_replicates, **_help("Noisy copies of each rollout for log p_ref, log p_old.")
    )
    antithetic: bool = field(
        default=DEFAULTS.antithetic, **_help("Second half of the replicates = complements of the first.")
    )
    mask_rate_min: float = field(default=DEFAULTS.mask_rate_min, **_help("Lowest masking rate of a noisy copy."))
    mask_rate_max: float = field(default=DEFAULTS.mask_rate_max, **_help("Highest masking rate of a noisy copy."))
    include_eos_padding: bool = field(
        default=DEFAULTS.include_eos_padding, **_help("Keep the EOS padding after the answer in the loss.")
    )
    sampler: str = field(default="fast_dllm", **_help(f"Diffusion sampler, one of {SAMPLERS}."))
    block_length: int | None = field(default=None, **_help("Semi-AR block length (None: one block)."))
    denoising_steps: int | None = field(
        default=None,
        **_help("Sampler steps for the completion (None: llada one token per step, fast_dllm threshold)."),
    )
    threshold: float | None = field(default=None, **_help("fast_dllm confidence threshold in (0, 1]."))
    cache: str = field(default="prefix", **_help(f"fast_dllm KV cache, one of {CACHES}."))
    remasking: str = field(default="low_confidence", **_help(f"Remasking rule, one of {REMASKING}."))
    impl: str = field(default="auto", **_help(f"Backend of the ops, one of {IMPLS}."))
    mask_token_id: int | None = field(default=None, **_help("[MASK] id when the model config names none."))

    def __post_init__(self):
        super().__post_init__()
        if self.beta != 0.0:
            raise ValueError(
                f"beta must be 0.0 for DMPO (the reference enters through alpha: target p_ref·exp(r/alpha)), "
                f"got {self.beta}"
            )
        if self.use_vllm:
            raise ValueError("use_vllm must be False: diffusion LMs are sampled by dmpo_fast's samplers")
        if self.baseline not in _BASELINES:
            extra = " ('model' needs whole prompt groups in each loss call; TRL's micro-batches are shuffled)"
            raise ValueError(
                f"baseline must be one of {_BASELINES}, got {self.baseline!r}"
                + extra * (self.baseline == "model")
            )
        check_options(self.dmpo_options())
        for name, allowed in (
            ("sampler", SAMPLERS),
            ("cache", CACHES),
            ("remasking", REMASKING),
            ("impl", IMPLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        gen = self.max_completion_length
        if not isinstance(gen, int) or gen < 1:
            raise ValueError(f"max_completion_length must be a positive int (the gen_length), got {gen!r}")
        block = self.block_length or gen
        if gen % block:
            raise ValueError(f"block_length ({block}) must divide max_completion_length ({gen})")
        if self.denoising_steps is not None and (
            self.denoising_steps < 1 or self.denoising_steps % (gen // block)
        ):
            raise ValueError(
                f"denoising_steps must be a positive multiple of the number of blocks ({gen // block}), "
                f"got {self.denoising_steps}"
            )
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be None or in (0, 1], got {self.threshold}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def sampler_kwargs(self) -> dict:
        """Keyword arguments of ``dmpo_fast.generate`` for this config (each sampler gets its own options)."""
        gen = self.max_completion_length
        kw = dict(sampler=self.sampler, gen_length=gen, block_length=self.block_length or gen, impl=self.impl)
        kw["temperature"] = self.temperature
        if self.sampler == "llada":
            kw.update(steps=self.denoising_steps or gen, remasking=self.remasking)
        elif self.sampler == "fast_dllm":
            kw.update(cache=self.cache, remasking=self.remasking)
            if self.threshold is not None:
                kw["threshold"] = self.threshold
            elif self.denoising_steps is not None:
                kw["steps"] = self.denoising_steps
        elif self.denoising_steps is not None:
            kw["steps"] = self.denoising_steps
        return kw

    def dmpo_options(self) -> DMPOOptions:
        """DMPO's options of this config: the ones ``dmpo-fast train`` and ``DMPOLoss`` read."""
        return DMPOOptions.from_config(_WithLoss(self))

    def noise(self, kind: str) -> dmpo.NoiseConfig:
        """The masking of the loss (``"loss"``) or of the log-ratio ELBOs (``"elbo"``)."""
        return self.dmpo_options().noise(kind)


class _WithLoss:
    """A DMPOConfig seen with DMPO's own fields: TRL's ``loss_type`` is GRPO's; DMPO here is always WDCE."""

    def __init__(self, cfg):
        self._cfg = cfg

    def __getattr__(self, name):
        if name == "loss":
            return "wdce"
        if name.startswith("ddo_"):
            return getattr(DEFAULTS, name)
        return getattr(self._cfg, name)


def _seed(*parts) -> int:
    """A 62-bit Philox seed from the run seed and a purpose tag (independent, reproducible streams)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 2


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    # Log-likelihoods for the weights are scored without dropout, whatever the trainer's mode.
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class _AutocastHidden:
    """The policy as ``dmpo.wdce`` sees it under mixed precision: the network runs under autocast, the fused
    loss (its own dtype handling: fp32 accumulation, chunked custom autograd) outside it, on the network's
    output dtype — the chunked op mixes autocast-cast and fp32 tensors otherwise and fails."""

    def __init__(self, policy: DiffusionLM, device_type: str, dtype: torch.dtype):
        self.policy, self.device_type, self.dtype = policy, device_type, dtype
        self.mask_id, self.logit_scale = policy.mask_id, policy.logit_scale

    @property
    def head_weight(self) -> torch.Tensor:
        return self.policy.head_weight

    def hidden(self, ids, attention_mask=None):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.policy.hidden(ids, attention_mask)


class DMPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with DMPO's rollouts, importance weights and fused loss (see the module docstring).

    ``model``: a ``DiffusionLM`` (``dmpo_fast.models.load`` / ``wrap``), the Hugging Face model behind one
    (or a ``PeftModel`` of it), or a checkpoint path / hub id (loaded with ``dmpo_fast.models.load``).
    ``ref_model``: optional reference (``DiffusionLM`` or HF model); by default the adapter-disabled policy
    with PEFT, else a frozen copy of the policy when ``alpha > 0``. Other arguments are GRPOTrainer's.
    """

    _tag_names = ["trl", "dmpo", "dmpo_fast"]
    _name = "DMPO"

    def __init__(self, model, reward_funcs=None, args: DMPOConfig | None = None, *, ref_model=None, **kwargs):
        args = DMPOConfig() if args is None else args
        if not isinstance(args, DMPOConfig):
            raise ValueError(f"args must be a DMPOConfig, got {type(args).__name__}")
        for name in ("rollout_func", "tools", "environment_factory"):
            if kwargs.get(name):
                raise ValueError(
                    f"{name} is not supported by DMPOTrainer (rollouts come from dmpo_fast.generate)"
                )
        if isinstance(model, str):  # a built-in name ("tiny"), a directory or a hub id
            kw = args.model_init_kwargs or {}
            if kwargs.get("processing_class") is None:  # the tokenizer comes with the model
                kwargs["processing_class"] = load_tokenizer(
                    model, hf=True, trust_remote_code=args.trust_remote_code, revision=kw.get("revision")
                )
            model = load(model, dtype=kw.get("dtype"), trust_remote_code=args.trust_remote_code,
                         mask_id=args.mask_token_id, revision=kw.get("revision"))  # fmt: skip
        lm = model if isinstance(model, DiffusionLM) else None
        hf_model = model.model if lm is not None else model
        base = hf_model.get_base_model() if _is_peft(hf_model) else hf_model
        if getattr(base, "generation_config", None) is None:
            # GRPOTrainer reads pad / EOS ids from it; diffusion models without GenerationMixin have none.
            eos = getattr(base.config, "eos_token_id", None)
            base.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=base.config.pad_token_id)
        reference = ref_model
        if (
            reference is None
            and args.alpha > 0
            and kwargs.get("peft_config") is None
            and not _is_peft(hf_model)
        ):
            # Copied before GRPOTrainer patches the model's forward, so the copy's forward is its own.
            reference = copy.deepcopy(base).eval().requires_grad_(False)

        try:
            super().__init__(model=hf_model, reward_funcs=reward_funcs, args=args, **kwargs)
        except ValueError as err:
            if "lm_head" not in str(err):
                raise
            # Newer GRPOTrainers refuse an adapter on the output layer (their own fused head skips it).
            raise ValueError(
                "this TRL's GRPOTrainer refuses a PEFT adapter on the output layer, though DMPO's fused loss "
                "supports one (dmpo_fast.models.peft_support). With TRL, train the head through "
                "modules_to_save, or leave it out of target_modules (the HF Trainer integration and "
                "DMPOLoss take LoRA on the head as is)"
            ) from err

        if getattr(self, "_is_vlm", False):
            raise ValueError(
                "processing_class must be a tokenizer: vision-language processors are not supported"
            )
        base = self.model.get_base_model() if _is_peft(self.model) else self.model
        mask_id = args.mask_token_id
        if mask_id is None:
            mask_id = getattr(base.config, "mask_token_id", None)
        if mask_id is None:
            mask_id = getattr(self._tokenizer, "mask_token_id", None)
        self.policy = lm if lm is not None and lm.base_model is base else wrap(base, mask_id=mask_id)
        if reference is not None and not isinstance(reference, DiffusionLM):
            reference = wrap(reference, mask_id=self.policy.mask_id)
        self.reference = None if reference is None else reference.to(self.accelerator.device)
        if args.alpha > 0 and self.reference is None and not _is_peft(self.model):
            raise ValueError("alpha > 0 needs a reference: pass ref_model, or train a PEFT adapter")
        eos = self.policy.eos_id if self.policy.eos_id is not None else self._tokenizer.eos_token_id
        self._sample_kwargs = {**args.sampler_kwargs(), "eos_id": eos}
        self._install_loss_forward(base)

    # ---- the loss runs inside the model's forward ----------------------------------------------------------
    def _install_loss_forward(self, base) -> None:
        """Make ``model(dmpo_fast_loss=fn)`` run ``fn()`` as the forward of ``base`` (other calls unchanged).

        DDP reduces gradients only for a forward called through its wrapper, and DeepSpeed hooks its engine's
        forward; the loss reads the policy's hidden states and head directly, so it is run as that forward.
        """
        previous = base.forward  # maybe TRL's own patched forward

        @functools.wraps(type(base).forward)
        def forward(module, *args, dmpo_fast_loss=None, **kwargs):
            if dmpo_fast_loss is None:
                return previous(*args, **kwargs)
            return dmpo_fast_loss()

        base.forward = types.MethodType(forward, base)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("DMPOTrainer does not return model outputs")
        mode = "train" if self.model.training else "eval"
        seed = _seed(self.args.seed, "loss", mode, self._step, self.accelerator.process_index)

        def loss_in_forward():
            policy, device_type = self.policy, inputs["ids"].device.type
            outside = contextlib.nullcontext()
            if torch.is_autocast_enabled(device_type):  # mixed precision: accelerate autocasts the forward
                policy = _AutocastHidden(policy, device_type, torch.get_autocast_dtype(device_type))
                outside = torch.autocast(device_type, enabled=False)
            with outside:  # the trainer's DMPO loss, on rows whose final weights were computed per group
                out = dmpo_loss(
                    policy, inputs["ids"], inputs["maskable"], inputs["weights"], self.args.dmpo_options(),
                    group_size=1, seed=seed, attention_mask=inputs["attention_mask"], impl=self.args.impl,
                )  # fmt: skip
            return out.loss, out.stats["masked_tokens"]

        loss, masked_tokens = model(dmpo_fast_loss=loss_in_forward)
        self._metrics[mode]["dmpo/masked_tokens"].append(
            self.accelerator.gather(masked_tokens).float().mean().item()
        )
        # GRPOTrainer's convention: the loss is already scaled for gradient accumulation.
        return loss / self.current_gradient_accumulation_steps if mode == "train" else loss

    # ---- one rollout buffer --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reference_model(self):
        if self.reference is not None:
            yield self.reference
        else:  # PEFT: the base model is the policy with its adapter switched off
            with self.model.disable_adapter():
                yield self.policy

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, torch.Tensor]:
        args, device = self.args, self.accelerator.device
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        rank, tag = self.accelerator.process_index, (args.seed, mode, self.state.global_step, self._step)

        prompts = [x["prompt"] for x in inputs]
        chat = is_conversational({"prompt": prompts[0]})
        texts = [
            maybe_apply_chat_template({"prompt": p}, self.processing_class, **self.chat_template_kwargs)[
                "prompt"
            ]
            for p in prompts
        ]
        enc = self.processing_class(
            text=texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not chat
        )
        out = generate(
            self.policy, enc["input_ids"].to(device), enc["attention_mask"].to(device),
            seed=_seed(*tag, "rollout", rank), **self._sample_kwargs,
        )  # fmt: skip
        P = out.prompt_length
        maskable = torch.zeros_like(out.ids, dtype=torch.bool)
        maskable[:, P:] = dmpo.completion_mask(
            out.completion_ids, self._sample_kwargs["eos_id"], include_eos_padding=args.include_eos_padding
        )  # [n, P + G]: completion positions only
        completion_ids = [
            row[keep].tolist() for row, keep in zip(out.completion_ids, out.completion_mask, strict=True)
        ]
        completions = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if chat:
            completions = [[{"role": "assistant", "content": c}] for c in completions]

        rewards_per_func = self._calculate_rewards(
            inputs, prompts, completions, completion_ids
        )  # [N, F], gathered
        rewards = (rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: weight 0 below

        options = args.dmpo_options()
        log_ratio = torch.zeros(out.ids.shape[0], device=device)
        if args.alpha > 0:  # the trainer's ELBO log-ratio: policy and reference on the same masks
            with _eval_mode(self.model):
                _, log_ratio = elbo_log_ratio(
                    self.policy, self._reference_model, out.ids, maskable, options, seed=_seed(*tag, "elbo", rank),
                    attention_mask=out.attention_mask, impl=args.impl,
                    micro_batch=args.per_device_train_batch_size * options.elbo_replicates,
                )  # fmt: skip
        log_ratio = self.accelerator.gather(log_ratio)  # [N], rows in the order of rewards_per_func
        iw, tied, _ = dmpo_weights(rewards, log_ratio, options, group)  # the trainer's weights
        n = len(prompts)
        weights = loss_weights(iw, options)[rank * n : (rank + 1) * n]
        self._metrics[mode]["dmpo/tied_groups"].append(float(tied.sum()))
        self._log_rollouts(mode, prompts, completions, rewards_per_func, rewards, iw, log_ratio, out)
        return {
            "ids": out.ids,
            "attention_mask": out.attention_mask,
            "maskable": maskable,
            "weights": weights,
        }

    def _log_rollouts(
        self, mode, prompts, completions, rewards_per_func, rewards, iw, log_ratio, out
    ) -> None:
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(rewards[~torch.isnan(rewards)].std().nan_to_num(0.0).item())
        metrics["dmpo/ess"].append(iw.ess.mean().item())
        metrics["dmpo/coeff"].append(iw.coeff.mean().item())
        metrics["dmpo/log_ratio"].append(log_ratio.mean().item())
        metrics["dmpo/dropped"].append(float(iw.dropped))
        lengths = self.accelerator.gather(out.completion_mask.sum(dim=1)).float()
        metrics["completions/mean_length"].append(lengths.mean().item())
        # The completion tables TRL prints and saves; the DMPO weight stands in the "advantage" column.
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(iw.weights.tolist())
        # What reward functions logged through log_extra / log_metric (keys sorted: every rank gathers alike).
        pending = self._pending_extra_logs
        for column in sorted(set(gather_object(list(pending)))):
            self._logs["extra"][column].extend(gather_object(pending.get(column, [None] * len(prompts))))
        pending.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            local = torch.tensor(
                [sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device
            )
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / max(count, 1))
        self._pending_metrics.clear()
