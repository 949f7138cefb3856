"""The trainer end to end on the built-in tiny model: outputs, resume after SIGKILL, non-finite steps,
bad configs, the CLI, and two processes computing what one computes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmpo_fast import trainer as train_mod
from dmpo_fast.algorithms import DMPO
from dmpo_fast.algorithms.base import merge_for_log
from dmpo_fast.config import TrainConfig
from dmpo_fast.policy import Reference
from dmpo_fast.run_io import RunDir

SMALL = dict(
    prompts_per_step=2, num_generations=4, max_steps=4, num_iterations=2, eval_size=8, progress=False,
    save_every=2, num_replicates=2, elbo_replicates=2, impl="chunked",
)  # fmt: skip
SMALL_ARGS = [f"{k}={v}" for k, v in SMALL.items()]
VOLATILE = {"seconds", "tokens_per_s"}  # wall-clock fields of a metrics row


def _cfg(tmp_path, name="run", **kw):
    return TrainConfig(output_dir=str(tmp_path / name), **{**SMALL, **kw})


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _cli(args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from dmpo_fast.cli import main; sys.exit(main(sys.argv[1:]))", *args],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw,
    )  # fmt: skip


def test_short_run_writes_every_output(tmp_path):
    result = train_mod.train(_cfg(tmp_path))
    run = Path(result.output_dir)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "reward_mean", "reward_std", "accuracy", "ess_mean", "weights_min", "weights_max",
                "tokens_per_s", "seconds", "grad_norm", "lr"):  # fmt: skip
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    for which in ("eval_before", "eval_after"):
        assert set(summary[which]) >= {"accuracy", "reward_mean"} and summary[which]["n"] == 8
    assert summary["steps"] == 4 and summary["wall_seconds"] > 0 and summary["config"]["max_steps"] == 4
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (run / "reward.png").stat().st_size > 1000
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    assert (run / "config.yaml").is_file()


def test_training_moves_the_policy_and_eval_is_reproducible(tmp_path):
    cfg = _cfg(tmp_path)
    policy, tok = train_mod.load_policy(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    result = train_mod.train(cfg)
    after = RunDir.load_checkpoint(Path(result.output_dir) / "checkpoints" / "step-000004")["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from dmpo_fast.tasks import get_task

    task = get_task(cfg.task, **cfg.task_options())
    rows = task.test(8, seed=0)
    again = train_mod.evaluate(policy, tok, task, rows, cfg, [task.reward])
    assert again == result.eval_before  # same rows, seed and decoding: the same number


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="output_dir .* is not empty"):
        train_mod.train(_cfg(tmp_path))
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_refuses_a_changed_config(tmp_path):
    train_mod.train(_cfg(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="alpha"):
        train_mod.train(_cfg(tmp_path, max_steps=4, resume=True, alpha=0.5))


def test_resume_after_sigkill_repeats_the_uninterrupted_run(tmp_path):
    args = [*SMALL_ARGS, "max_steps=6", "save_every=1", "tensorboard=false", "plot=false"]
    whole = _cli(["train", "--output-dir", str(tmp_path / "whole"), *args], timeout=300)
    assert whole.returncode == 0, whole.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dmpo_fast.cli import main; sys.exit(main(sys.argv[1:]))",
         "train", "--output-dir", str(killed_dir), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoints" / "step-000003").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = RunDir(killed_dir, resume=True).latest_checkpoint()
    assert done is not None and int(done.name.split("-")[1]) < 6, "the kill came too late to test anything"
    assert not list((killed_dir / "checkpoints").glob("step-000006"))

    resumed = _cli(["train", "--output-dir", str(killed_dir), "--resume", *args], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(ln) for ln in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert _stable(a) == _stable(b)
    sa = json.loads((tmp_path / "whole" / "summary.json").read_text())
    sb = json.loads((killed_dir / "summary.json").read_text())
    assert sa["eval_before"] == sb["eval_before"] and sa["eval_after"] == sb["eval_after"]
    wa = RunDir.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000006")["model"]
    wb = RunDir.load_checkpoint(killed_dir / "checkpoints" / "step-000006")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real = DMPO.loss
    calls = {"n": 0}

    def poisoned(self, policy, buf, step):
        out = real(self, policy, buf, step)
        if step >= 2:  # steps 3, 4, 5 (1-based) are non-finite
            calls["n"] += 1
            return type(out)(out.loss * float("nan"), out.stats)
        return out

    monkeypatch.setattr(DMPO, "loss", poisoned)
    cfg = _cfg(tmp_path, max_steps=8)
    with pytest.warns(UserWarning, match="non-finite"):
        with pytest.raises(RuntimeError, match="three non-finite steps in a row .* intact"):
            train_mod.train(cfg)
    run = Path(cfg.output_dir)
    last = RunDir(run, resume=True).latest_checkpoint()
    assert last.name == "step-000002"
    state = RunDir.load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]


def test_one_skipped_step_leaves_the_parameters_alone(tmp_path, monkeypatch):
    real = DMPO.loss
    snapshots = []

    def poisoned(self, policy, buf, step):
        out = real(self, policy, buf, step)
        if step == 1:
            snapshots.append({k: v.clone() for k, v in policy.state_dict().items()})
            return type(out)(out.loss * float("inf"), out.stats)
        if step == 2:
            snapshots.append({k: v.clone() for k, v in policy.state_dict().items()})
        return out

    monkeypatch.setattr(DMPO, "loss", poisoned)
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        train_mod.train(_cfg(tmp_path, max_steps=3))
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])


@pytest.mark.parametrize(
    "override, field",
    [
        ("baseline=median", "baseline"),
        ("sampler=greedy", "sampler"),
        ("alpha=-1", "alpha"),
        ("num_generatoins=4", "num_generations"),
    ],
)
def test_cli_rejects_bad_config_with_the_field_name(tmp_path, override, field):
    out = _cli(["train", "--output-dir", str(tmp_path / "x"), override], timeout=120)
    assert out.returncode == 2
    assert field in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()


def test_cli_eval_on_a_checkpoint(tmp_path):
    result = train_mod.train(_cfg(tmp_path, max_steps=2))
    js = tmp_path / "eval.json"
    out = _cli(["eval", "--checkpoint", result.output_dir, "--gen-lengths", "24", "48", "-n", "6", "--json", str(js),
                "progress=false", "impl=chunked"], timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(js.read_text())
    assert [r["gen_length"] for r in rows] == [24, 48] and all(r["n"] == 6 for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_lora_run_with_adapter_disabled_reference(tmp_path):
    pytest.importorskip("peft")
    cfg = _cfg(
        tmp_path,
        max_steps=2,
        lora=True,
        reference="adapter_disabled",
        lora_target_modules=["q_proj", "ff_out"],
    )
    result = train_mod.train(cfg)
    state = RunDir.load_checkpoint(Path(result.output_dir) / "checkpoints" / "step-000002")["model"]
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys, "no adapter weights in the checkpoint"
    assert any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k), "the adapter never moved"


@pytest.mark.parametrize("mode", ["replicated", "fsdp-zero3", "fsdp-zero2"])
def test_two_processes_match_one(tmp_path, mode):
    """2 CPU processes (gloo) take one prompt group each; weights, losses and the updated model equal
    the one-process run on the same rollouts (up to float summation order). With fsdp=true the model,
    gradients and optimizer state are sharded (FSDP2) and the checkpoint still holds the full state: one
    process resumes it and continues exactly as the uninterrupted one-process run."""
    sharded = mode != "replicated"
    extra = [f"fsdp={sharded}", f"fsdp_reshard_after_forward={mode != 'fsdp-zero2'}"]
    args = [*SMALL_ARGS, "save_every=2", "tensorboard=false", "plot=false", "device=cpu"]
    one = _cli(["train", "--output-dir", str(tmp_path / "one"), *args, "max_steps=4"], timeout=300)
    assert one.returncode == 0, one.stderr
    port = 29500 + os.getpid() % 1000 + 100 * ["replicated", "fsdp-zero3", "fsdp-zero2"].index(mode)
    procs = []
    for rank in range(2):
        env = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from dmpo_fast.cli import main; sys.exit(main(sys.argv[1:]))",
             "train", "--output-dir", str(tmp_path / "two"), *args, "max_steps=2", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        ))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a[:2], b, strict=True):
        for k in ("reward_mean", "accuracy", "weights_min", "weights_max", "ess_mean", "masked_tokens"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)  # summed, not averaged
    ca = RunDir.load_checkpoint(tmp_path / "one" / "checkpoints" / "step-000002")
    cb = RunDir.load_checkpoint(tmp_path / "two" / "checkpoints" / "step-000002")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharding"] == (mode if sharded else "none")
    assert cb["optimizer_format"] == ("fqn" if sharded else "index")
    assert ca["model"].keys() == cb["model"].keys()  # full state under the unsharded names
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=1e-5)
    if mode != "fsdp-zero3":
        return
    resumed = _cli(
        ["train", "--output-dir", str(tmp_path / "two"), "--resume", *args, "max_steps=4"], timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    b = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
        assert ra["reward_mean"] == pytest.approx(rb["reward_mean"], abs=1e-6)
    wa = RunDir.load_checkpoint(tmp_path / "one" / "checkpoints" / "step-000004")["model"]
    wb = RunDir.load_checkpoint(tmp_path / "two" / "checkpoints" / "step-000004")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_a_failing_custom_reward_is_counted_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "flaky_reward.py").write_text(
        "def reward(prompts, completions, **columns):\n"
        "    out = []\n"
        "    for i, c in enumerate(completions):\n"
        "        if i % 4 == 0:\n"
        "            out.append(None)\n"
        "        elif i % 4 == 1:\n"
        "            raise_here = 1 / 0 if i == 1 else None\n"
        "            out.append(0.5)\n"
        "        else:\n"
        "            out.append(1.0)\n"
        "    return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = train_mod.train(_cfg(tmp_path, max_steps=2, reward_funcs=["flaky_reward:reward"]))
    rows = result.metrics
    assert all(r["reward_failures"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("drop", [False, True])
def test_drop_tied_groups_gives_tied_groups_no_weight(tmp_path, monkeypatch, drop):
    """A group whose rollouts all scored the same gets weight 0 with drop_tied_groups (its stored rewards
    stay the real ones); without it, baseline none spreads the group's unit weight over its rollouts."""
    from dmpo_fast.tasks import get_task

    real_rollout = train_mod.rollout

    def fixed_rewards(*args, **kw):
        out, texts, rewards, n_failed, solved = real_rollout(*args, **kw)
        return out, texts, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]), n_failed, solved

    monkeypatch.setattr(train_mod, "rollout", fixed_rewards)
    cfg = _cfg(tmp_path, baseline="none", drop_tied_groups=drop)
    policy, tok = train_mod.load_policy(cfg, torch.device("cpu"))
    task = get_task(cfg.task, **cfg.task_options())
    algo = DMPO(cfg)
    reference = Reference(cfg, policy, uses=algo.needs_reference)
    buf = train_mod.make_buffer(algo, policy, reference, tok, task, cfg, [task.reward], task.train(seed=0)[:2], 0)
    w = buf["weights"]
    assert buf["rewards"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert buf["tied_groups"] == int(drop) and buf["kept"].tolist() == [not drop] * 4 + [True] * 4
    if drop:
        assert w[:4].tolist() == [0.0] * 4
    else:
        torch.testing.assert_close(w[:4].sum(), torch.tensor(1.0))
    torch.testing.assert_close(w[4:].sum(), torch.tensor(1.0))  # the solved rollouts take the weight
    assert w[[4, 6]].max() < 1e-6
    # The loss step runs on such a buffer and the dropped group contributes nothing.
    out = algo.loss(policy, buf, step=0)
    assert torch.isfinite(out.loss)


def test_buffers_of_different_widths_merge_for_the_log():
    """Each process keeps its own buffer (its prompts' left padding sets its width); the log row merges the
    per-rollout values and adds up the counts."""

    def part(n, width, failed):
        return {"ids": torch.zeros(n, width, dtype=torch.long), "rewards": torch.rand(n), "weights": torch.rand(n),
                "n_failed": failed, "dropped": 1, "tied_groups": 2, "first_row": 0}  # fmt: skip

    a, b = part(4, 30, 1), part(4, 41, 2)
    # Saved buffers of format 1 held per-process counts; read back, every process's buffer holds the sums.
    rows, totals = merge_for_log(DMPO(TrainConfig()).from_saved([a, b]))
    merged = {**rows, **totals}
    assert torch.equal(merged["rewards"], torch.cat([a["rewards"], b["rewards"]]))
    assert (merged["n_failed"], merged["dropped"], merged["tied_groups"]) == (3, 2, 4)
    assert "ids" not in merged and "first_row" not in merged


def test_a_deepspeed_launch_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed.*fsdp.yaml.*fsdp_zero2.yaml"):
        train_mod.train(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["dmpo", "mro", "diffu_grpo", "rejection_sft"])
def test_a_short_run_on_cuda_matches_the_chunked_path(tmp_path, algorithm):
    """The trainer on a GPU with impl=auto (the Triton kernels in rollouts, ELBO and loss) against the same
    run with the torch chunked path: the same rollouts up to near-ties, finite losses, and the same update."""
    kw = dict(device="cuda", max_steps=2, algorithm=algorithm, num_iterations=1 if algorithm == "mro" else 2)
    triton = train_mod.train(_cfg(tmp_path, "triton", impl="auto", **kw))
    chunked = train_mod.train(_cfg(tmp_path, "chunked", impl="chunked", **kw))
    for ra, rb in zip(triton.metrics, chunked.metrics, strict=True):
        assert torch.isfinite(torch.tensor(ra["loss"])) and not ra["skipped"]
        assert ra["reward_mean"] == pytest.approx(rb["reward_mean"], abs=0.25)  # a near-tie may flip a token
        if ra["reward_mean"] == rb["reward_mean"] and ra["accuracy"] == rb["accuracy"]:
            assert ra["loss"] == pytest.approx(rb["loss"], rel=0.05, abs=1e-3)


def test_the_package_level_entry_point_the_readme_gives(tmp_path):
    # README: dmpo_fast.train(dmpo_fast.TrainConfig()). The trainer module is dmpo_fast.trainer, so importing it
    # never replaces the function with a module of the same name.
    import dmpo_fast

    assert dmpo_fast.train is train_mod.train and dmpo_fast.TrainConfig is TrainConfig
    result = dmpo_fast.train(
        dmpo_fast.TrainConfig(output_dir=str(tmp_path / "r"), **{**SMALL, "max_steps": 2})
    )
    assert isinstance(result, dmpo_fast.TrainResult) and result.steps == 2
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        dmpo_fast.trian  # noqa: B018


def test_eval_of_a_checkpoint_uses_the_runs_config_and_reproduces_its_summary(tmp_path):
    """`dmpo-fast eval --checkpoint RUN` evaluates as the run did (task options, seed, sampler, lengths,
    eval_size from the run's saved config); only what the command line states changes."""
    cfg = _cfg(tmp_path, max_steps=2, seed=1, eval_size=6, block_length=8, steps=6, tensorboard=False, plot=False)
    result = train_mod.train(cfg)
    js = tmp_path / "eval.json"
    out = _cli(["eval", "--checkpoint", result.output_dir, "--json", str(js), "progress=false"], timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(js.read_text())[0]
    after = json.loads((Path(result.output_dir) / "summary.json").read_text())["eval_after"]
    assert {k: row[k] for k in after} == after
    assert row["gen_length"] == 24 and row["n"] == 6
    # A stated change wins over the run's config.
    out = _cli(["eval", "--checkpoint", result.output_dir, "--json", str(js), "-n", "4", "progress=false"],
               timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(js.read_text())[0]["n"] == 4


def test_resume_from_the_command_line_reads_the_runs_config(tmp_path):
    """`dmpo-fast train --output-dir RUN --resume max_steps=4` continues a run made with other settings
    without repeating them; a change outside the resumable fields is still refused."""
    run = tmp_path / "run"
    args = [*SMALL_ARGS, "max_steps=2", "seed=3", "alpha=0.1", "tensorboard=false", "plot=false"]
    first = _cli(["train", "--output-dir", str(run), *args], timeout=300)
    assert first.returncode == 0, first.stderr
    resumed = _cli(["train", "--output-dir", str(run), "--resume", "max_steps=4"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-000002" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["seed"] == 3 and summary["config"]["alpha"] == 0.1
    refused = _cli(["train", "--output-dir", str(run), "--resume", "max_steps=6", "alpha=0.5"], timeout=120)
    assert refused.returncode == 2 and "alpha" in refused.stderr


def _strict_lines(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name} in {path.name}")

    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines()]


def test_trackers_evaluations_completions_and_the_logged_learning_rate(tmp_path, capsys):
    """TensorBoard gets train/* every step and eval/reward_mean before, during and after; the logged lr is the
    rate the step used (warm-up: half the rate at step 1); evaluations print during training; completions
    tables land in completions.jsonl; metrics and evals are strict JSON."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, max_steps=4, eval_every=2, log_completions_every=2, warmup_steps=2, plot=False)
    train_mod.train(cfg)
    run = Path(cfg.output_dir)
    rows = _strict_lines(run / "metrics.jsonl")
    _strict_lines(run / "evals.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([cfg.learning_rate / 2, *[cfg.learning_rate] * 3])
    assert "eval at step 2: solve rate" in capsys.readouterr().out
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("eval/reward_mean")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4]
    table = _strict_lines(run / "completions.jsonl")
    assert {r["step"] for r in table} == {2, 4} and all({"prompt", "completion", "reward"} <= set(r) for r in table)


def test_report_to_none_and_bad_names(tmp_path):
    with pytest.raises(ValueError, match="report_to"):
        _cfg(tmp_path, report_to=["tensorboard", "nope"])
    cfg = _cfg(tmp_path, max_steps=2, report_to="none", plot=False)
    train_mod.train(cfg)
    assert not (Path(cfg.output_dir) / "tb").exists()


def test_metrics_are_strict_json_without_nan(tmp_path):
    run = RunDir(tmp_path / "r", resume=False)
    run.log({"step": 1, "reward_mean": float("nan"), "loss": float("inf"), "ok": 1.5})
    run.log_eval(1, {"accuracy": float("nan")})
    assert _strict_lines(run.metrics_path) == [{"step": 1, "reward_mean": None, "loss": None, "ok": 1.5}]
    assert _strict_lines(run.evals_path) == [{"step": 1, "accuracy": None}]


def test_accelerate_launch_on_cpu_with_the_defaults_forms_one_run(tmp_path):
    """`accelerate launch` of 2 processes on a CPU-only machine with device=auto (the default): one process
    group over gloo, each process on its own prompt groups, one metrics line per step, one summary line."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only default; on a GPU machine device=auto means the GPUs")
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    port = str(29500 + (os.getpid() + 700) % 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "configs/accelerate/ddp.yaml"),
         "--num_processes", "2", "--main_process_port", port, "-m", "dmpo_fast", "train", "--output-dir", str(run),
         *SMALL_ARGS, "max_steps=2", "tensorboard=false", "plot=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    assert [r["step"] for r in _strict_lines(run / "metrics.jsonl")] == [1, 2]
    assert proc.stdout.count("held-out solve rate") == 1
