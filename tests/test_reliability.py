"""Nothing lost, nothing silently wrong (docs/reliability.md): non-finite updates, checkpoint verification and
fallback, stale temporaries, a full disk, resume checks, config and CLI errors before any work, a run killed
at random moments (inside checkpoint writes too), and random config input that gives a ValueError naming the
field or a valid config, never another exception."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmpo_fast import cli
from dmpo_fast import run_io as run_io_mod
from dmpo_fast import trainer as train_mod
from dmpo_fast.config import TrainConfig, field_names
from dmpo_fast.evaluation import resolve_checkpoint
from dmpo_fast.run_io import DiskFullError, RunDir, checkpoint_problem

SMALL = dict(
    prompts_per_step=2, num_generations=4, max_steps=4, num_iterations=2, eval_size=8, progress=False,
    save_every=2, num_replicates=2, elbo_replicates=2, impl="chunked", tensorboard=False, plot=False,
)  # fmt: skip
VOLATILE = {"seconds", "tokens_per_s"}
RUN_CLI = "import sys; from dmpo_fast.cli import main; sys.exit(main(sys.argv[1:]))"


def _cfg(path, **kw):
    return TrainConfig(output_dir=str(path), **{**SMALL, **kw})


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _steps(path: Path, name="metrics.jsonl"):
    return [json.loads(ln)["step"] for ln in (path / name).read_text().splitlines() if ln]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4, an evaluation at 2); tests work on copies of it."""
    path = tmp_path_factory.mktemp("finished") / "run"
    result = train_mod.train(_cfg(path, eval_every=2))
    return path, result


@pytest.fixture
def run_copy(finished, tmp_path):
    path, result = finished
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    return copy, result


# --- 1. non-finite parameters are never saved --------------------------------------------------------
def test_a_step_that_makes_the_parameters_non_finite_is_undone(tmp_path, monkeypatch):
    """Finite loss and gradient, non-finite parameters after the update (as float16 overflow or an absurd
    learning rate give): the step is undone, parameters and AdamW state both, and counted as skipped."""
    real = torch.optim.AdamW.step
    seen = {"calls": 0}

    def copy_state(opt):
        params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
        return params, state

    def poisoned(self, *args, **kw):
        seen["calls"] += 1
        if seen["calls"] == 3:  # the third step is the first of the second buffer: checked on the fourth
            seen["before"] = copy_state(self)
        if seen["calls"] == 4:
            seen["at_next"] = copy_state(self)
        out = real(self, *args, **kw)
        if seen["calls"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.warns(UserWarning, match="step 3: non-finite loss, gradient or updated parameters"):
        result = train_mod.train(_cfg(tmp_path / "run", save_every=1))
    assert [r["skipped"] for r in result.metrics] == [False, False, True, False]
    (p_before, s_before), (p_next, s_next) = seen["before"], seen["at_next"]
    assert all(torch.equal(a, b) for a, b in zip(p_before, p_next, strict=True))
    assert s_before.keys() == s_next.keys()
    for k in s_before:
        assert all(torch.equal(s_before[k][n], s_next[k][n]) for n in s_before[k])
    run = RunDir(tmp_path / "run", resume=True)
    assert [p.name for p in run.checkpoint_dirs()] == [
        "step-000002",
        "step-000004",
    ]  # none at the skipped step
    for ckpt in run.checkpoint_dirs():
        model = RunDir.load_checkpoint(ckpt)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_without_the_undo_copy_a_non_finite_update_stops_the_run_and_is_never_saved(tmp_path, monkeypatch):
    """undo_non_finite=false keeps no copy of the parameters (a full fine-tune's memory): a step that makes
    them non-finite stops the run, and every checkpoint stays finite."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kw):
        calls["n"] += 1
        out = real(self, *args, **kw)
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    def no_copy(*args, **kw):
        raise AssertionError("undo_non_finite=false must not copy the parameters")

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    monkeypatch.setattr(train_mod, "snapshot", no_copy)
    with pytest.raises(RuntimeError, match="step 3: the update made the parameters non-finite"):
        train_mod.train(_cfg(tmp_path / "run", save_every=1, undo_non_finite=False))
    run = RunDir(tmp_path / "run", resume=True)
    assert [p.name for p in run.checkpoint_dirs()] == ["step-000001", "step-000002"]
    for ckpt in run.checkpoint_dirs():
        model = RunDir.load_checkpoint(ckpt)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", float("inf")), ("max_grad_norm", float("nan")), ("alpha", float("nan")),
     ("coeff", float("inf")), ("temperature", float("nan")), ("threshold", float("-inf"))],
)  # fmt: skip
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        TrainConfig().with_overrides(
            [f"{field}={'.nan' if value != value else ('-.inf' if value < 0 else '.inf')}"]
        )


def test_float16_on_the_cpu_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="float16.*float32.*bfloat16"):
        TrainConfig(dtype="float16", device="cpu")
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="float16"):  # device=auto resolves to the CPU here
        train_mod.train(_cfg(tmp_path / "run", dtype="float16"))
    assert not (tmp_path / "run").exists()


# --- 2. killed before the first checkpoint: the logs are trimmed on resume ---------------------------------
class _Killed(BaseException):
    pass


def test_a_run_killed_at_its_first_checkpoint_resumes_without_duplicate_lines(tmp_path, monkeypatch):
    real = RunDir.save_checkpoint

    def killed(self, step, state, keep, write_files=None):
        raise _Killed

    monkeypatch.setattr(RunDir, "save_checkpoint", killed)
    cfg = _cfg(tmp_path / "run", max_steps=2, eval_every=1)
    with pytest.raises(_Killed):
        train_mod.train(cfg)
    assert _steps(tmp_path / "run") == [1, 2] and _steps(tmp_path / "run", "evals.jsonl") == [1]
    monkeypatch.setattr(RunDir, "save_checkpoint", real)
    with pytest.warns(UserWarning, match="has no checkpoint: starting from step 0"):
        train_mod.train(cfg.replace(resume=True))
    assert _steps(tmp_path / "run") == [1, 2] and _steps(tmp_path / "run", "evals.jsonl") == [1]


# --- 3. stale temporaries ----------------------------------------------------------------------------
def test_opening_a_run_removes_the_temporaries_of_a_killed_write(run_copy):
    path, _ = run_copy
    half = path / "checkpoints" / ".tmp-abc123"
    half.mkdir()
    (half / "state.pt").write_bytes(b"x" * 10_000)
    (path / ".metrics.jsonl.k2j3.tmp").write_text("partial")
    (path / "checkpoints" / ".step.json.x.tmp").write_text("partial")
    RunDir(path, resume=True, main=False)  # another process of the run: touches nothing
    assert half.exists()
    RunDir(path, resume=True)
    assert not half.exists() and not list(path.glob(".*.tmp")) and not list(path.glob("checkpoints/.*"))
    assert [p.name for p in RunDir(path, resume=True).checkpoint_dirs()] == ["step-000002", "step-000004"]


# --- 4. verification and fallback --------------------------------------------------------------------
def test_a_checkpoint_records_the_size_and_checksum_of_its_files(run_copy):
    path, _ = run_copy
    ckpt = path / "checkpoints" / "step-000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert set(manifest) == {p.name for p in ckpt.iterdir()} - {"manifest.json"}  # the model's files too
    assert {"state.pt", "step.json", "model.safetensors", "config.json"} <= set(manifest)
    assert manifest["state.pt"]["bytes"] == (ckpt / "state.pt").stat().st_size
    assert checkpoint_problem(ckpt) is None
    data = bytearray((ckpt / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (ckpt / "state.pt").write_bytes(bytes(data))
    assert "SHA-256" in checkpoint_problem(ckpt)


@pytest.mark.parametrize("damage", ["truncated", "state missing", "manifest missing, truncated"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(run_copy, damage):
    path, _ = run_copy
    ckpt = path / "checkpoints" / "step-000004"
    state = ckpt / "state.pt"
    if "manifest missing" in damage:  # a checkpoint of an earlier release
        (ckpt / "manifest.json").unlink()
    if "truncated" in damage:
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    else:
        state.unlink()
    with pytest.warns(UserWarning, match=r"step-000004 \(.*(cut short|missing|bytes).*\); using step-000002"):
        assert RunDir(path, resume=True, main=False).latest_checkpoint().name == "step-000002"
    with pytest.warns(UserWarning, match="step-000004"):
        assert resolve_checkpoint(str(path)).name == "step-000002"  # dmpo-fast eval --checkpoint RUN


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_repeats_the_run(run_copy):
    path, first = run_copy
    state = path / "checkpoints" / "step-000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="step-000004"):
        resumed = train_mod.train(_cfg(path, eval_every=2, resume=True))
    assert _steps(path) == [1, 2, 3, 4] and _steps(path, "evals.jsonl") == [2]
    assert _stable(resumed.metrics) == _stable(first.metrics)
    assert resumed.eval_after == first.eval_after
    assert checkpoint_problem(path / "checkpoints" / "step-000004") is None


def test_resume_with_no_intact_checkpoint_is_refused(run_copy):
    path, _ = run_copy
    for ckpt in (path / "checkpoints").iterdir():
        (ckpt / "state.pt").unlink()
    with pytest.warns(UserWarning, match="no intact checkpoint is left"):
        with pytest.raises(ValueError, match="no checkpoint .* passes verification"):
            train_mod.train(_cfg(path, resume=True))


# --- 5. a full disk ----------------------------------------------------------------------------------
def _full_disk_save(obj, f, *args, **kw):
    Path(f).write_bytes(b"PK" + b"\0" * 4096)  # what a short write leaves
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4098")


def test_a_full_disk_names_the_directory_and_leaves_the_run_resumable(tmp_path, monkeypatch, capsys):
    real = run_io_mod.torch.save
    calls = {"n": 0}

    def second_fails(obj, f, *args, **kw):
        calls["n"] += 1
        return (_full_disk_save if calls["n"] == 2 else real)(obj, f, *args, **kw)

    monkeypatch.setattr(run_io_mod.torch, "save", second_fails)
    out = tmp_path / "run"
    args = [
        "train",
        "--output-dir",
        str(out),
        *(f"{k}={v}" for k, v in SMALL.items()),
        "max_steps=2",
        "save_every=1",
    ]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "dmpo-fast train: error: the disk is full" in err and str(out / "checkpoints") in err
    assert "bytes" in err and "step-000001, is intact" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # nothing partial
    monkeypatch.setattr(run_io_mod.torch, "save", real)
    assert cli.main([*args, "--resume"]) == 0
    assert _steps(out) == [1, 2] and checkpoint_problem(out / "checkpoints" / "step-000002") is None


def test_an_out_of_space_error_from_the_os_is_a_disk_full_error(tmp_path, monkeypatch):
    import errno

    def enospc(obj, f, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_io_mod.torch, "save", enospc)
    run = RunDir(tmp_path / "run", resume=False)
    with pytest.raises(
        DiskFullError, match=r"disk is full: writing checkpoint step-000003 .* needs about 4.0 KiB"
    ):
        run.save_checkpoint(3, {"w": torch.zeros(1024)}, keep=2)
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


# --- 7 and 8. errors before any work, naming the field ----------------------------------------------
@pytest.mark.parametrize(
    "override, field",
    [
        ("task=nope", "task"),
        ("task_kwargs={no_such_option: 1}", "no_such_option"),
        ("reward_funcs=[no_such_module_xyz:reward]", "no_such_module_xyz"),
        ("model=/no/such/model/dir", "model"),
        ("model=./relative/missing", "model"),
        ("steps=48", "steps"),
        ("alpha=.nan", "alpha"),
        ("coeff=.inf", "coeff"),
        ("temperature=.nan", "temperature"),
        ("learning_rate=.inf", "learning_rate"),
        ("max_grad_norm=.nan", "max_grad_norm"),
        ("num_generations=1", "num_generations"),
        ("eval_size=100000000", "eval_size"),
        ("output_dir=/proc/nope", "output_dir"),
    ],
)
def test_cli_refuses_bad_input_before_any_work(tmp_path, capsys, override, field):
    out = tmp_path / "x"
    t = time.time()
    code = cli.main(["train", "--output-dir", str(out), "progress=false", override])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2 and err.startswith("dmpo-fast train: error: ") and field in err, err
    assert "eval before" not in captured.out
    if field != "output_dir":
        assert not out.exists()  # refused before the run directory was made
    assert time.time() - t < 30


def test_impl_triton_without_a_gpu_is_refused_before_any_work(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' cannot run here"):
        train_mod.train(_cfg(tmp_path / "run", impl="triton"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, where",
    [("max_steps: 3\n\talpha: 0.1\n", "line 2"), ("max_steps: [1\n", "line 2"), ("alpha:\t0.1\n", "line 1")],
)
def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys, text, where):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(f))}.*{where}"):
        TrainConfig.from_yaml(f)
    assert cli.main(["train", "--config", str(f)]) == 2
    assert str(f) in capsys.readouterr().err


def test_a_yaml_config_that_is_not_a_mapping_names_the_file(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- max_steps\n- 3\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(f))}.*mapping.*list"):
        TrainConfig.from_yaml(f)


@pytest.mark.parametrize("content, problem", [("[1, 2]", "JSON object.*list"), ("{not json", "JSON")])
def test_a_model_config_json_that_is_not_an_object_names_the_file(tmp_path, content, problem):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"config.json.*{problem}"):
        train_mod.train(_cfg(tmp_path / "run", model=str(model)))


def test_eval_gen_lengths_zero_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--gen-lengths", "0"])
    assert e.value.code == 2 and "--gen-lengths: must be >= 1, got 0" in capsys.readouterr().err


def test_an_unfetchable_perplexity_model_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["train", "--output-dir", str(tmp_path / "x"), *(f"{k}={v}" for k, v in SMALL.items()),
            "algorithm=mro", "num_iterations=1", "mro_ppl_model=no-such-owner/no-such-ppl-model"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert (
        out.returncode == 2
        and "mro_ppl_model 'no-such-owner/no-such-ppl-model' cannot be loaded" in out.stderr
    )
    assert "Traceback" not in out.stderr and "eval before" not in out.stdout


# --- 9. resume edge cases --------------------------------------------------------------------------------
def test_a_moved_run_directory_resumes_with_more_steps(run_copy, tmp_path):
    path, first = run_copy
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(path, moved)
    resumed = train_mod.train(_cfg(moved.resolve(), eval_every=2, max_steps=6, resume=True))
    assert _steps(moved) == [1, 2, 3, 4, 5, 6]
    assert _stable(resumed.metrics[:4]) == _stable(first.metrics)
    assert resumed.eval_before == first.eval_before


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(max_steps=2), "max_steps=2 but the run .* is at step 4"),
        (dict(eval_size=16), "eval_size: 8 -> 16"),
    ],
)
def test_resume_refuses_what_would_make_another_run(run_copy, change, match):
    path, _ = run_copy
    with pytest.raises(ValueError, match=match):
        train_mod.train(_cfg(path, eval_every=2, resume=True, **change))
    assert json.loads((path / "summary.json").read_text())["steps"] == 4


def test_resume_checks_the_checkpoints_own_config_when_config_yaml_is_gone(run_copy):
    path, _ = run_copy
    (path / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"learning_rate: 0.0003 -> 0.1, seed: 0 -> 7.*step-000004"):
        train_mod.train(_cfg(path, eval_every=2, resume=True, seed=7, learning_rate=0.1))


def test_resuming_a_finished_run_keeps_its_total_wall_time(run_copy):
    path, _ = run_copy
    before = RunDir.load_checkpoint(path / "checkpoints" / "step-000004")["wall_seconds"]
    t = time.time()
    resumed = train_mod.train(_cfg(path, eval_every=2, resume=True))
    session = time.time() - t
    summary = json.loads((path / "summary.json").read_text())
    assert before > 0 and summary["wall_seconds"] == resumed.wall_seconds
    assert before + 0.5 * session < summary["wall_seconds"] <= before + session + 1


# --- kill at random moments, resume: the uninterrupted run, line for line and bit for bit ----------------
SLOW_SAVE = """
import sys, time, io
import torch
from dmpo_fast import run_io
real = torch.save
def slow(obj, f, *a, **kw):  # the same bytes, written in slices over ~0.6 s: time to be killed inside
    buf = io.BytesIO(); real(obj, buf, *a, **kw); data = buf.getvalue()
    with open(f, "wb") as out:
        for i in range(0, len(data), len(data) // 6 + 1):
            out.write(data[i : i + len(data) // 6 + 1]); out.flush(); time.sleep(0.1)
run_io.torch.save = slow
from dmpo_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_at_random_moments_the_run_resumes_to_the_uninterrupted_result(tmp_path):
    rng = random.Random(18)
    kw = dict(max_steps=6, save_every=1, keep_checkpoints=2, eval_every=3)
    whole = train_mod.train(_cfg(tmp_path / "whole", **kw))
    out = tmp_path / "killed"
    args = ["train", "--output-dir", str(out), *(f"{k}={v}" for k, v in {**SMALL, **kw}.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(resume: bool):
        return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args, *(["--resume"] if resume else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip

    def inside_a_write():
        return out.joinpath("checkpoints").is_dir() and any(out.joinpath("checkpoints").glob(".tmp-*"))

    # Kill 1: inside the first or second checkpoint write. Kill 2 (of the resumed run): a random moment
    # after its first checkpoint write began, inside a write or between two.
    for resume, when in ((False, "write"), (True, "random")):
        proc = start(resume)
        writes, target, delay = 0, rng.randint(1, 2), rng.uniform(0.0, 1.5)
        was_inside, first_write, deadline = False, None, time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
            inside = inside_a_write()
            writes += inside and not was_inside
            was_inside = inside
            if writes and first_write is None:
                first_write = time.time()
            if when == "write" and inside and writes >= target:
                break
            if when == "random" and first_write is not None and time.time() - first_write > delay:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (out / "summary.json").exists(), "the kills came too late to test anything"
    final = subprocess.run([sys.executable, "-c", SLOW_SAVE, *args, "--resume"], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert final.returncode == 0, final.stderr[-3000:]
    assert _steps(out) == [1, 2, 3, 4, 5, 6] and _steps(out, "evals.jsonl") == [3]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert _stable(rows) == _stable(whole.metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_before"] == whole.eval_before and summary["eval_after"] == whole.eval_after
    a = RunDir.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000006")
    b = RunDir.load_checkpoint(out / "checkpoints" / "step-000006")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --- property-based: random config input gives a ValueError naming the field, or a valid config ----------
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(["dmpo", "mro", "wd1", "float16", "cpu", "cuda", "triton", "none", "group", "1e-5", ".nan",
                     "-.inf", "0", "1", "24", "48", "frozen_copy", "adapter_disabled"]),
)  # fmt: skip
FIELDS = st.sampled_from(field_names())
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _valid_or_names(fn, names):
    try:
        fn()
    except ValueError as e:
        assert any(str(n) in str(e) or repr(str(n)) in str(e) for n in names), (names, str(e))


@PROPERTY
@given(st.dictionaries(st.one_of(FIELDS, st.text(max_size=8), st.integers()), VALUES, min_size=1, max_size=3))
def test_random_fields_give_a_valid_config_or_a_value_error_naming_one(d):
    _valid_or_names(lambda: TrainConfig.from_dict(d), d)


@PROPERTY
@given(FIELDS, st.text(max_size=20))
def test_random_overrides_give_a_valid_config_or_a_value_error_naming_the_field(name, raw):
    _valid_or_names(lambda: TrainConfig().with_overrides([f"{name}={raw}"]), [name])


@PROPERTY
@given(st.one_of(st.text(max_size=60), st.dictionaries(FIELDS, VALUES, max_size=3).map(
    lambda d: json.dumps(d).replace(", ", ",\n\t"))))  # fmt: skip
def test_random_yaml_gives_a_valid_config_or_a_value_error_naming_the_file(tmp_path, text):
    f = tmp_path / "random.yaml"
    f.write_text(text)
    _valid_or_names(lambda: TrainConfig.from_yaml(f), [str(f)])


@PROPERTY
@given(st.lists(st.tuples(FIELDS, st.text(max_size=10)), max_size=3), st.booleans())
def test_random_command_lines_parse_to_a_config_or_a_value_error(pairs, resume):
    argv = [
        "train",
        "--output-dir",
        "somewhere",
        *(["--resume"] if resume else []),
        *(f"{k}={v}" for k, v in pairs),
    ]
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's own usage error (a value that looks like an option)
        assert e.code == 2
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _valid_or_names(
            lambda: cli._config(args, output_dir=args.output_dir, resume=True if args.resume else None),
            [k for k, _ in pairs] + ["override"],
        )


def test_loading_a_damaged_checkpoint_directory_names_it(run_copy):
    path, _ = run_copy
    ckpt = path / "checkpoints" / "step-000004"
    (ckpt / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=r"step-000004' is damaged: state.pt has 14 bytes"):
        RunDir.load_checkpoint(ckpt)  # what dmpo-fast eval --checkpoint DIR reads
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match="step-000004' is damaged: state.pt is cut short"):
        RunDir.load_checkpoint(ckpt)
