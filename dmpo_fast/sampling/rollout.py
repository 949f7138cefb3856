"""The ``Rollout`` record every sampler returns, and the argument checks the samplers share."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from dmpo_fast.dmpo import completion_mask as _completion_mask
from dmpo_fast.ops.philox import draw_seed


@dataclasses.dataclass
class Rollout:
    """A batch of sampled completions and how they were decoded.

    ids: [B, P + G] left-padded prompt followed by the completion.
    attention_mask: [B, P + G] bool, the prompt's mask followed by ones (True = real token).
    prompt_length: P, the padded prompt width; ``ids[:, P:]`` is the completion.
    completion_mask: [B, G] bool, the completion up to and including its first EOS (all of it without EOS).
    commit_step: [B, G] int64, the row's step at which each completion token was committed. Steps are counted
        per row (a step is a model call in which the row had something to decode), so the state before step
        t is ``state_at(t)``: the tokens with commit_step < t visible, the rest masked. Positions the sampler
        never decoded (EOS fill after an early finish) carry ``num_steps`` — masked in every state.
    num_steps: [B] int64, the number of steps each row took.
    seed: the Philox key of the noise; ``row_keys`` [B] the rows' counters (see ``dmpo_fast.sampling``).
    mask_id: the mask token, for ``state_at``.
    logprobs: [B, G] fp32 (ROAR) log softmax of the policy's logits (temperature 1) at the state where the
        token was committed, 0 where never decoded; ``ref_logprobs`` the same under the reference model;
        ``sampling_logprobs`` under the tempered distribution softmax(z / T) the token was drawn from (T > 0).
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    commit_step: torch.Tensor
    num_steps: torch.Tensor
    seed: int
    row_keys: torch.Tensor
    mask_id: int
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None

    @property
    def completion_ids(self) -> torch.Tensor:
        """[B, G] the completion tokens."""
        return self.ids[:, self.prompt_length :]

    def state_at(self, step: int | torch.Tensor) -> torch.Tensor:
        """[B, P + G] the sequence the model saw before step ``step`` (int or [B]): completion tokens with
        commit_step < step kept, the others set to ``mask_id``."""
        t = torch.as_tensor(step, device=self.ids.device)
        t = t[:, None] if t.dim() == 1 else t
        completion = torch.where(self.commit_step < t, self.completion_ids, self.mask_id)
        return torch.cat((self.ids[:, : self.prompt_length], completion), dim=1)


def completion_mask_from_eos(completion: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """[B, G] bool: up to and including the first EOS (every position when there is no EOS id)."""
    if eos_id is None:
        return torch.ones_like(completion, dtype=torch.bool)
    return _completion_mask(completion, eos_id, include_eos_padding=False)


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def context_length(model) -> int | None:
    """The longest sequence the model accepts, from the attributes the model families expose."""
    for owner in (model, getattr(model, "config", None)):
        for name in ("max_sequence_length", "max_position_embeddings"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_prompts(prompt_ids, attention_mask) -> torch.Tensor:
    """Validate a left-padded prompt batch; returns the bool attention mask ([B, P])."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        raise ValueError(
            f"prompt_ids must be a [B, P] integer tensor, got {getattr(prompt_ids, 'shape', prompt_ids)!r}"
        )
    if prompt_ids.dtype.is_floating_point or prompt_ids.dtype in (
        torch.bool,
        torch.complex64,
        torch.complex128,
    ):
        raise ValueError(f"prompt_ids must have an integer dtype, got {prompt_ids.dtype}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be non-empty [B, P], got shape {list(prompt_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(prompt_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"attention_mask must be None or a tensor of prompt_ids' shape {list(prompt_ids.shape)}, "
            f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
        )
    if attention_mask.device != prompt_ids.device:
        raise ValueError(
            f"attention_mask must be on prompt_ids' device {prompt_ids.device}, got {attention_mask.device}"
        )
    mask = attention_mask.to(torch.bool)
    # Left padding: once a row's real tokens start they run to the end (0...0 1...1).
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "attention_mask must describe left padding (each row 0...0 1...1): prompts are left-padded"
        )
    return mask


def check_lengths(model, P: int, gen_length, block_length) -> tuple[int, int]:
    """(gen_length, number of blocks); ValueError for a bad split or a sequence longer than the context."""
    gen_length = _positive_int("gen_length", gen_length)
    block_length = _positive_int("block_length", block_length)
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    limit = context_length(model)
    if limit is not None and P + gen_length > limit:
        raise ValueError(
            f"prompt width {P} + gen_length {gen_length} = {P + gen_length} exceeds the model's context of "
            f"{limit} tokens"
        )
    return gen_length, gen_length // block_length


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    return float(temperature)


def resolve_seed(seed, generator) -> int:
    if seed is None:
        return draw_seed(generator)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    return seed


def resolve_row_keys(row_keys, B: int, device) -> torch.Tensor:
    """[B] int64 Philox row counters: ``row_keys`` or 0..B-1."""
    if row_keys is None:
        return torch.arange(B, device=device)
    if (
        not isinstance(row_keys, torch.Tensor)
        or row_keys.shape != (B,)
        or row_keys.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"row_keys must be None or an int32/int64 tensor of shape [{B}], got {row_keys!r}")
    return row_keys.to(device=device, dtype=torch.int64)


@contextlib.contextmanager
def inference(*models):
    """No autograd, and the models in eval mode (dropout off) for the duration; every submodule's mode is
    restored afterwards (a partly frozen model keeps its mix)."""
    modes = [(sub, sub.training) for m in models if isinstance(m, torch.nn.Module) for sub in m.modules()]
    try:
        for sub, _ in modes:
            sub.training = False
        with torch.no_grad():
            yield
    finally:
        for sub, mode in modes:
            sub.training = mode
