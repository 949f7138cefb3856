"""``DMPOTrainer`` (a TRL ``GRPOTrainer``): real optimizer steps of the tiny model on CPU, TRL rewards."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from dmpo_fast.integrations.hf_tokenizer import hf_char_tokenizer  # noqa: E402
from dmpo_fast.integrations.trl import DMPOConfig, DMPOTrainer, check_trl_version  # noqa: E402
from dmpo_fast.models import build_tiny  # noqa: E402
from dmpo_fast.tasks import get_task  # noqa: E402
from dmpo_fast.tokenizer import CharTokenizer  # noqa: E402

TOK = CharTokenizer()


def _config(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=2,
        max_completion_length=8, block_length=8, sampler="llada", denoising_steps=4, temperature=1.0,
        num_replicates=2, elbo_replicates=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, gradient_checkpointing=False, seed=0, impl="chunked",  # bf16: TRL default
    )  # fmt: skip
    fields.update(overrides)
    return DMPOConfig(**fields)


def test_two_dmpo_steps_move_the_parameters_with_a_finite_loss(tmp_path):
    task = get_task("sudoku")
    dataset = datasets.Dataset.from_list(task.train(4, seed=0))
    lm = build_tiny(TOK.vocab_size, TOK.mask_id, TOK.eos_id, seed=0)
    calls = []

    def cell_reward(prompts, completions, **columns):  # a TRL-style reward; logs through TRL's hook
        calls.append(len(completions))
        columns["log_metric"]("calls", float(len(calls)))
        return task.reward(prompts, completions, **columns)

    trainer = DMPOTrainer(
        model=lm, reward_funcs=cell_reward, args=_config(tmp_path, alpha=0.04),
        train_dataset=dataset, processing_class=hf_char_tokenizer(TOK),
    )  # fmt: skip
    assert trainer.args.bf16  # TRL's default mixed precision: the loss runs under accelerate's autocast
    before = [p.detach().clone() for p in lm.parameters()]
    trainer.train()

    assert trainer.state.global_step == 2 and calls == [4, 4]  # one rollout buffer of 4 per step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("dmpo/ess" in h and "reward" in h and "calls" in h for h in logs)
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, lm.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2  # most tensors took a step (not only the head)
    assert trainer.reference is not None  # alpha > 0, full fine-tuning: a frozen copy
    torch.testing.assert_close(before[0], next(trainer.reference.parameters()))


def test_config_and_version_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="beta must be 0.0"):
        _config(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="baseline must be one of"):
        _config(tmp_path, baseline="model")
    with pytest.raises(ValueError, match="sampler must be one of"):
        _config(tmp_path, sampler="greedy")
    with pytest.raises(ValueError, match="block_length"):
        _config(tmp_path, block_length=3)
    with pytest.raises(ImportError, match=r"supports trl>=1\.0\.0,<2\.0\.0.*found trl 0\.19\.1"):
        check_trl_version("0.19.1")
    check_trl_version(trl.__version__)


def test_trainer_takes_a_builtin_model_name_and_its_tokenizer(tmp_path):
    trainer = DMPOTrainer(model="tiny", reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                          args=_config(tmp_path, bf16=False),
                          train_dataset=datasets.Dataset.from_list([{"prompt": "1 2"}] * 4))  # fmt: skip
    assert trainer.processing_class("12")["input_ids"] == TOK.encode("12")
    assert trainer.policy.mask_id == TOK.mask_id
