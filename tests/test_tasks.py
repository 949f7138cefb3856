"""Tasks, rewards and the character tokenizer: generation invariants, reward values, refusals, loaders."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmpo_fast.tasks import (
    CountdownTask,
    GSM8KTask,
    Math500Task,
    SudokuTask,
    Task,
    answers,
    columns_of,
    countdown,
    get_task,
    load_rows,
    register_task,
    resolve_reward,
    safe_rewards,
    sudoku,
    task_names,
)
from dmpo_fast.tokenizer import CharTokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")
GSM8K_FILE = os.path.join(FIXTURES, "gsm8k.jsonl")
MATH_FILE = os.path.join(FIXTURES, "math500.jsonl")


def _score(task: Task, rows: list[dict], completions: list) -> list:
    return task.reward([r["prompt"] for r in rows], completions, **columns_of(rows))


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_vocabulary_and_round_trip():
    tok = CharTokenizer()
    assert tok.vocab_size < 64
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.bos_id) == (0, 1, 2, 3)
    assert len({tok.pad_id, tok.eos_id, tok.mask_id, tok.bos_id}) == 4
    rows = SudokuTask().train(20) + CountdownTask().train(20)
    for row in rows:
        text = row["prompt"] + row["reference"]
        ids = tok.encode(text)
        assert len(ids) == len(text) and min(ids) >= 4 and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    ids = tok.encode("12/3", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "12/3"
    assert tok.decode(ids, skip_special=False) == "<bos>12/3<eos>"
    assert tok.decode(tok.encode("1+2") + [tok.eos_id] + tok.encode("99"), stop_at_eos=True) == "1+2"
    assert tok.decode(torch.tensor(tok.encode("(4-1)*2"))) == "(4-1)*2"


@pytest.mark.parametrize("text,bad", [("12#4", "#"), ("Sudoku", "S"), ("é", "é"), ("tab\there", "\t")])
def test_tokenizer_unknown_character_is_named(text, bad):
    with pytest.raises(ValueError, match=repr(bad)[1:-1].replace("\\", "\\\\")):
        CharTokenizer().encode(text)


def test_tokenizer_batch_encode_padding(tmp_path):
    tok = CharTokenizer()
    ids, mask = tok.batch_encode(["12", "3456", ""], pad_left=True)
    assert ids.dtype == torch.long and ids.shape == (3, 4) and mask.shape == (3, 4)
    assert ids[0].tolist() == [tok.pad_id, tok.pad_id] + tok.encode("12")
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    ids_r, mask_r = tok.batch_encode(["12", "3456"], pad_left=False, add_eos=True)
    assert ids_r[0].tolist() == tok.encode("12") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert mask_r[0].tolist() == [1, 1, 1, 0, 0]
    assert tok.batch_decode(ids) == ["12", "3456", ""]
    tok.save(tmp_path)
    assert CharTokenizer.load(tmp_path) == tok
    assert json.loads((tmp_path / "tokenizer.json").read_text())["characters"] == tok.characters
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a dmpo_fast character tokenizer"):
        CharTokenizer.load(tmp_path / "other")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


# --------------------------------------------------------------------------- sudoku
def _valid_grid(g: str) -> bool:
    rows = [g[4 * r : 4 * r + 4] for r in range(4)]
    cols = ["".join(g[4 * r + c] for r in range(4)) for c in range(4)]
    boxes = [
        "".join(g[4 * (br + r) + bc + c] for r in range(2) for c in range(2))
        for br in (0, 2)
        for bc in (0, 2)
    ]
    return all(sorted(u) == list("1234") for u in rows + cols + boxes)


def test_sudoku_grids_and_split():
    grids = sudoku.all_grids()
    assert len(grids) == 288 == len(set(grids))
    # independent enumeration: stack two valid 2-row bands (rows are permutations of 1234)
    perms = ["".join(p) for p in itertools.permutations("1234")]
    bands = [
        a + b
        for a, b in itertools.product(perms, repeat=2)
        if len(set(a[:2] + b[:2])) == 4 and len(set(a[2:] + b[2:])) == 4
    ]
    assert sorted(t + u for t, u in itertools.product(bands, repeat=2) if _valid_grid(t + u)) == list(grids)
    train, test = sudoku.split_grids(0.2, 0)
    assert (
        len(test) == round(0.2 * 288) and not set(train) & set(test) and set(train) | set(test) == set(grids)
    )
    assert sudoku.split_grids(0.2, 1) != (train, test)


def test_sudoku_puzzles_unique_and_splits_disjoint():
    task = SudokuTask(min_blanks=4, max_blanks=12)
    grids = sudoku.all_grids()
    train, test = task.train(120, seed=1), task.test(60, seed=1)
    for row in train + test:
        puzzle, solution = row["puzzle"], row["solution"]
        assert puzzle.count("0") == row["num_blanks"] and 4 <= row["num_blanks"] <= 12
        assert all(p in ("0", s) for p, s in zip(puzzle, solution, strict=True))
        assert sudoku.solve(puzzle) == [solution]
        # uniqueness checked independently of the solver: exactly one of the 288 grids fits the clues
        fits = [g for g in grids if all(p in ("0", c) for p, c in zip(puzzle, g, strict=True))]
        assert fits == [solution]
        assert row["prompt"] == sudoku.format_grid(puzzle) + "="
    train_grids, test_grids = task.grids("train"), task.grids("test")
    assert {r["solution"] for r in train} <= set(train_grids)
    assert {r["solution"] for r in test} <= set(test_grids)
    assert not {r["solution"] for r in train} & {r["solution"] for r in test}


def test_sudoku_determinism_and_config_errors():
    task = SudokuTask()
    assert task.train(15, seed=3) == SudokuTask().train(15, seed=3)
    assert task.train(15, seed=3) != task.train(15, seed=4)
    assert len(task.train()) == task.train_size
    with pytest.raises(ValueError, match="max_blanks"):
        SudokuTask(max_blanks=13)
    with pytest.raises(ValueError, match="min_blanks"):
        SudokuTask(min_blanks=9, max_blanks=5)
    with pytest.raises(ValueError, match="prompt_style"):
        SudokuTask(prompt_style="verbose")
    with pytest.raises(ValueError, match="split"):
        task.rows("validation", 3, 0)
    with pytest.raises(ValueError, match="n must be"):
        task.train(-1)
    assert sudoku.solve("1100" + "0" * 12) == []  # contradictory clues
    assert len(sudoku.solve("0" * 16, limit=5)) == 5


def test_sudoku_reward_values():
    task = SudokuTask(min_blanks=6, max_blanks=6)
    rows = task.test(4, seed=0)
    refs = [r["reference"] for r in rows]
    assert _score(task, rows, refs) == [1.0] * 4
    assert task.is_correct(None, refs, **columns_of(rows)) == [1.0] * 4
    assert task.accuracy(rows, refs) == 1.0
    row = rows[0]
    puzzle, solution = row["puzzle"], row["solution"]
    blanks = [i for i, c in enumerate(puzzle) if c == "0"]
    wrong = list(solution)
    wrong[blanks[0]] = "1" if solution[blanks[0]] != "1" else "2"
    one_wrong = "".join(wrong)
    cases = [
        (solution, 1.0),  # no row separators
        (f"I think\n<answer>{sudoku.format_grid(solution)}</answer>", 1.0),
        (sudoku.format_grid(one_wrong), 5 / 6),
        (solution[: blanks[2]], 2 / 6),  # truncated: 2 blanks answered
        (puzzle, 0.0),
        ("", 0.0),
        ("garbage ###", 0.0),
        ("9" * 10**6, 0.0),
    ]
    for completion, expected in cases:
        got = task.reward([row["prompt"]], [completion], puzzle=[puzzle], solution=[solution])[0]
        assert got == pytest.approx(expected), completion[:40]
    chat = [{"role": "assistant", "content": solution}]
    assert task.reward(None, [chat, None, 17], puzzle=[puzzle] * 3, solution=[solution] * 3) == [
        1.0,
        0.0,
        0.0,
    ]
    # a changed clue keeps the blank-cell reward at 1 but is not "solved"
    clue = next(i for i, c in enumerate(puzzle) if c != "0")
    altered = list(solution)
    altered[clue] = "1" if solution[clue] != "1" else "2"
    altered = "".join(altered)
    assert task.reward(None, [altered], puzzle=[puzzle], solution=[solution]) == [1.0]
    assert task.is_correct(None, [altered], puzzle=[puzzle], solution=[solution]) == [0.0]
    with pytest.raises(ValueError, match="'solution'"):
        task.reward(None, [solution], puzzle=[puzzle])


def test_sudoku_instruct_style():
    task = SudokuTask(prompt_style="instruct")
    rows = task.train(3)
    assert all("<answer>" in r["prompt"] and r["reference"].startswith("<answer>") for r in rows)
    assert _score(task, rows, [r["reference"] for r in rows]) == [1.0] * 3


# --------------------------------------------------------------------------- countdown
def test_countdown_rows_solvable_and_split():
    task = CountdownTask()
    train, test = task.train(150, seed=0), task.test(60, seed=0)
    for row in train + test:
        assert len(row["nums"]) in (3, 4) and all(1 <= x <= 99 for x in row["nums"])
        assert 1 <= row["target"] <= 99
        assert countdown.evaluate(row["solution"], row["nums"]) == row["target"]
        assert row["prompt"] == " ".join(map(str, row["nums"])) + f">{row['target']}:"
    keys = lambda rows: {(tuple(sorted(r["nums"])), r["target"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(test)
    assert _score(task, train, [r["reference"] for r in train]) == [1.0] * len(train)
    assert task.train(20, seed=5) == CountdownTask().train(20, seed=5) != task.train(20, seed=6)
    small = CountdownTask(
        num_counts=(3,), max_number=9, max_target=20, prompt_style="instruct", use_all=False
    )
    rows = small.test(10)
    assert all(len(r["nums"]) == 3 and "at most once" in r["prompt"] for r in rows)
    assert _score(small, rows, [r["reference"] for r in rows]) == [1.0] * 10


def test_countdown_config_errors():
    with pytest.raises(ValueError, match="num_counts"):
        CountdownTask(num_counts=(1,))
    with pytest.raises(ValueError, match="min_number"):
        CountdownTask(min_number=10, max_number=5)
    with pytest.raises(ValueError, match="prompt_style"):
        CountdownTask(prompt_style="chat")
    with pytest.raises(ValueError, match="widen"):  # the only problem, 1*1=1, hashes into train
        CountdownTask(num_counts=(2,), max_number=1, max_target=1, test_fraction=0.01).test(2)
    with pytest.raises(ValueError, match="'target'"):
        CountdownTask().reward(None, ["1+2"], nums=[[1, 2]])


NUMS, TARGET = [4, 2, 2, 8], 24


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("8*2+4*2", 1.0),
        ("8 / (2 / (4 + 2))", 1.0),  # exact Fractions through the non-integer 1/3
        ("8*2+4*2 = 24", 1.0),
        ("reasoning...\n<answer> 8 × 2 + 4 × 2 </answer>", 1.0),
        ("8*2+4+2", 0.1),  # valid expression, wrong value
        ("8*2+4", 0.0),  # does not use every number (use_all=True)
        ("8*8+4+2+2", 0.0),  # reuses 8
        ("__import__('os').system('true')", 0.0),
        ("x + 8 + 4 + 2 + 2", 0.0),
        ("abs(8) + 4 + 2 + 2", 0.0),
        ("8**2 + 4 + 2 + 2", 0.0),
        ("2**99999999", 0.0),
        ("8/(2-2)+4", 0.0),  # division by zero
        ("-8+4*2*2", 0.0),  # unary minus is not in the grammar
        ("8//2*4+2", 0.0),
        ("8.0*2+4*2", 0.0),
        ("8*2+4*2_0", 0.0),
        ("(" * 150 + "8*2+4*2" + ")" * 150, 0.0),  # over 200 characters
        ("1+" * 50_000 + "1", 0.0),
        ("", 0.0),
    ],
)
def test_countdown_scores_and_refusals(completion, expected):
    t0 = time.perf_counter()
    got = countdown.score(completion, NUMS, TARGET)
    assert time.perf_counter() - t0 < 0.5
    assert got == expected


def test_countdown_subset_mode_and_nesting():
    assert countdown.score("8*2+4", [4, 2, 2, 8], 20, use_all=False) == 1.0
    assert countdown.score("8*8+4", [4, 2, 2, 8], 68, use_all=False) == 0.0
    deep = "(" * 90 + "8" + ")" * 90 + "*2+4*2"
    assert len(deep) <= 200 and countdown.score(deep, NUMS, TARGET) == 1.0
    task = CountdownTask()
    rows = [{"prompt": "4 2 2 8>24:", "nums": NUMS, "target": TARGET}]
    assert task.is_correct(None, ["8*2+4+2"], **columns_of(rows)) == [0.0]
    assert task.is_correct(None, ["8*2+4*2"], **columns_of(rows)) == [1.0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(st.text(max_size=300), st.text(alphabet="0123456789+-*/() =<>answer.e_x*", max_size=300))
)
def test_countdown_reward_never_raises(text):
    for ns in (NUMS, [3, 5]):
        assert countdown.score(text, ns, 24) in (0.0, 0.1, 1.0)
    assert (
        0.0 <= SudokuTask().reward(None, [text], puzzle=["0" * 16], solution=["1234341221434321"])[0] <= 1.0
    )


# --------------------------------------------------------------------------- gsm8k / math500
def test_gsm8k_fixture_loads_locally_and_scores():
    task = get_task("gsm8k", source=GSM8K_FILE)
    rows = task.test(seed=None)
    assert [r["answer"] for r in rows] == ["18", "1200", "2.5"]
    assert all(r["prompt"].startswith(r["question"]) and "\\boxed{}" in r["prompt"] for r in rows)
    assert sorted(r["answer"] for r in task.train(seed=0)) == ["1200", "18", "2.5"]
    assert len(task.train(2, seed=1)) == 2
    completions = [
        "48 - 30 = 18 so the answer is \\boxed{18}.",  # correct + formatted
        "He has $1,200.00 left",  # correct, last number, not formatted
        "<answer>2.6</answer>",  # wrong but formatted
    ]
    assert _score(task, rows, completions) == pytest.approx([1.1, 1.0, 0.1])
    assert task.is_correct(None, completions, **columns_of(rows)) == [1.0, 1.0, 0.0]
    assert _score(task, rows, [r["reference"] for r in rows]) == pytest.approx([1.1] * 3)
    assert _score(task, rows, ["", "no number here", "\\boxed{"]) == [0.0, 0.0, 0.0]
    raw = load_rows(GSM8K_FILE, "test")  # a raw row's '####' answer works as the reward column too
    assert task.reward(None, ["\\boxed{18}"], answer=[raw[0]["answer"]]) == pytest.approx([1.1])


def test_answer_extraction():
    assert answers.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert answers.last_boxed("\\boxed 5.") == "5"
    assert answers.last_boxed("\\boxed{unclosed") is None
    assert answers.answer_tag("<answer> 7 </answer> then <answer>8</answer>") == "8"
    assert answers.after_hashes("work\n#### 1,234\n") == "1,234"
    assert answers.last_number("3 apples cost $1,234.50 in total") == "1,234.50"
    assert answers.parse_number("$1,200.00") == 1200 and answers.parse_number("3/4") * 4 == 3
    assert answers.parse_number("twelve") is None and answers.parse_number("1/0") is None
    assert answers.gsm8k_reference("so\n#### 1,200") == "1200"
    assert answers.extract_final("the total is \\boxed{18 dollars}", numeric=True) == ("18", True)
    assert answers.extract_final("maybe 3 or 4", numeric=True) == ("4", False)


def test_math500_fixture_and_equivalences():
    """The equivalences the hand-written normaliser gave (it is gone), now math-verify's."""
    task = get_task("math500", source=MATH_FILE)
    rows = task.test(seed=None)
    assert [r["answer"] for r in rows] == ["\\frac{7}{8}", "6", "60^\\circ"]
    assert rows[0]["subject"] == "Prealgebra" and rows[0]["reference"] == rows[0]["solution"]
    assert _score(task, rows, [r["reference"] for r in rows]) == pytest.approx([1.1] * 3)
    good = ["\\boxed{\\dfrac78}", "so $x = \\boxed{x=6}$", "\\boxed{60}"]
    assert task.is_correct(None, good, **columns_of(rows)) == [1.0, 1.0, 1.0]
    assert _score(task, rows, ["\\boxed{0.875}", "\\boxed{7}", "the answer is 60"]) == pytest.approx(
        [1.1, 0.1, 0.0]
    )
    assert answers.math_equal("\\left( 1,2 \\right)", "(1, 2)")
    assert answers.math_equal("\\text{(B)}", "(B)") and answers.math_equal("1,000", "1000")
    assert not answers.math_equal("\\frac{1}{2}", "\\frac{1}{3}")
    assert not answers.math_equal("", "0")
    with pytest.raises(ValueError, match="no train split"):
        task.train()
    both = Math500Task(source={"train": MATH_FILE, "test": MATH_FILE})
    assert len(both.train(2)) == 2


def test_math_verify_equivalence():
    assert answers.math_equal("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert not answers.math_equal("3", "4")


def test_local_directory_and_json_layouts(tmp_path):
    lines = open(GSM8K_FILE).read().splitlines()
    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "test.jsonl").write_text("\n".join(lines[:2]) + "\n\n")
    (tmp_path / "test-extra.jsonl").write_text(lines[2])  # outside the config folder: not preferred
    (tmp_path / "train.json").write_text(json.dumps([json.loads(l) for l in lines]))
    task = GSM8KTask(source=str(tmp_path))
    assert [r["answer"] for r in task.test(seed=None)] == ["18", "1200"]
    assert len(task.train()) == 3
    assert len(GSM8KTask(source=str(tmp_path), config=None).test()) == 3  # both files, no preference
    (tmp_path / "cols.json").write_text(json.dumps({"question": ["q"], "answer": ["#### 4"]}))
    assert GSM8KTask(source=str(tmp_path / "cols.json")).test()[0]["answer"] == "4"
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_rows(str(tmp_path / "bad.jsonl"), "test")
    (tmp_path / "no_answer.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="no 'answer' column"):
        GSM8KTask(source=str(tmp_path / "no_answer.jsonl")).test()
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"), "test")
    with pytest.raises(ValueError, match="no file for split 'validation'"):
        load_rows(str(tmp_path), "validation")


def test_optional_dependencies_give_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r'pip install "dmpo-fast\[tasks\]"'):
        load_rows("openai/gsm8k", "test", config="main")
    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r'pip install "dmpo-fast\[tasks\]"'):
        load_rows(str(tmp_path / "test.parquet"), "test")
    assert len(load_rows(GSM8K_FILE, "test")) == 3  # local JSON Lines need neither


# --------------------------------------------------------------------------- registry and rewards
def test_registry():
    assert {"sudoku", "countdown", "gsm8k", "math500"} <= set(task_names())
    with pytest.raises(ValueError, match="known tasks: .*countdown.*sudoku"):
        get_task("sudok")
    with pytest.raises(ValueError, match="no option"):
        get_task("countdown", blanks=3)
    assert isinstance(get_task("dmpo_fast.tasks.sudoku:SudokuTask", max_blanks=5), SudokuTask)
    task = get_task("countdown", num_counts=(3,))
    assert get_task(task) is task
    register_task("tiny_sudoku_for_test", lambda **kw: SudokuTask(max_blanks=4, **kw))
    try:
        assert get_task("tiny_sudoku_for_test").max_blanks == 4
        with pytest.raises(ValueError, match="already registered"):
            register_task("tiny_sudoku_for_test", SudokuTask)
    finally:
        from dmpo_fast.tasks import _REGISTRY

        _REGISTRY.pop("tiny_sudoku_for_test", None)


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def picky_reward(prompts, completions, **columns):
    """Raises on any batch holding 'boom'; None for 'none'."""
    if any(c == "boom" for c in completions):
        raise RuntimeError("cannot score boom")
    return [None if c == "none" else 1.0 for c in completions]


def test_resolve_reward():
    assert resolve_reward(f"{__name__}:length_reward") is length_reward
    assert resolve_reward(f"{__name__}.length_reward") is length_reward
    assert resolve_reward(length_reward) is length_reward
    rows = CountdownTask().test(2)
    fn = resolve_reward("countdown")
    assert fn(None, [r["reference"] for r in rows], **columns_of(rows)) == [1.0, 1.0]
    for bad, msg in [
        ("no_such_module_xyz:f", "cannot import"),
        (f"{__name__}:missing", "no attribute"),
        ("dmpo_fast.tasks.countdown:MAX_EXPRESSION_CHARS", "not callable"),
        ("", "non-empty"),
        ("plainname", "neither"),
    ]:
        with pytest.raises(ValueError, match=msg):
            resolve_reward(bad)


def test_safe_rewards_isolates_failures():
    completions = ["ab", "boom", "none", "abcd"]
    prompts = ["p"] * 4
    rewards, n_failed = safe_rewards(
        [picky_reward, length_reward], prompts, completions, {"k": [0, 1, 2, 3]}, weights=[2.0, 0.5]
    )
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert n_failed == 2
    assert rewards[0].item() == 3.0 and rewards[3].item() == 4.0
    assert math.isnan(rewards[1].item()) and math.isnan(rewards[2].item())
    rewards, n_failed = safe_rewards(f"{__name__}:length_reward", prompts, completions)
    assert n_failed == 0 and rewards.tolist() == [2.0, 4.0, 4.0, 4.0]
    # a zero weight switches a reward off, including its failures
    _, n_failed = safe_rewards([picky_reward, length_reward], prompts, completions, weights=[0.0, 1.0])
    assert n_failed == 0
    with pytest.raises(ValueError, match="returned 1 values for 4"):
        safe_rewards(lambda prompts, completions, **kw: [1.0], prompts, completions)
    with pytest.raises(ValueError, match="column 'k'"):
        safe_rewards(length_reward, prompts, completions, {"k": [1]})
    with pytest.raises(ValueError, match="weights"):
        safe_rewards(length_reward, prompts, completions, weights=[1.0, 2.0])


def test_sudoku_reward_cells_all_counts_changed_clues():
    from dmpo_fast.tasks import get_task

    row = get_task("sudoku").test(1, seed=3)[0]
    puzzle, solution = row["puzzle"], row["solution"]
    clue = next(i for i, c in enumerate(puzzle) if c != "0")
    wrong = list(solution)
    wrong[clue] = "1" if solution[clue] != "1" else "2"  # blanks all right, one clue changed
    answer = "/".join("".join(wrong[r * 4 : r * 4 + 4]) for r in range(4))
    cols = {"puzzle": [puzzle], "solution": [solution]}
    assert get_task("sudoku").reward([row["prompt"]], [answer], **cols) == [1.0]
    assert get_task("sudoku", reward_cells="all").reward([row["prompt"]], [answer], **cols) == [15 / 16]
    assert get_task("sudoku").is_correct([row["prompt"]], [answer], **cols) == [0.0]
    with pytest.raises(ValueError, match="reward_cells"):
        get_task("sudoku", reward_cells="clues")


def test_sudoku_reward_type_solved_is_all_or_nothing():
    from dmpo_fast.tasks import get_task

    row = get_task("sudoku").test(1, seed=4)[0]
    puzzle, solution = row["puzzle"], row["solution"]
    blank = puzzle.index("0")
    wrong = list(solution)
    wrong[blank] = "1" if solution[blank] != "1" else "2"
    as_text = lambda g: "/".join("".join(g[r * 4 : r * 4 + 4]) for r in range(4))  # noqa: E731
    cols = {"puzzle": [puzzle] * 2, "solution": [solution] * 2}
    task = get_task("sudoku", reward_type="solved")
    assert task.reward([row["prompt"]] * 2, [as_text(solution), as_text(wrong)], **cols) == [1.0, 0.0]
    # The cell reward of the same wrong answer is partial credit.
    one = {k: v[:1] for k, v in cols.items()}
    assert 0.0 < get_task("sudoku").reward([row["prompt"]], [as_text(wrong)], **one)[0] < 1.0
    with pytest.raises(ValueError, match="reward_type"):
        get_task("sudoku", reward_type="binary")
