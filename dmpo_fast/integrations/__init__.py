"""Drop-in DMPO for existing trainers (see docs/integrations.md).

- ``dmpo_fast.integrations.hf``: ``DMPOCollator`` + ``DMPOComputeLoss`` for ``transformers.Trainer(
  compute_loss_func=...)`` on rollouts you bring yourself;
- ``dmpo_fast.integrations.trl``: ``DMPOConfig`` / ``DMPOTrainer``, a ``trl.GRPOTrainer`` whose rollouts,
  weights and loss are DMPO's (needs ``pip install "dmpo-fast[trl]"``);
- ``dmpo_fast.integrations.hf_tokenizer.hf_char_tokenizer``: the built-in character tokenizer as a Hugging
  Face tokenizer, for trainers that require one.

Plain PyTorch loops use ``dmpo_fast.DMPOLoss`` or the functional ops directly. Nothing here is imported by
``import dmpo_fast``; each submodule imports its framework when it is imported.
"""
