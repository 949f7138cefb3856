"""The method comparison (``python -m benchmarks compare``) and the tiny Countdown model it needs.

A --quick sweep (sudoku, base and DMPO, one seed, 2 prompts x 2 rollouts x 2 buffers, 4 held-out puzzles)
writes its JSON rows, plots and report, then a second invocation skips the finished base evaluation and
resumes the DMPO run whose summary was removed. The report's verdict is checked on synthetic rows whose
winner and margins are known. ``scripts/pretrain_tiny.py --task countdown`` runs two steps into a temporary
directory, and the trainer loads the result as ``model: tiny_countdown``.
"""

import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmpo_fast import assets
from dmpo_fast.config import TrainConfig
from dmpo_fast.tokenizer import CharTokenizer
from dmpo_fast.trainer import load_policy

ROOT = Path(__file__).resolve().parents[1]


def _compare_cli(tmp, *extra):
    args = ["--quick", "--tasks", "sudoku", "--methods", "base,dmpo", "--seeds", "0", "--threads", "1",
            "--out", str(tmp / "out"), "--runs", str(tmp / "runs"),
            "--report", str(tmp / "report.md")]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "compare", *args, *extra], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    proc = _compare_cli(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp / "out" / f"compare-sudoku-quick-{datetime.date.today().isoformat()}.json"
    return tmp, path, json.loads(path.read_text()), proc.stdout


@pytest.fixture
def report_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # ``benchmarks`` is a folder of the repository, not installed
    from benchmarks import compare_report

    return compare_report


def test_quick_sweep_rows(quick_sweep):
    _, _, rows, stdout = quick_sweep
    assert {r["method"] for r in rows} == {"base", "dmpo"} and {r["task"] for r in rows} == {"sudoku"}
    assert "[1/2] sudoku base seed 0" in stdout and "[2/2] sudoku dmpo seed 0" in stdout
    for r in rows:
        assert r["quick"] is True and r["seed"] == 0 and r["n"] == 4 and 0 <= r["accuracy"] <= 1
        assert r["wall_seconds"] >= 0 and r["commit"] and r["torch"] and r["date"]
    # DMPO: F = 2 steps per buffer, 2 buffers of 2 x 2 rollouts, evaluated every buffer.
    curve = [r for r in rows if r["method"] == "dmpo" and r["kind"] == "curve"]
    assert [(r["step"], r["buffers"], r["rollouts"]) for r in curve] == [(0, 0, 0), (2, 1, 4), (4, 2, 8)]
    assert curve[0]["config"]["max_steps"] == 4 and curve[0]["settings"] == {"algorithm": "dmpo"}
    base = [r for r in rows if r["method"] == "base" and r["kind"] == "curve"]
    assert [r["step"] for r in base] == [0]
    # The untrained model's evaluation is the DMPO run's before training: same model, rows and decoding.
    assert base[0]["accuracy"] == curve[0]["accuracy"] and base[0]["reward"] == curve[0]["reward"]
    for method in ("base", "dmpo"):
        steps = [r for r in rows if r["method"] == method and r["kind"] == "steps"]
        assert [r["denoising_steps"] for r in steps] == [4, 8, 12, 24]
        assert all(r["temperature"] == 0.0 and r["tts_k"] == 0 for r in steps)
        tts = {r["decode"]: r for r in rows if r["method"] == method and r["kind"] == "tts"}
        assert set(tts) == {"greedy", "sampled", "tts k=4"}
        assert {r["denoising_steps"] for r in tts.values()} == {12}
        assert (tts["sampled"]["temperature"], tts["tts k=4"]["temperature"], tts["tts k=4"]["tts_k"]) == (
            0.7,
            0.7,
            4,
        )
        # Greedy at the run's 12 steps is one decode, reported in both tables.
        assert tts["greedy"]["accuracy"] == next(r["accuracy"] for r in steps if r["denoising_steps"] == 12)


def test_quick_sweep_plots_and_report(quick_sweep, report_module):
    tmp, path, rows, _ = quick_sweep
    report = (tmp / "report.md").read_text()
    assert report.startswith(report_module.HEADER) and "python -m benchmarks compare" in report
    assert "Quick run" in report and path.name in report
    assert report_module.verdict(rows, "sudoku") in report
    pytest.importorskip("matplotlib")
    for kind in ("curves", "tts", "steps"):  # linked relative to the report (tmp/report.md, tmp/out/*.png)
        png = path.with_name(f"{path.stem}-{kind}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](out/{png.name})" in report


def test_quick_sweep_skips_finished_runs_and_resumes_interrupted_ones(quick_sweep):
    tmp, path, rows, _ = quick_sweep
    run = tmp / "runs" / "sudoku" / "dmpo" / "seed0"
    (run / "summary.json").unlink()  # as if killed after its last checkpoint, before its evaluations
    (run / "compare_rows.json").unlink()
    proc = _compare_cli(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sudoku base seed 0: evaluated before, skipped" in proc.stdout
    assert "sudoku dmpo seed 0: resumed" in proc.stdout and "resumed from step-000004" in proc.stdout

    def stable(rs):
        return [{k: v for k, v in r.items() if "seconds" not in k and k != "load_avg_1m"} for r in rs]

    assert stable(json.loads(path.read_text())) == stable(rows)
    # A finished run with other settings in the same directory: refused, never overwritten.
    (run / "summary.json").write_text(json.dumps({"config": {**TrainConfig().to_dict(), "max_steps": 99}}))
    refused = _compare_cli(tmp, "--methods", "dmpo")
    assert refused.returncode == 1 and "holds a finished run with other settings" in refused.stderr


def _rows(task, finals: dict[str, list[float]]) -> list[dict]:
    """Synthetic curve rows: every method starts at 0.4 (step 0) and ends at its given accuracy per seed."""
    env = {"n": 200, "device": "cpu", "cpu_threads": 1, "torch": "x", "commit": "abc", "date": "2026-01-01",
           "benchmark": "compare", "task": task, "settings": {}}  # fmt: skip
    rows = []
    for method, accs in finals.items():
        for seed, acc in enumerate(accs):
            cfg = {} if method == "base" else {"max_steps": 40}
            points = [(0, acc)] if method == "base" else [(0, 0.4), (40, acc)]
            for step, a in points:
                rows.append({**env, "method": method, "seed": seed, "kind": "curve", "step": step,
                             "buffers": step // 2, "rollouts": step * 128, "accuracy": a, "reward": a,
                             "config": cfg, "run_wall_seconds": 10.0})  # fmt: skip
    return rows


def test_report_names_the_winner_and_its_margin(tmp_path, report_module):
    finals = {"base": [0.40, 0.42, 0.44], "dmpo": [0.50, 0.54, 0.58], "mro": [0.70, 0.75, 0.80]}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(_rows("sudoku", finals)))
    report_module.write_report([path], tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    to_runner_up = [a - b for a, b in zip(finals["mro"], finals["dmpo"], strict=True)]  # 0.20, 0.21, 0.22
    to_base = [a - b for a, b in zip(finals["mro"], finals["base"], strict=True)]  # 0.30, 0.33, 0.36
    assert "**sudoku: mro won** with final held-out accuracy 0.750 ± 0.050 (mean ± std over 3 seeds)" in text
    margin = f"+{statistics.mean(to_runner_up):.3f} ± {statistics.stdev(to_runner_up):.3f}"
    assert margin == "+0.210 ± 0.010"
    assert (
        f"ahead of the runner-up dmpo (0.540 ± 0.040) by {margin} (paired by seed; ahead on 3 of 3 seeds)"
        in text
    )
    assert f"the untrained model by +{statistics.mean(to_base):.3f} ± {statistics.stdev(to_base):.3f}" in text
    assert "A clear win" in text
    # The table: the final step, not the starting 0.4, and the paired difference to base.
    assert "| mro | – | 0.750 ± 0.050 | 0.700–0.800 | +0.330 ± 0.030 | 40 | 10 |" in text


@pytest.mark.parametrize(
    "finals, expected",
    [
        # Ahead on average, behind on one seed.
        (
            {"dmpo": [0.50, 0.60, 0.40], "diffu_grpo": [0.45, 0.50, 0.45]},
            "Not a clear win: diffu_grpo was level",
        ),
        ({"base": [0.5, 0.5], "mro": [0.4, 0.45]}, "**sudoku: base won** (the untrained model"),
        ({"dmpo": [0.5, 0.6], "mro": [0.6, 0.5]}, "**sudoku: no winner**: dmpo, mro tie at"),
        ({"dmpo": [0.5]}, "it was the only method run"),
    ],
)
def test_report_verdict_follows_the_data(report_module, finals, expected):
    assert expected in report_module.verdict(_rows("sudoku", finals), "sudoku")


def test_report_without_results(tmp_path, report_module):
    report_module.write_report([], tmp_path / "r.md")
    assert "No results yet" in (tmp_path / "r.md").read_text()


def test_bad_arguments(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import compare

    with pytest.raises(ValueError, match="methods: unknown nope; allowed: base, dmpo, diffu_grpo, mro"):
        compare.compare(["sudoku"], ["nope"], [0], out=tmp_path)
    with pytest.raises(ValueError, match="tasks: unknown gsm8k; allowed: sudoku, countdown"):
        compare.compare(["gsm8k"], ["base"], [0], out=tmp_path)
    with pytest.raises(ValueError, match="--seeds must be comma-separated ints"):
        compare.parse_seeds("0,x")


def test_a_sweep_of_one_task_keeps_the_other_tasks_in_the_report(monkeypatch, tmp_path, report_module):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import compare

    for name in ("compare-sudoku-cpu-2026-01-05.json", "compare-sudoku-cpu-2026-02-01.json",
                 "compare-sudoku-quick-2026-03-01.json", "compare-countdown-cpu-2026-01-05.json"):  # fmt: skip
        (tmp_path / name).write_text("[]")
    fresh = tmp_path / "compare-countdown-cpu-2026-04-01.json"
    # Sudoku: the newest full sweep (neither an older one nor a quick one); countdown: this sweep's file.
    assert compare.report_inputs([fresh], tmp_path, "cpu") == [
        tmp_path / "compare-sudoku-cpu-2026-02-01.json",
        fresh,
    ]
    assert compare.report_inputs([fresh], tmp_path, "cuda") == [fresh]
    finals = {"base": [0.1, 0.2], "dmpo": [0.3, 0.4]}
    (tmp_path / "compare-sudoku-cpu-2026-02-01.json").write_text(json.dumps(_rows("sudoku", finals)))
    fresh.write_text(json.dumps(_rows("countdown", finals)))
    report_module.write_report(compare.report_inputs([fresh], tmp_path, "cpu"), tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert text.index("## sudoku") < text.index("## countdown")


# --------------------------------------------------------------------------------------------------
# The tiny Countdown model
# --------------------------------------------------------------------------------------------------


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "scripts" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_countdown_and_load_it_as_a_tiny_model(tmp_path, monkeypatch):
    pretrain = _pretrain_module()
    out = tmp_path / "tiny_countdown"
    args = ["--task", "countdown", "--task-kwargs", "{num_counts: [3], max_number: 9}", "--steps", "2",
            "--eval-every", "1", "--eval-size", "4", "--batch-size", "8", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert pretrain.main(args) == 0
    record = json.loads((out / "pretrain.json").read_text())
    assert record["args"]["task"] == "countdown" and record["args"]["gen_length"] == 24
    assert record["args"]["task_kwargs"] == {"num_counts": [3], "max_number": 9}
    with pytest.raises(SystemExit):  # argparse: not a mapping
        pretrain.main(["--task", "countdown", "--task-kwargs", "[1, 2]", "--out", str(tmp_path / "x")])
    assert [e["step"] for e in record["log"]] == [1, 2] and "--out" not in record["command"]
    assert pretrain.default_out("countdown") == assets.ASSETS / "tiny_countdown"

    monkeypatch.setattr(assets, "ASSETS", tmp_path)
    cfg = TrainConfig(model="tiny_countdown", task="countdown", task_kwargs={}, device="cpu")
    lm, tok = load_policy(cfg, torch.device("cpu"))
    assert isinstance(tok, CharTokenizer) and lm.training

    monkeypatch.setattr(assets, "ASSETS", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"`python scripts/pretrain_tiny.py --task countdown`"):
        load_policy(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="name must be one of"):
        assets.load_tiny(name="tiny_gsm8k")


def test_countdown_pretraining_rows(tmp_path):
    """Prompt left-padded, then the reference expression, then EOS up to --gen-length."""
    from dmpo_fast.tasks import get_task

    pretrain = _pretrain_module()
    tok = CharTokenizer()
    rows = get_task("countdown").train(n=50, seed=3)
    ids, am, P = pretrain.encode_pairs(tok, rows, pretrain.GEN_LENGTH["countdown"])
    for i, r in enumerate(rows):
        comp = ids[i, P:].tolist()
        ref = tok.encode(r["reference"])
        assert comp[: len(ref)] == ref and set(comp[len(ref) :]) == {tok.eos_id}
        assert tok.decode(ids[i, :P][am[i, :P].bool()].tolist()) == r["prompt"]


def test_a_field_added_later_at_its_default_does_not_invalidate_a_finished_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import compare

    cfg = TrainConfig(learning_rate=1e-4)
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["drop_tied_groups"]  # a run saved before the field existed
    assert compare._changed(saved, cfg.replace(drop_tied_groups=TrainConfig().drop_tied_groups)) == []
    assert compare._changed(saved, cfg.replace(drop_tied_groups=not TrainConfig().drop_tied_groups)) == [
        "drop_tied_groups"
    ]
    assert compare._changed(saved, cfg.replace(learning_rate=3e-4)) == ["learning_rate"]


def test_learning_rate_sweep_runs_each_rate_and_reports_the_best(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import compare

    out, runs = tmp_path / "out", tmp_path / "runs"
    paths = compare.sweep(["sudoku"], ["dmpo"], [1e-4, 3e-4], out=out, runs=runs, quick=True,
                          report=tmp_path / "r.md")  # fmt: skip
    rows = json.loads(paths[0].read_text())
    assert {r["learning_rate"] for r in rows} == {1e-4, 3e-4}
    assert all(r["benchmark"] == "compare-sweep" and r["seed"] == 0 for r in rows)
    # DMPO's own rate (3e-4) is the comparison's run; another rate lives beside it.
    assert (runs / "sudoku" / "dmpo" / "seed0" / "summary.json").is_file()
    assert (runs / "sudoku" / "dmpo" / "lr0.0001" / "seed0" / "summary.json").is_file()
    report = (tmp_path / "r.md").read_text()
    assert "### sudoku: learning-rate sweep (seed 0)" in report
    assert "| method | lr 0.0001 | lr 0.0003 |" in report and "| dmpo | " in report
    with pytest.raises(ValueError, match="--learning-rates must be"):
        compare.parse_rates("1e-4,-1")
    with pytest.raises(ValueError, match="methods: unknown base"):
        compare.sweep(["sudoku"], ["base"], [1e-4], out=out, runs=runs, quick=True)


def test_sweep_table_marks_rates_not_run_and_bolds_only_a_complete_row(report_module, tmp_path):
    def curve(method, rate, acc):
        return [{"benchmark": "compare-sweep", "task": "sudoku", "method": method, "seed": 0,
                 "learning_rate": rate, "step": s, "accuracy": a} for s, a in ((0, 0.4), (120, acc))]  # fmt: skip

    rows = curve("dmpo", 3e-5, 0.5) + curve("dmpo", 1e-4, 0.6) + curve("mro", 3e-5, 0.45) + curve("mro", 1e-4, 0.3)
    table = "\n".join(report_module.sweep_section(rows, "sudoku", tmp_path, tmp_path / "x.json", (3e-5, 1e-4, 3e-4)))
    assert "| dmpo | 0.500 | 0.600 | – |" in table and "| mro | 0.450 | 0.300 | – |" in table
    assert "not run yet" in table
    done = "\n".join(report_module.sweep_section(rows, "sudoku", tmp_path, tmp_path / "x.json", (3e-5, 1e-4)))
    assert "| dmpo | 0.500 | **0.600** |" in done and "| mro | **0.450** | 0.300 |" in done
    assert "not run yet" not in done


def test_each_method_runs_at_its_best_rate_on_the_task_and_other_rates_live_beside_it(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import compare

    monkeypatch.setitem(compare.RATES, "sudoku", {"diffu_grpo": 3e-5})
    monkeypatch.delitem(compare.RATES, "countdown", raising=False)
    kw = {"runs": tmp_path, "quick": True, "device": "cpu"}
    cfg = compare.run_config("sudoku", "diffu_grpo", 1, **kw)
    assert cfg.learning_rate == 3e-5 and Path(cfg.output_dir) == tmp_path / "sudoku" / "diffu_grpo" / "seed1"
    swept = compare.run_config("sudoku", "diffu_grpo", 0, learning_rate=3e-4, **kw)
    assert swept.learning_rate == 3e-4
    assert Path(swept.output_dir) == tmp_path / "sudoku" / "diffu_grpo" / "lr0.0003" / "seed0"
    # A task without a chosen rate runs the method at its default, as before.
    other = compare.run_config("countdown", "diffu_grpo", 0, **kw)
    assert other.learning_rate == TrainConfig(algorithm="diffu_grpo").learning_rate == 3e-4
    assert Path(other.output_dir) == tmp_path / "countdown" / "diffu_grpo" / "seed0"
    assert compare.run_config("sudoku", "wd1", 0, **kw).learning_rate == 3e-5  # its METHODS rate


def test_cached_evaluations_survive_a_config_field_added_later(quick_sweep, monkeypatch):
    # compare_rows.json of a run (here the untrained model's evaluations), saved before a TrainConfig field existed: still the same run, its
    # evaluations are reused (the field at the behaviour the run had, config.SAVED_WITHOUT); another value of a
    # field is another run.
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import compare

    tmp, _, _, _ = quick_sweep
    cfg = compare.run_config("sudoku", "base", 0, runs=tmp / "runs", quick=True, device="cpu")
    cache = Path(cfg.output_dir) / "compare_rows.json"
    saved = json.loads(cache.read_text())
    del saved["key"]["config"]["rs_keep"]
    cache.write_text(json.dumps(saved))
    rows, done = compare.run_rows("sudoku", "base", cfg)
    assert done == "evaluated before, skipped" and rows == saved["rows"]
    saved["key"]["config"]["num_generations"] = 99
    cache.write_text(json.dumps(saved))
    monkeypatch.setattr(compare, "_eval_rows", lambda *a: [])  # what a fresh evaluation would add
    _, done = compare.run_rows("sudoku", "base", cfg)
    assert done == "evaluated"
