"""The algorithm core: the registry, the typed buffer, and one DMPO behind every entry point (the trainer's
``DMPO``, ``DMPOLoss`` and the TRL ``DMPOTrainer`` compute the same loss and gradients on one buffer)."""

from __future__ import annotations

import typing

import pytest
import torch

from dmpo_fast import DMPOLoss
from dmpo_fast.algorithms import ALGORITHMS, DMPO, Buffer, DMPOOptions, derive_seed
from dmpo_fast.algorithms.base import merge_for_log
from dmpo_fast.config import TrainConfig
from dmpo_fast.dmpo import NoiseConfig
from dmpo_fast.models import build_tiny
from dmpo_fast.policy import Reference
from dmpo_fast.sampling import generate
from dmpo_fast.tokenizer import CharTokenizer

TOK = CharTokenizer()


def test_registry_is_the_configs_allowed_algorithms():
    allowed = typing.get_args(typing.get_type_hints(TrainConfig)["algorithm"])
    assert set(ALGORITHMS) == set(allowed)
    assert all(cls.name == name for name, cls in ALGORITHMS.items())
    with pytest.raises(ValueError, match="algorithm must be one of"):
        TrainConfig(algorithm="ppo")


def test_one_definition_of_every_dmpo_default():
    """TrainConfig, DMPOLoss and the TRL DMPOConfig take DMPO's defaults from DMPOOptions."""
    defaults = DMPOOptions()
    assert DMPOOptions.from_config(TrainConfig()) == defaults
    criterion = DMPOLoss(4)
    assert criterion.options == defaults
    trl = pytest.importorskip("dmpo_fast.integrations.trl")
    args = trl.DMPOConfig(output_dir="x", report_to=[], use_cpu=True, bf16=False)
    assert args.dmpo_options() == defaults


def test_buffer_rows_slice_totals_and_meta_do_not():
    buf = Buffer({"ids": torch.arange(12).view(6, 2), "w": torch.arange(6.0)}, {"rows_total": 12},
                 {"first_row": 6, "seed": 3})  # fmt: skip
    part = buf.slice(2, 4)
    assert part["ids"].tolist() == [[4, 5], [6, 7]] and part["w"].tolist() == [2.0, 3.0]
    assert part.totals == {"rows_total": 12} and part.meta == {"first_row": 8, "seed": 3}
    assert buf.first_row == 6  # the original is untouched
    again = Buffer.from_dict(buf.to_dict(), ("rows_total",))
    assert again.totals == buf.totals and again.meta == buf.meta and torch.equal(again["w"], buf["w"])
    rows, totals = merge_for_log([buf, part])
    assert (
        rows["w"].tolist() == [0, 1, 2, 3, 4, 5, 2, 3] and "ids" not in rows and totals == {"rows_total": 12}
    )
    with pytest.raises(ValueError, match="newer than this dmpo_fast reads"):
        Buffer.from_dict({**buf.to_dict(), "buffer_version": 99}, ())


class _Procs:
    """Two processes' totals summed, as the trainer's one collective does."""

    world = 2

    def __init__(self, other: list[float]):
        self.other = other

    def sum(self, values):
        return [a + b for a, b in zip(values, self.other, strict=True)]


def test_totals_are_summed_over_processes_once():
    buf = Buffer({"ids": torch.zeros(4, 3)}, {"rows_total": 4, "tokens_total": 10.5, "n_failed": 1})
    buf.sum_totals(_Procs([1.0, 4.0, 10.5]))  # sorted keys: n_failed, rows_total, tokens_total
    assert buf.totals == {"n_failed": 2, "rows_total": 8, "tokens_total": 21.0}
    assert isinstance(buf.totals["rows_total"], int)


@pytest.fixture(scope="module")
def dmpo_buffer():
    """A trainer-built DMPO buffer of 2 prompt groups (4 rollouts each), the first group all tied."""
    torch.manual_seed(0)
    cfg = TrainConfig(
        num_generations=4, prompts_per_step=2, num_replicates=2, elbo_replicates=2, impl="chunked"
    )
    policy = build_tiny(TOK.vocab_size, TOK.mask_id, TOK.eos_id, seed=0, n_layers=1)
    prompts, am = TOK.batch_encode(["12+3=", "7*2=", "12+3=", "7*2="], pad_left=True)
    prompts, am = prompts[[0, 0, 0, 0, 1, 1, 1, 1]], am[[0, 0, 0, 0, 1, 1, 1, 1]]
    out = generate(policy, prompts, am, sampler="llada", gen_length=8, block_length=8, steps=4, temperature=1.0,
                   seed=1)  # fmt: skip
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0])
    algo = DMPO(cfg)
    reference = Reference(cfg, policy, uses=algo.needs_reference)
    buf = algo.build(policy, out, rewards, reference=reference, scorer=None, buffer_index=0, first_row=0)
    return cfg, algo, policy, reference, out, rewards, buf


def _grads(policy, loss):
    policy.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    return grads


def test_trainer_dmpoloss_and_trl_compute_one_loss(dmpo_buffer, monkeypatch):
    cfg, algo, policy, reference, out, rewards, buf = dmpo_buffer
    assert buf["tied_groups"] == 1 and buf["weights"][:4].abs().sum() == 0  # drop_tied_groups by default
    step = 3
    seed = derive_seed(cfg.seed, "loss", step)

    trainer_loss = algo.loss(policy, buf, step).loss
    g_trainer = _grads(policy, trainer_loss)

    noise = NoiseConfig(cfg.num_replicates)
    criterion = DMPOLoss(cfg.num_generations, alpha=cfg.alpha, noise=noise, elbo_noise=noise, impl=cfg.impl)
    with reference() as ref:
        log_ratio = criterion.log_ratio(policy, ref, out.ids, buf["maskable"], attention_mask=out.attention_mask,
                                        seed=derive_seed(cfg.seed, "elbo", 0))  # fmt: skip
    scored = buf["kept"]  # the trainer scores only rollouts that carry weight
    torch.testing.assert_close(log_ratio[scored], buf["log_ratio"][scored], rtol=0, atol=0)
    module = criterion(policy, out.ids, buf["maskable"], rewards=rewards, log_ratio=buf["log_ratio"],
                       attention_mask=out.attention_mask, seed=seed)  # fmt: skip
    torch.testing.assert_close(module.stats["importance"].weights, buf["weights"], rtol=0, atol=0)
    g_module = _grads(policy, module.loss)

    trl = pytest.importorskip("dmpo_fast.integrations.trl")
    pytest.importorskip("datasets")
    from dmpo_fast.integrations.hf_tokenizer import hf_char_tokenizer

    args = trl.DMPOConfig(
        output_dir="trl", per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        num_replicates=2, elbo_replicates=2, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        impl=cfg.impl,
    )  # fmt: skip
    import datasets

    trainer = trl.DMPOTrainer(model=policy, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                              args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "1"}] * 8),
                              processing_class=hf_char_tokenizer(TOK))  # fmt: skip
    monkeypatch.setattr(trl, "_seed", lambda *parts: seed)  # the trainer's mask seed for this step
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training_step, as one micro-batch
    inputs = {"ids": out.ids, "attention_mask": out.attention_mask, "maskable": buf["maskable"],
              "weights": buf["weights"]}  # fmt: skip
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    g_trl = _grads(policy, trl_loss)

    assert trainer_loss.abs() > 0
    torch.testing.assert_close(module.loss, trainer_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(trl_loss, trainer_loss, rtol=1e-6, atol=0)
    for a, b, c in zip(g_trainer, g_module, g_trl, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# wd1
# --------------------------------------------------------------------------------------------------


def test_wd1_weights_are_group_softmaxes_of_the_advantages():
    from dmpo_fast.algorithms.wd1 import wd1_weights

    r = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 2.0, float("nan"), 0.0])
    w_pos, w_neg, adv = wd1_weights(r, 3, psi=2.0)
    a = torch.tensor([2 / 3, -1 / 3, -1 / 3])
    torch.testing.assert_close(w_pos[:3], torch.softmax(2.0 * a, 0))
    torch.testing.assert_close(w_neg[:3], torch.softmax(-2.0 * a, 0))
    torch.testing.assert_close(w_pos[3:6], w_neg[3:6])  # a tied group: no gradient with λ = 1
    assert w_pos[7] == 0 and w_neg[7] == 0 and adv[7] == 0  # a failed reward carries nothing
    torch.testing.assert_close(w_pos[6:].sum(), torch.tensor(1.0))


def test_wd1_loss_is_the_weighted_log_likelihood_and_slices_add_up():
    """L = Σ (λ·w⁻ − w⁺)·log π(o) / groups with d1's one-step log π; two micro-batches give the whole."""
    from dmpo_fast import grpo
    from dmpo_fast.algorithms import WD1

    torch.manual_seed(0)
    cfg = TrainConfig(algorithm="wd1", num_generations=4, prompts_per_step=2, wd1_negative_weight=0.5, impl="chunked")
    policy = build_tiny(TOK.vocab_size, TOK.mask_id, TOK.eos_id, seed=0, n_layers=1)
    prompts, am = TOK.batch_encode(["12+3=", "7*2="], pad_left=True)
    out = generate(policy, prompts[[0, 0, 0, 0, 1, 1, 1, 1]], am[[0, 0, 0, 0, 1, 1, 1, 1]], sampler="llada",
                   gen_length=8, block_length=8, steps=4, temperature=1.0, seed=1)  # fmt: skip
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0])
    algo = WD1(cfg)
    buf = algo.build(policy, out, rewards, reference=None, scorer=None, buffer_index=0, first_row=0)
    whole = algo.loss(policy, buf, step=1)
    parts = [algo.loss(policy, buf.slice(0, 4), step=1), algo.loss(policy, buf.slice(4, 8), step=1)]
    torch.testing.assert_close(parts[0].loss + parts[1].loss, whole.loss)

    P = out.prompt_length
    logp = grpo.diffu_grpo_logprobs(
        policy, out.ids, P, attention_mask=out.attention_mask, p_mask_prompt=cfg.wd1_p_mask_prompt,
        seed=buf["mask_seeds"][1], score_mask=buf["completion_mask"], impl="eager",
    )  # fmt: skip
    a = rewards.view(2, 4) - rewards.view(2, 4).mean(1, keepdim=True)
    coef = (0.5 * torch.softmax(-a, 1) - torch.softmax(a, 1)).reshape(-1)
    expected = (coef * logp.sum(1)).sum() / 2
    torch.testing.assert_close(whole.loss, expected, rtol=1e-5, atol=1e-6)
    assert int(whole.stats["masked_tokens"]) == int(out.completion_mask.sum())
