"""The public ops of dmpo_fast.

Every op takes ``impl="auto"|"triton"|"native"|"chunked"|"eager"`` (see ``_common``); shapes are
part of the contract:

- ``forward_mask(ids[B,L], maskable[B,L], *, mask_id, replicates, ...) -> (noisy[R*B,L], masked[R*B,L])``
- ``linear_logprob(hidden[N,H], weight[V,H], targets[N]) -> logp[N]``
- ``weighted_linear_ce(hidden[N,H], weight[V,H], targets[N], token_weights[N]) -> scalar``
- ``wdce_loss(hidden[R,L,H], head_weight[V,H], targets[R,L], loss_mask[R,L], row_weights[R]) -> scalar``
- ``importance_weights(rewards[N], log_ratio[N], *, group_size, alpha, ...) -> ImportanceWeights``
- ``denoise_step(logits[B,L,V] | (hidden[B,L,H], head_weight[V,H]), x[B,L], active[B,L], ...) -> DenoiseOutput``
"""

from dmpo_fast.ops._common import IMPLS, resolve_impl
from dmpo_fast.ops.denoise_step import DenoiseOutput, denoise_step, denoise_step_reference_fastdllm
from dmpo_fast.ops.forward_mask import forward_mask
from dmpo_fast.ops.importance_weights import BASELINES, ImportanceWeights, importance_weights
from dmpo_fast.ops.linear_ce import linear_logprob, weighted_linear_ce
from dmpo_fast.ops.wdce import wdce_loss

__all__ = [
    "BASELINES",
    "IMPLS",
    "DenoiseOutput",
    "denoise_step",
    "denoise_step_reference_fastdllm",
    "ImportanceWeights",
    "forward_mask",
    "importance_weights",
    "linear_logprob",
    "resolve_impl",
    "wdce_loss",
    "weighted_linear_ce",
]
