"""dmpo_fast: fast RL fine-tuning of diffusion language models (DMPO and MRO).

The hot loop (denoising cross-entropy over masked tokens, log-probs, noising, importance weights)
runs in fused Triton kernels on CUDA, with an eager PyTorch twin of every op for verification and a
memory-lean chunked path for CPUs. See ``dmpo_fast.ops`` for the op contracts.

    import dmpo_fast
    result = dmpo_fast.train(dmpo_fast.TrainConfig())   # = `dmpo-fast train`: DMPO on the tiny Sudoku model
    loss = dmpo_fast.wdce_loss(hidden, head_weight, targets, loss_mask, row_weights)   # the loss alone

The trainer lives in ``dmpo_fast.trainer`` (``train``, ``evaluate_model``, ``TrainResult``) and is imported on
first use of those names, so ``import dmpo_fast`` stays light.
"""

from dmpo_fast.config import TrainConfig
from dmpo_fast.losses import DMPOLoss
from dmpo_fast.ops import (
    DenoiseOutput,
    ImportanceWeights,
    denoise_step,
    forward_mask,
    importance_weights,
    linear_logprob,
    wdce_loss,
    weighted_linear_ce,
)
from dmpo_fast.sampling import Rollout, generate

__version__ = "0.1.0"

# The trainer (dmpo_fast.trainer) imports the models, samplers and tasks: loaded on first use of these names.
_TRAINER_NAMES = ("train", "TrainResult", "evaluate_model")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from dmpo_fast import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dmpo_fast' has no attribute {name!r}")


__all__ = [
    "DMPOLoss",
    "DenoiseOutput",
    "ImportanceWeights",
    "Rollout",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "denoise_step",
    "evaluate_model",
    "forward_mask",
    "generate",
    "importance_weights",
    "linear_logprob",
    "train",
    "wdce_loss",
    "weighted_linear_ce",
]
