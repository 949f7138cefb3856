"""Rewards: a reward function never stops or hangs a run (timeouts, non-finite values, SystemExit, None),
reward functions given as functions or import paths, per-function values, math answers by math-verify,
and the d1 reward preset with the paper's reward scale."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from dmpo_fast.config import RewardPreset, TrainConfig
from dmpo_fast.tasks import (
    CountdownTask,
    GSM8KTask,
    Math500Task,
    SudokuTask,
    answers,
    columns_of,
    get_task,
    presets,
    resolve_reward,
    reward_path,
    safe_rewards,
    score_rewards,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PROMPTS = ["p"] * 4
COMPLETIONS = ["a", "bb", "ccc", "dddd"]


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


_release = threading.Event()


def hanging_reward(prompts, completions, **columns):
    _release.wait()  # never set: a reward that never returns
    return [1.0] * len(completions)


def huge_reward(prompts, completions, **columns):
    values = [1e38, math.inf, math.nan, 1e6, -2e6, 0.5]
    return [values[i % 6] for i in range(len(completions))]


def exiting_reward(prompts, completions, **columns):
    if any(c == "ccc" for c in completions):
        sys.exit(3)
    return [1.0] * len(completions)


def always_exiting_reward(prompts, completions, **columns):
    sys.exit(3)


def none_reward(prompts, completions, **columns):
    return None


def interrupting_reward(prompts, completions, **columns):
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- A: reliability
def test_a_hung_reward_times_out_and_only_its_samples_fail(caplog):
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        scores = score_rewards([hanging_reward, length_reward], PROMPTS, COMPLETIONS, timeout=0.3)
    assert time.time() - t0 < 5
    assert scores.n_failed == 4 and torch.isnan(scores.total).all()
    assert torch.isnan(scores.per_function["hanging_reward"]).all()
    assert scores.per_function["length_reward"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert "hanging_reward" in caplog.text and "reward_timeout" in caplog.text


def test_a_hung_reward_does_not_keep_the_process_alive(tmp_path):
    script = textwrap.dedent(
        """
        import threading
        from dmpo_fast.tasks import safe_rewards

        def hang(prompts, completions, **columns):
            threading.Event().wait()

        rewards, n_failed = safe_rewards(hang, ["p"], ["c"], timeout=0.2)
        print("failed", n_failed)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "failed 1" in out.stdout


def test_a_non_finite_and_huge_rewards_count_as_failures(caplog):
    completions = ["a"] * 6
    with caplog.at_level(logging.WARNING):
        rewards, n_failed = safe_rewards(huge_reward, ["p"] * 6, completions)
    assert n_failed == 4
    assert torch.isnan(rewards[[0, 1, 2, 4]]).all()
    assert rewards[3].item() == 1e6 and rewards[5].item() == 0.5
    assert "huge_reward" in caplog.text and "counted as failures" in caplog.text


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_system_exit_from_a_reward_fails_its_samples(caplog, timeout):
    with caplog.at_level(logging.WARNING):
        rewards, n_failed = safe_rewards(exiting_reward, PROMPTS, COMPLETIONS, timeout=timeout)
    assert n_failed == 1 and math.isnan(rewards[2].item()) and rewards[[0, 1, 3]].tolist() == [1.0] * 3
    assert "exiting_reward" in caplog.text and "SystemExit" in caplog.text


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_none_for_a_whole_batch_fails_every_sample(caplog, timeout):
    with caplog.at_level(logging.WARNING):
        scores = score_rewards([none_reward, length_reward], PROMPTS, COMPLETIONS, timeout=timeout)
    assert scores.n_failed == 4 and torch.isnan(scores.total).all()
    assert "none_reward" in caplog.text


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_keyboard_interrupt_still_stops(timeout):
    with pytest.raises(KeyboardInterrupt):
        safe_rewards(interrupting_reward, PROMPTS, COMPLETIONS, timeout=timeout)


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_caller_bugs_still_raise(timeout):
    with pytest.raises(ValueError, match="returned 1 values for 4"):
        safe_rewards(lambda prompts, completions, **kw: [1.0], PROMPTS, COMPLETIONS, timeout=timeout)


def test_a_reward_timeout_field():
    assert TrainConfig().reward_timeout == 60
    assert TrainConfig(reward_timeout=0).reward_timeout == 0
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="reward_timeout"):
            TrainConfig(reward_timeout=bad)


def _small(tmp_path, **kw):
    small = dict(
        output_dir=str(tmp_path / "run"), prompts_per_step=2, num_generations=4, max_steps=2,
        num_iterations=2, eval_size=4, progress=False, tensorboard=False, plot=False, impl="chunked",
        num_replicates=2, elbo_replicates=2,
    )  # fmt: skip
    return TrainConfig(**{**small, **kw})


@pytest.mark.parametrize("reward", ["hanging_reward", "none_reward", "huge_reward", "always_exiting_reward"])
def test_a_the_run_goes_on_past_a_bad_reward(tmp_path, reward):
    from dmpo_fast.trainer import train

    result = train(_small(tmp_path, reward_funcs=[f"{__name__}:{reward}"], reward_timeout=0.3))
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert all(r["reward_failures"] > 0 for r in result.metrics)
    assert all(math.isfinite(r["loss"]) for r in result.metrics)


def test_a_readme_says_what_none_does():
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "returns None (for a sample or the whole batch)" in readme


# --------------------------------------------------------------------------- B: functions and paths
def test_b_functions_are_recorded_by_import_path(tmp_path):
    cfg = TrainConfig(reward_funcs=[length_reward, "pkg.mod:f"])
    assert cfg.to_dict()["reward_funcs"] == [f"{__name__}:length_reward", "pkg.mod:f"]
    assert cfg.replace(seed=1).reward_funcs[0] is length_reward
    assert reward_path(length_reward) == f"{__name__}:length_reward"
    assert resolve_reward(reward_path(length_reward)) is length_reward


def test_b_functions_without_an_import_path_are_refused():
    def nested(prompts, completions, **kw):
        return [0.0] * len(completions)

    import functools

    for fn in (lambda prompts, completions, **kw: [0.0], nested, functools.partial(length_reward)):
        with pytest.raises(ValueError, match="reward_funcs: .* has no import path"):
            TrainConfig(reward_funcs=[fn])
    for bad in ("", 3):
        with pytest.raises(ValueError, match="reward_funcs"):
            TrainConfig(reward_funcs=[bad])


def test_b_a_function_runs_in_the_trainer_and_config_yaml_records_it(tmp_path):
    import yaml

    from dmpo_fast.trainer import train

    result = train(_small(tmp_path, reward_funcs=[length_reward], max_steps=1, num_iterations=1))
    saved = yaml.safe_load((Path(result.output_dir) / "config.yaml").read_text())
    assert saved["reward_funcs"] == [f"{__name__}:length_reward"]
    assert TrainConfig.from_dict(saved).reward_funcs == [f"{__name__}:length_reward"]


def test_b_import_paths_resolve_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_reward_for_test.py").write_text(
        "def reward(prompts, completions, **columns):\n    return [2.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_reward_for_test", raising=False)
    try:
        fn = resolve_reward("cwd_reward_for_test:reward")
        assert fn(PROMPTS, COMPLETIONS) == [2.0] * 4
        assert str(tmp_path) not in sys.path  # only for the import
    finally:
        sys.modules.pop("cwd_reward_for_test", None)
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_reward_module_xyz:reward")


def test_b_per_function_values():
    scores = score_rewards([length_reward, length_reward, "countdown"], PROMPTS, COMPLETIONS,
                           {"nums": [[1, 2]] * 4, "target": [3] * 4}, weights=[2.0, 1.0, 0.5])  # fmt: skip
    assert list(scores.per_function) == ["length_reward", "length_reward_2", "countdown"]
    assert scores.per_function["length_reward"].tolist() == [1.0, 2.0, 3.0, 4.0]  # unweighted
    assert scores.total.tolist() == [3.0, 6.0, 9.0, 12.0]
    d1 = GSM8KTask(source=str(FIXTURES / "gsm8k.jsonl"), reward_preset="d1")
    scores = score_rewards(d1.reward, ["p"], ["<answer>18</answer>"], {"answer": ["18"]})
    assert list(scores.per_function) == ["xmlcount", "soft_format", "strict_format", "integer", "correctness"]
    assert scores.total.tolist() == pytest.approx([sum(v.item() for v in scores.per_function.values())])


def test_b_rollout_returns_the_per_function_values(tmp_path):
    from dmpo_fast.policy import load_policy
    from dmpo_fast.rollouts import rollout

    cfg = _small(tmp_path)
    policy, tok = load_policy(cfg, torch.device("cpu"))
    task = get_task(cfg.task, **cfg.task_options())
    result = rollout(policy, tok, task, task.train(2, seed=0), repeat=2, cfg=cfg, temperature=0.7, seed=0,
                     reward_fns=[task.reward, length_reward])  # fmt: skip
    out, completions, rewards, n_failed, solved = result  # the 5-tuple of before
    assert set(result.reward_parts) == {"sudoku", "length_reward"}
    assert result.reward_parts["length_reward"].tolist() == [float(len(c)) for c in completions]
    torch.testing.assert_close(rewards, result.reward_parts["sudoku"] + result.reward_parts["length_reward"])


# --------------------------------------------------------------------------- C: math-verify
@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("\\sqrt2", "\\sqrt{2}"),
        ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("5 \\text{ cm}", "5"),
        ("\\$5", "5"),
    ],
)
def test_c_math_answers_by_math_verify(predicted, reference):
    assert answers.math_equal(predicted, reference)
    task = Math500Task(source=str(FIXTURES / "math500.jsonl"))
    assert task.reward(None, [f"so \\boxed{{{predicted}}}"], answer=[reference]) == [pytest.approx(1.1)]
    assert task.is_correct(None, [f"\\boxed{{{predicted}}}"], answer=[reference]) == [1.0]
    assert not answers.math_equal(predicted, "7")


def test_c_gsm8k_compares_other_forms_by_math_verify():
    task = GSM8KTask(source=str(FIXTURES / "gsm8k.jsonl"))
    completions = ["\\boxed{\\frac{5}{2}}", "\\boxed{2.50}", "\\boxed{\\frac{5}{3}}"]
    assert task.is_correct(None, completions, answer=["2.5"] * 3) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("task", ["gsm8k", "math500"])
def test_c_math_tasks_stop_without_math_verify(monkeypatch, task):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # the import fails even where it is installed
    with pytest.raises(
        ImportError, match=r"pip install \"dmpo-fast\[tasks\]\" \(or pip install math-verify\)"
    ):
        get_task(task)
    with pytest.raises(ValueError, match=rf"task='{task}'.*pip install"):
        TrainConfig(task=task)
    TrainConfig(task="countdown")  # the other tasks do not need it


def test_c_dev_extra_installs_math_verify():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in ("dev", "tasks"):
        assert any(dep.startswith("math-verify") for dep in extras[extra]), extra


# --------------------------------------------------------------------------- D: the d1 preset
GSM8K_PERFECT = "<reasoning>\n48 - 30 = 18\n</reasoning>\n<answer>\n18\n</answer>\n"
MATH_PERFECT = "<reasoning>\n6/8 + 1/8\n</reasoning>\n<answer>\n\\boxed{\\frac{7}{8}}\n</answer>\n"


def test_d_presets_match_the_config_literal():
    import typing

    assert presets.REWARD_PRESETS == typing.get_args(RewardPreset)


def test_d_gsm8k_d1_functions_and_scale():
    assert presets.xml_count(GSM8K_PERFECT) == 0.5
    assert presets.xml_count(GSM8K_PERFECT + "tail") == pytest.approx(0.5 - 0.004 - 0.004)
    assert presets.xml_count("<answer>18</answer>") == 0.0
    assert presets.soft_format("<reasoning>x</reasoning> <answer>1</answer> more") == 0.5
    assert presets.soft_format("pre <reasoning>x</reasoning><answer>1</answer>") == 0.0  # must start with it
    assert presets.strict_format(GSM8K_PERFECT) == 0.5 and presets.strict_format(GSM8K_PERFECT + "x") == 0.0
    assert presets.strict_format("<reasoning>x</reasoning>\n<answer>\n18\n</answer>\n") == 0.0
    assert (
        presets.integer_answer("<answer> 18 </answer>") == 0.5
        and presets.integer_answer("<answer>1.5</answer>") == 0
    )
    assert presets.integer_answer("42") == 0.5  # no tags: the whole text is the answer, as in d1
    assert presets.gsm8k_correct("<answer>\n1,200\n</answer>", "1200") == 2.0
    assert presets.gsm8k_correct("<answer>\n17\n</answer>", "#### 18") == 0.0
    task = GSM8KTask(source=str(FIXTURES / "gsm8k.jsonl"), reward_preset="d1")
    rows = task.test(seed=None)
    assert "<reasoning>" in rows[0]["prompt"] and rows[0]["prompt"].endswith(rows[0]["question"])
    scores = task.reward(None, [GSM8K_PERFECT, "the answer is 18", GSM8K_PERFECT], **columns_of(rows))
    assert scores == pytest.approx([4.0, 0.0, 2.0])  # a wrong number: the four format rewards
    assert task.is_correct(None, [GSM8K_PERFECT], answer=["18"]) == [1.0]


def test_d_math500_d1_functions_and_scale():
    assert [presets.boxed_format(t) for t in (
        "<answer>\\boxed{1}</answer>", "<answer>1</answer>", "\\boxed{1}", "1"
    )] == [1.0, 0.75, 0.5, 0.25]  # fmt: skip
    assert presets.math_correct(MATH_PERFECT, "\\frac{7}{8}") == 2.0
    assert presets.math_correct("<answer>7/8</answer>", "\\frac{7}{8}") == 0.0  # d1 reads the \boxed only
    task = Math500Task(source=str(FIXTURES / "math500.jsonl"), reward_preset="d1")
    rows = task.test(seed=None)
    assert "<answer>" in rows[0]["prompt"] and "\\boxed{}" in rows[0]["prompt"]
    assert task.reward(None, [MATH_PERFECT], answer=["0.875"]) == [3.0]
    assert task.reward(None, ["<answer>\\boxed{1}</answer>"], answer=["2"]) == [1.0]


def test_d_countdown_and_sudoku_d1_read_only_the_answer_block():
    cd = CountdownTask(prompt_style="instruct", reward_preset="d1")
    cols = {"nums": [[3, 5, 7, 2]] * 4, "target": [24] * 4}
    completions = [
        "<answer>7*3+5-2</answer>",
        "<answer>7+5+3+2</answer>",
        "7*3+5-2",
        "<answer>x</answer>",
    ]
    assert cd.reward(None, completions, **cols) == [1.0, 0.1, 0.0, 0.1]
    assert CountdownTask(prompt_style="instruct").reward(None, completions, **cols) == [1.0, 0.1, 1.0, 0.0]
    sd = SudokuTask(prompt_style="instruct", reward_preset="d1")
    row = sd.test(1, seed=0)[0]
    solution = row["solution"]
    assert sd.reward(None, [f"<answer>{solution}</answer>", solution], **columns_of([row, row])) == [1.0, 0.0]


def test_d_preset_validation():
    with pytest.raises(ValueError, match="reward_preset must be one of 'default', 'd1'"):
        TrainConfig(reward_preset="d2")
    with pytest.raises(ValueError, match="reward_preset='d1', task='sudoku'.*prompt_style"):
        TrainConfig(task="sudoku", reward_preset="d1")  # the embedded compact prompt has no <answer> block
    cfg = TrainConfig(task="sudoku", task_kwargs={"prompt_style": "instruct"}, reward_preset="d1")
    assert cfg.task_options() == {"prompt_style": "instruct", "reward_preset": "d1"}
    assert TrainConfig(task="gsm8k").task_options() == {}
    with pytest.raises(ValueError, match="built-in tasks"):
        TrainConfig(task="dmpo_fast.tasks.sudoku:SudokuTask", reward_preset="d1")
    with pytest.raises(ValueError, match="with the field reward_preset"):
        TrainConfig(task="gsm8k", task_kwargs={"reward_preset": "d1"})
    with pytest.raises(ValueError, match="format_score"):
        GSM8KTask(reward_preset="d1", format_score=0.2)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_d_paper_recipes_use_the_d1_rewards(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.reward_preset == "d1"
    task = get_task(cfg.task, **cfg.task_options())
    assert list(task.reward_functions()) == {
        "gsm8k": ["xmlcount", "soft_format", "strict_format", "integer", "correctness"],
        "math500": ["boxed_format", "correctness"],
    }.get(cfg.task, [cfg.task])
