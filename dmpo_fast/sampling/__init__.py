"""Rollout samplers for masked-diffusion LMs: blockwise semi-autoregressive decoding.

    rollout = generate(model, prompt_ids, attention_mask, sampler="fast_dllm", gen_length=256,
                       block_length=32, threshold=0.9, cache="dual", temperature=1.0, seed=0)
    rollout.ids            # [B, P + G]  left-padded prompt + completion
    rollout.commit_step    # [B, G]      the step committing each token (MRO rebuilds states from it)

The completion is split into blocks of ``block_length`` decoded left to right; inside a block every step is
one model call plus one :func:`dmpo_fast.ops.denoise_step.denoise_step`:

- ``llada``: a fixed number of steps per block, low-confidence or random remasking (LLaDA);
- ``fast_dllm``: confidence-threshold or factor parallel decoding (or the fixed schedule), with a prefix
  cache, a dual cache or none (Fast-dLLM);
- ``roar``: one token per step in a random order inside each block, with exact per-token log-probs under the
  policy (temperature 1) and optionally a reference model.

Prompts of different lengths come left-padded with an attention mask; the prompt width P is the padded one.

Randomness and batching. All noise is Philox (``dmpo_fast.ops.philox``) under one 64-bit ``seed``; the counter
words are (c0, index j within the completion, row key, 4·step + stream):

    Gumbel noise, vocabulary entry v      c0 = v // 4, word v % 4, stream 0   (inside denoise_step)
    random-remasking score                c0 = 0, word 0, stream 1            (inside denoise_step)
    ROAR decoding order                   c0 = 0, word 0, stream 2, step 0    (``engine.roar_ranks``)

The row key of row b is ``row_keys[b]`` (default b) and the step is the row's own step counter, so a row's
tokens depend only on (seed, row key, its prompt): ``generate(model, prompt_ids[b:b+1], ..., row_keys=
torch.tensor([b]))`` reproduces row b of a batch — at T = 0 and at T > 0 alike, up to the float rounding
of different batch shapes (padding changes absolute RoPE positions; the model's attention is relative). Give a
group of rollouts of one prompt distinct keys (the default does).

EOS. A row is finished when its completion holds an EOS after a block; its later blocks are filled with EOS
(``commit_step`` = its step count, ``completion_mask`` False) and it stops taking steps. Decoding ends when
every row is finished. Committed tokens are never rewritten, so ``ids`` + ``commit_step`` replay the
trajectory exactly; tokens after the first EOS inside its own block stay as sampled and lie outside
``completion_mask``.

The models run under ``torch.no_grad()`` and in eval mode for the call (their modes are restored).

Test-time scaling (MRO): ``generate_tts(model, prompt_ids, attention_mask, k=4, window=32,
reward_fn=..., **sampler_kwargs)`` decodes k candidates per prompt, re-seeds them from the best partial state
every ``window`` model calls and returns the best final one (``dmpo_fast.sampling.tts``).
"""

from dmpo_fast.sampling.engine import (
    DecodePlan,
    DecodeState,
    decode,
    roar_ranks,
    step_hook,
    transfer_schedule,
)
from dmpo_fast.sampling.rollout import Rollout
from dmpo_fast.sampling.samplers import CACHES, SAMPLERS, fast_dllm, generate, llada, roar
from dmpo_fast.sampling.tts import TTSOutput, generate_tts

__all__ = [
    "CACHES",
    "SAMPLERS",
    "DecodePlan",
    "DecodeState",
    "Rollout",
    "TTSOutput",
    "decode",
    "fast_dllm",
    "generate",
    "generate_tts",
    "llada",
    "roar",
    "roar_ranks",
    "step_hook",
    "transfer_schedule",
]
