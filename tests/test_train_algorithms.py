"""MRO, diffu-GRPO and rejection sampling in the trainer: short runs of the built-in tiny model (outputs, finite losses, a moved
policy, resume inside a rollout buffer), one process's share of a batch adding up to the whole batch, the
perplexity reward through a saved causal LM, test-time-scaling evaluation, and bad config values."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_models import ToyDenoiser

from dmpo_fast import grpo, mro
from dmpo_fast import trainer as train_mod
from dmpo_fast.algorithms import RejectionSFT, derive_seed
from dmpo_fast.config import TrainConfig
from dmpo_fast.run_io import RunDir
from dmpo_fast.sampling import llada
from dmpo_fast.sampling.tts import select_rows
from dmpo_fast.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(
    prompts_per_step=2, num_generations=2, max_steps=2, num_iterations=2, eval_size=4, progress=False,
    tensorboard=False, plot=False, save_every=1, impl="chunked",
)  # fmt: skip
# Each algorithm with the options its trainer path branches on: GRPO with the reference (β > 0) and the
# old-policy log-probs (μ = 2); MRO with sampled windows (row-keyed draws) and two micro-batches.
ALGORITHMS = {
    "diffu_grpo": dict(algorithm="diffu_grpo", grpo_beta=0.04),
    "mro": dict(algorithm="mro", mro_window=4, mro_importance="advantage", gradient_accumulation_steps=2),
    "rejection_sft": dict(algorithm="rejection_sft", gradient_accumulation_steps=2),
    "wd1": dict(algorithm="wd1", gradient_accumulation_steps=2),
    "mro_rs": dict(algorithm="mro_rs", mro_rs_window=3, gradient_accumulation_steps=2),
}
COLUMNS = {
    "diffu_grpo": ("kl", "clip_ratio", "ratio_mean", "advantage_abs_mean"),
    "mro": ("states", "windows", "steps_mean", "tv_reward_mean"),
    "rejection_sft": ("selected",),
    "wd1": ("advantage_abs_mean", "w_pos_max_mean", "logp_token_mean"),
    "mro_rs": ("selected", "tv_reward_mean"),
}
VOLATILE = {"seconds", "tokens_per_s"}


def _cfg(tmp_path, algorithm, name="run", **kw):
    return TrainConfig(output_dir=str(tmp_path / name), **{**TINY, **ALGORITHMS[algorithm], **kw})


def _train(cfg):
    if cfg.algorithm == "mro" and cfg.num_iterations > 1:
        with pytest.warns(UserWarning, match="off-policy"):
            return train_mod.train(cfg)
    return train_mod.train(cfg)


def _cli(args, **kw):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from dmpo_fast.cli import main; sys.exit(main(sys.argv[1:]))",
         *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw,
    )  # fmt: skip


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_short_run_writes_outputs_and_moves_the_policy(tmp_path, algorithm):
    cfg = _cfg(tmp_path, algorithm)
    before = train_mod.load_policy(cfg, torch.device("cpu"))[0].state_dict()
    result = _train(cfg)
    run = Path(result.output_dir)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "reward_mean", "reward_std", "accuracy", "grad_norm", *COLUMNS[algorithm]):
        values = torch.tensor([float(r[key]) for r in rows])
        assert torch.isfinite(values).all(), key
    assert all(r["masked_tokens"] > 0 and not r["skipped"] for r in rows)
    if algorithm == "diffu_grpo":  # the second step of a buffer moves away from π_old and π_ref
        assert rows[0]["ratio_mean"] == pytest.approx(1.0) and rows[1]["kl"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_before"]["n"] == summary["eval_after"]["n"] == 4
    assert summary["config"]["algorithm"] == algorithm
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000001", "step-000002"]
    after = RunDir.load_checkpoint(run / "checkpoints" / "step-000002")["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not move"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_inside_a_buffer_repeats_the_uninterrupted_run(tmp_path, algorithm):
    whole = _train(_cfg(tmp_path, algorithm, "whole"))
    _train(_cfg(tmp_path, algorithm, "parts", max_steps=1))  # stops after the buffer's first step
    resumed = _train(_cfg(tmp_path, algorithm, "parts", resume=True))
    assert _stable(whole.metrics) == _stable(resumed.metrics)
    assert whole.eval_before == resumed.eval_before and whole.eval_after == resumed.eval_after
    wa = RunDir.load_checkpoint(Path(whole.output_dir) / "checkpoints" / "step-000002")["model"]
    wb = RunDir.load_checkpoint(Path(resumed.output_dir) / "checkpoints" / "step-000002")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------------
# Processes: each builds the buffer of its own groups; the shares' losses add up to the whole batch's
# --------------------------------------------------------------------------------------------------

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def toy_rollout():
    model = ToyDenoiser(vocab=TOK.vocab_size, hidden=16, mask_id=TOK.mask_id, seed=0)
    ids, am = TOK.batch_encode(["12+3="] * 2 + ["7*8="] * 2 + ["9-4="] * 2 + ["5+5="] * 2, pad_left=True)
    out = llada(model, ids, am, gen_length=8, block_length=4, steps=4, temperature=1.0, seed=3,
                eos_id=TOK.eos_id)  # fmt: skip
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.6, 0.0, 0.3, 0.8])  # no group of equal rewards (A = 0)
    return model, out, rewards


def _buffers(algorithm, model, out, rewards):
    """(config, the whole batch's buffer, the buffers of its two halves built apart (two processes))."""
    N = out.ids.shape[0]
    halves = [torch.arange(0, N // 2), torch.arange(N // 2, N)]
    if algorithm == "diffu_grpo":
        cfg = grpo.GRPOConfig(group_size=2, num_iterations=2, beta=0.04)
        ref, tokens = copy.deepcopy(model), float(out.completion_mask.sum())
        with torch.no_grad():  # a reference away from the policy: the KL term has a gradient
            ref.head.add_(0.1 * torch.randn_like(ref.head))
        whole = grpo.make_buffer(model, out, rewards, cfg, seed=5, reference=ref)
        parts = [
            grpo.make_buffer(model, select_rows(out, h), rewards[h], cfg, seed=5, reference=ref,
                             row_offset=int(h[0]), rows_total=N, tokens_total=tokens)
            for h in halves
        ]  # fmt: skip
        return cfg, whole, parts
    cfg = mro.MROConfig(group_size=2, window=2, ppl_weight=0.0, importance="advantage", windows_per_rollout=1)
    whole = mro.make_buffer(model, out, rewards, cfg, seed=5, impl="eager")
    parts = [
        mro.make_buffer(model, select_rows(out, h), rewards[h], cfg, seed=5, row_offset=int(h[0]),
                        rows_total=N, impl="eager")
        for h in halves
    ]  # fmt: skip
    return cfg, whole, parts


def _loss_and_grads(model, algorithm, cfg, bufs, step):
    """The summed loss of ``bufs`` at ``step`` and its gradient."""
    module = grpo if algorithm == "diffu_grpo" else mro
    model.zero_grad(set_to_none=True)
    loss = sum(module.loss_step(model, b, cfg, step, impl="eager").loss for b in bufs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("algorithm", ["diffu_grpo", "mro"])
def test_two_shares_of_a_batch_add_up_to_the_whole(toy_rollout, algorithm):
    model, out, rewards = toy_rollout
    cfg, whole, parts = _buffers(algorithm, model, out, rewards)
    for step in (0, 1):  # two inner iterations: fresh prompt masks / window draws
        l_whole, g_whole = _loss_and_grads(model, algorithm, cfg, [whole], step)
        l_parts, g_parts = _loss_and_grads(model, algorithm, cfg, parts, step)
        assert l_whole.abs() > 0
        torch.testing.assert_close(l_parts, l_whole, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_parts, g_whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("min_reward, best", [(None, [1, 2, 4, 7]), (0.7, [1, 7])])
def test_rejection_sampling_trains_on_each_groups_best(toy_rollout, min_reward, best):
    """The buffer selects each group's best rollout (at least rs_min_reward); the loss is the masked-diffusion
    loss of those rows alone, averaged over the selections of the whole batch, so two shares add up."""
    model, out, rewards = toy_rollout
    model.eos_id = TOK.eos_id
    cfg = TrainConfig(algorithm="rejection_sft", num_generations=2, rs_min_reward=min_reward, num_replicates=2)
    algo = RejectionSFT(cfg)
    buf = algo.build(model, out, rewards, reference=None, scorer=None, buffer_index=0, first_row=0)
    assert buf["selected"].nonzero().squeeze(1).tolist() == best and buf["selected_total"] == len(best)
    whole = algo.loss(model, buf, 0)
    halves = [buf.slice(0, 4), buf.slice(4, 8)]
    parts = [algo.loss(model, h, 0) for h in halves]
    torch.testing.assert_close(parts[0].loss + parts[1].loss, whole.loss, rtol=1e-5, atol=1e-6)
    # Unselected rows carry nothing: dropping them from the batch leaves the loss (same mask keys).
    noise = mro.NoiseConfig(cfg.num_replicates, cfg.antithetic, cfg.mask_rate_min, cfg.mask_rate_max)
    seed = derive_seed(cfg.seed, "loss", 0)
    alone = sum(
        mro.rejection_sft_loss(model, buf["ids"][r : r + 1], buf["maskable"][r : r + 1], noise=noise,
                               attention_mask=buf["attention_mask"][r : r + 1], total=len(best), seed=seed,
                               row_offset=r, impl="chunked").loss
        for r in best
    )  # fmt: skip
    torch.testing.assert_close(alone, whole.loss, rtol=1e-5, atol=1e-6)
    assert whole.stats["masked_tokens"] > 0


@pytest.mark.parametrize("min_reward, kept", [(None, [2, 7]), (0.7, [7])])
def test_rejection_sampling_can_keep_only_solved_bests(toy_rollout, min_reward, kept):
    # rs_keep="solved": a group's best is trained on only when the task judged it solved.
    model, out, rewards = toy_rollout
    model.eos_id = TOK.eos_id
    cfg = TrainConfig(algorithm="rejection_sft", num_generations=2, rs_min_reward=min_reward, rs_keep="solved")
    solved = torch.tensor([0, 0, 1, 0, 0, 0, 1, 1])  # the bests are rows 1, 2, 4, 7
    buf = RejectionSFT(cfg).build(model, out, rewards, reference=None, scorer=None, buffer_index=0, first_row=0,
                                  solved=solved)  # fmt: skip
    assert buf["selected"].nonzero().squeeze(1).tolist() == kept and buf["selected_total"] == len(kept)
    with pytest.raises(ValueError, match="rs_keep='solved' needs the rollouts' solved flags"):
        RejectionSFT(cfg).build(model, out, rewards, reference=None, scorer=None, buffer_index=0, first_row=0)


@pytest.mark.parametrize("algorithm, keys", [("diffu_grpo", ("kl", "ratio_mean")), ("wd1", ("logp_token_mean",))])
def test_two_processes_match_one(tmp_path, algorithm, keys):
    """diffu-GRPO and wd1 on 2 CPU processes (gloo), one prompt group each: the buffers are built apart (with
    the all-reduced totals) and gathered whole; losses and the updated model equal the one-process run."""
    args = [f"{k}={v}" for k, v in {**TINY, **ALGORITHMS[algorithm], "device": "cpu"}.items()]
    one = _cli(["train", "--output-dir", str(tmp_path / "one"), *args], timeout=300)
    assert one.returncode == 0, one.stderr
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + (os.getpid() + 500) % 1000)}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import sys; from dmpo_fast.cli import main; sys.exit(main(sys.argv[1:]))",
             "train", "--output-dir", str(tmp_path / "two"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(2)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a = RunDir(tmp_path / "one", resume=True).read_metrics()
    b = RunDir(tmp_path / "two", resume=True).read_metrics()
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "reward_mean", "accuracy", *keys, "masked_tokens"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    wa = RunDir.load_checkpoint(tmp_path / "one" / "checkpoints" / "step-000002")["model"]
    wb = RunDir.load_checkpoint(tmp_path / "two" / "checkpoints" / "step-000002")["model"]
    assert len(RunDir.load_checkpoint(tmp_path / "two" / "checkpoints" / "step-000001")["buffer"]) == 2
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The perplexity reward through a causal LM saved to disk (hub name or directory)
# --------------------------------------------------------------------------------------------------


def _save_char_gpt2(path: Path) -> None:
    """A 1-layer GPT-2 with a character tokenizer over the tiny model's alphabet, saved like a hub model."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {c: i for i, c in enumerate(["<unk>", "<bos>", *TOK.characters])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>"
    )
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_mro_with_a_perplexity_model(tmp_path):
    _save_char_gpt2(tmp_path / "ar")
    cfg = _cfg(
        tmp_path, "mro", max_steps=1, num_iterations=1, eval_size=2, mro_ppl_model=str(tmp_path / "ar")
    )
    assert cfg.effective_ppl_weight == 1.0
    row = train_mod.train(cfg).metrics[0]
    # (C − min(PPL, C)) / F with C = F = 100: in [0, 1], and > 0 since a random 64-way LM has PPL ≈ 64 < C.
    assert 0.0 < row["ppl_reward_mean"] <= 1.0 and torch.isfinite(torch.tensor(row["loss"]))


# --------------------------------------------------------------------------------------------------
# Evaluation with test-time scaling
# --------------------------------------------------------------------------------------------------


def test_eval_with_test_time_scaling(monkeypatch):
    from dmpo_fast import sampling

    cfg = TrainConfig(eval_temperature=0.7, eval_size=4, impl="chunked", progress=False, eval_tts_window=3)
    plain = train_mod.evaluate_model(cfg)[0]
    assert plain["tts_k"] == 0
    # k = 1 runs through test-time scaling and never branches: the same keys and tokens as plain decoding.
    one = train_mod.evaluate_model(cfg.replace(eval_tts_k=1))[0]
    assert {k: one[k] for k in ("accuracy", "reward_mean", "n")} == {
        k: plain[k] for k in ("accuracy", "reward_mean", "n")
    }

    seen = []
    real = sampling.generate_tts

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs["k"], kwargs["window"], out.branches, out.candidates.ids.shape[0]))
        return out

    monkeypatch.setattr(sampling, "generate_tts", spy)
    four = train_mod.evaluate_model(cfg.replace(eval_tts_k=4))[0]
    assert four["tts_k"] == 4 and four["n"] == 4 and 0.0 <= four["accuracy"] <= 1.0
    assert seen and all(k == 4 and w == 3 and branches > 0 and rows == 16 for k, w, branches, rows in seen)


def test_cli_eval_tts_option(tmp_path):
    js = tmp_path / "eval.json"
    args = ["eval", "--model", "tiny", "--tts-k", "2", "-n", "2", "--json", str(js), "eval_temperature=0.7",
            "progress=false", "impl=chunked"]  # fmt: skip
    out = _cli(args, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "test-time scaling: 2 candidates" in out.stdout
    assert [r["tts_k"] for r in json.loads(js.read_text())] == [2]
    greedy = _cli(["eval", "--model", "tiny", "--tts-k", "2", "-n", "2"], timeout=300)
    assert greedy.returncode == 2 and "eval_tts_k" in greedy.stderr and "eval_temperature" in greedy.stderr


# --------------------------------------------------------------------------------------------------
# Bad values name their field
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"algorithm": "ppo"}, "algorithm must be one of 'dmpo', 'mro', 'diffu_grpo'"),
        ({"grpo_epsilon": 0.0}, "grpo_epsilon must be > 0"),
        ({"grpo_beta": -0.1}, "grpo_beta must be >= 0"),
        ({"grpo_p_mask_prompt": 1.5}, r"grpo_p_mask_prompt must be in \[0, 1\]"),
        ({"grpo_scale_rewards": "mean"}, "grpo_scale_rewards must be one of 'none', 'std'"),
        ({"grpo_normalize": "batch"}, "grpo_normalize must be one of 'token', 'sequence'"),
        ({"algorithm": "diffu_grpo", "reference": "none"}, "reference must be .* grpo_beta > 0"),
        (
            {"algorithm": "diffu_grpo", "num_generations": 1},
            "num_generations must be >= 2 for algorithm='diffu_grpo'",
        ),
        ({"mro_window": 0}, "mro_window must be an int >= 1"),
        ({"mro_windows_per_rollout": 0}, "mro_windows_per_rollout must be an int >= 1"),
        ({"mro_verification": "all"}, "mro_verification must be one of 'leave_one_out', 'pre_step', 'final'"),
        ({"mro_returns": "sum"}, "mro_returns must be one of 'reward_to_go', 'window'"),
        ({"mro_importance": "ppo"}, "mro_importance must be one of 'none', 'uniform', 'advantage'"),
        ({"mro_tv_weight": -1.0}, "mro_tv_weight must be >= 0"),
        ({"mro_anchor_weight": -1.0}, "mro_anchor_weight must be >= 0"),
        ({"mro_anchor": "kl2"}, "mro_anchor must be one of 'none', 'denoise'"),
        ({"mro_baseline": "mean"}, "mro_baseline must be one of 'none', 'group'"),
        ({"mro_rs_window": 0}, "mro_rs_window must be an int >= 1"),
        (
            {"algorithm": "mro_rs", "mro_tv_weight": 0.0, "mro_ppl_model": None},
            "algorithm='mro_rs' ranks partial states",
        ),
        ({"mro_ppl_weight": 0.5, "mro_ppl_model": None}, "mro_ppl_weight=0.5 needs mro_ppl_model"),
        (
            {"mro_ppl_weight": 0.5, "task": "gsm8k"},
            "mro_ppl_weight=0.5 needs mro_ppl_model .*'auto' has no built-in scorer for task 'gsm8k'",
        ),
        ({"mro_ppl_model": ""}, "mro_ppl_model must be"),
        (
            {"algorithm": "mro", "mro_tv_weight": 0.0, "mro_task_weight": 0.0, "mro_ppl_model": None},
            "algorithm='mro' has no reward",
        ),
        ({"eval_tts_k": -1}, "eval_tts_k must be an int >= 0"),
        ({"eval_tts_k": 2}, "eval_tts_k > 0 needs eval_temperature > 0"),
        (
            {"eval_tts_k": 2, "eval_temperature": 0.7, "mro_tv_weight": 0.0, "mro_ppl_model": None},
            "eval_tts_k > 0 .* mro_tv_weight > 0",
        ),
        ({"eval_tts_window": 0}, "eval_tts_window must be an int >= 1"),
    ],
)
def test_bad_fields_name_themselves(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().replace(**changes)


def test_algorithm_options_that_are_valid():
    # MRO and GRPO without a reference need no reference setting; DMPO's alpha does not apply to them.
    assert TrainConfig(algorithm="mro", reference="none").reference == "none"
    assert TrainConfig(algorithm="diffu_grpo", grpo_beta=0.0, reference="none").grpo_beta == 0.0
    assert (
        TrainConfig(eval_tts_k=2, remasking="random").eval_tts_k == 2
    )  # random remasking diversifies at T = 0
    assert TrainConfig(mro_ppl_model="gpt2", mro_ppl_weight=0.0).effective_ppl_weight == 0.0
    assert TrainConfig(mro_ppl_model=None).effective_ppl_weight == 0.0
    assert TrainConfig().effective_ppl_weight == 1.0  # "auto": Sudoku's built-in scorer


def test_mro_options_reach_the_mro_config():
    from dmpo_fast.algorithms.mro import mro_config

    cfg = TrainConfig(algorithm="mro", mro_baseline="none", mro_anchor="none", mro_anchor_weight=0.25)
    opts = mro_config(cfg)
    assert (opts.baseline, opts.anchor, opts.anchor_weight) == ("none", "none", 0.25)
    # The trainer's MRO keeps the denoiser anchored unless told otherwise; DMPO's defaults are untouched.
    assert mro_config(TrainConfig(algorithm="mro")).anchor == "best"
    assert TrainConfig().learning_rate == 3e-4 and TrainConfig().num_iterations == 2


def test_mro_rejection_sampling_groups_its_rollouts_and_keeps_the_best_by_multi_reward(monkeypatch):
    # mro_rs: the G rollouts of a prompt are decoded as one step-wise group (generate_tts grouped=True,
    # branching every mro_rs_window calls) and each group keeps its best by λ_tv·mean r_tv + λ_q·task.
    from dmpo_fast import sampling
    from dmpo_fast.algorithms import get
    from dmpo_fast.algorithms.mro_rs import multi_reward
    from dmpo_fast.policy import load_policy
    from dmpo_fast.tasks import get_task

    seen = []
    real = sampling.generate_tts

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs["k"], kwargs["window"], kwargs["grouped"], out.branches, out.rollout.ids.shape[0]))
        return out

    monkeypatch.setattr(sampling, "generate_tts", spy)
    cfg = TrainConfig(algorithm="mro_rs", prompts_per_step=2, num_generations=4, mro_rs_window=3, impl="chunked",
                      progress=False, mro_ppl_model=None, rs_keep="best")  # fmt: skip
    algo = get("mro_rs")(cfg)
    policy, tokenizer = load_policy(cfg, torch.device("cpu"))
    task = get_task(cfg.task, **cfg.task_options())
    buf = train_mod.make_buffer(algo, policy, None, tokenizer, task, cfg, [task.reward], task.train()[:2], 0)
    assert seen == [(4, 3, True, seen[0][3], 8)] and seen[0][3] > 0
    r, sel = buf["rewards"], buf["selected"]
    assert int(sel.sum()) == 2 == buf["selected_total"]
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        assert sel[rows].sum() == 1
        assert buf["multi_reward"][rows].argmax() == sel[rows].int().argmax()
    step = {"tv": buf["tv_mean"][:, None], "ppl": None}
    torch.testing.assert_close(multi_reward(step, r, algo.options), buf["multi_reward"])
    # mro_rs's default (rs_keep="solved"): of those bests, only the solved ones are trained on.
    algo = get("mro_rs")(cfg.replace(rs_keep=None))
    rows = task.train()[:8]
    buf = train_mod.make_buffer(algo, policy, None, tokenizer, task, algo.cfg, [task.reward], rows, 0)
    best = buf["multi_reward"].view(8, 4).argmax(dim=1) + torch.arange(0, 32, 4)
    solved_best = best[buf["solved"][best].bool()]
    assert 0 < len(solved_best) < 8  # the check below can tell the two rules apart
    assert buf["selected"].nonzero().squeeze(1).tolist() == solved_best.tolist()


def test_mro_with_the_built_in_perplexity_scorer(tmp_path):
    pytest.importorskip("transformers")
    result = _train(_cfg(tmp_path, "mro", max_steps=1, num_iterations=1, eval_size=2, mro_ppl_model="tiny_ar_sudoku"))
    row = result.metrics[0]
    assert 0.0 <= row["ppl_reward_mean"] <= 1.0 and 0.0 <= row["tv_reward_mean"] <= 1.0


def test_mro_with_the_kl_anchor_to_the_reference(tmp_path):
    # The frozen copy starts equal to the policy: KL 0 on the first step, > 0 once the policy has moved.
    result = _train(_cfg(tmp_path, "mro", mro_anchor="kl", mro_anchor_weight=0.5, mro_ppl_model=None))
    kl = [row["anchor_loss"] for row in result.metrics]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[1] > 0
    with pytest.raises(ValueError, match="mro_anchor='kl' needs a reference model"):
        TrainConfig(algorithm="mro", mro_anchor="kl", reference="none")
