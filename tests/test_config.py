"""TrainConfig: defaults validate, YAML + overrides, clear errors naming the field."""

import pytest

from dmpo_fast.config import TrainConfig, field_names


def test_defaults_are_valid_and_dict_round_trips():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rollouts_per_step == cfg.prompts_per_step * cfg.num_generations


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("alpha: 0.1\nbaseline: group\nlora: true\nreference: adapter_disabled\n")
    cfg = TrainConfig.from_yaml(p)
    assert cfg.alpha == 0.1 and cfg.baseline == "group" and cfg.lora
    cfg2 = cfg.with_overrides(["ess_target=0.7", "max_steps=3", "lora_target_modules=[q_proj, v_proj]"])
    assert cfg2.ess_target == 0.7 and cfg2.max_steps == 3 and cfg2.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.ess_target is None  # the original is never mutated
    assert cfg2.with_overrides(["ess_target=null"]).ess_target is None


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"baseline": "mean"}, r"baseline must be one of 'none', 'group', 'individual', 'model'"),
        ({"sampler": "ddim"}, "sampler must be one of"),
        ({"num_generations": 0}, "num_generations must be an int >= 1"),
        ({"num_generations": 2.5}, "num_generations must be an int"),
        ({"gen_length": 30, "block_length": 8}, "gen_length"),
        ({"steps": 5, "gen_length": 24, "block_length": 8}, "steps"),
        ({"num_replicates": 3}, "num_replicates"),
        ({"mask_rate_min": 0.5, "mask_rate_max": 0.2}, "mask_rate_min"),
        ({"ess_target": 1.5}, "ess_target"),
        ({"alpha": 0.1, "reference": "none"}, "reference"),
        ({"reference": "adapter_disabled"}, "lora"),
        ({"lora": "yes"}, "lora must be true or false"),
        ({"device": "tpu"}, "device"),
        ({"alpah": 0.1}, "did you mean 'alpha'"),
    ],
)
def test_bad_fields_name_themselves(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().replace(**changes)


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig().with_overrides(["alpha"])
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    assert "alpha" in field_names()


def test_every_field_is_documented_and_docs_config_md_is_current():
    from pathlib import Path

    from dmpo_fast import config

    assert set(config.FIELD_DOCS) == set(config.field_names())
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert config.markdown_table() in doc, "docs/config.md is stale: regenerate it with `dmpo-fast config --markdown`"


def test_numbers_in_exponent_form_parse_as_floats(tmp_path):
    from dmpo_fast.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-6\nthreshold: 9e-1\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.learning_rate == 3e-6 and cfg.threshold == 0.9
    assert TrainConfig().with_overrides(["learning_rate=1e-5"]).learning_rate == 1e-5
    assert TrainConfig().with_overrides(["output_dir=runs/v1.e"]).output_dir == "runs/v1.e"


def test_task_options_default_per_task():
    """task_kwargs null means the embedded run's options for Sudoku and the task's own defaults elsewhere, so
    switching task=countdown on the command line needs no task_kwargs."""
    from dmpo_fast.tasks import get_task

    assert TrainConfig().task_options() == {"reward_type": "solved"}
    cd = TrainConfig().with_overrides(["task=countdown"])
    assert cd.task_kwargs is None and cd.task_options() == {}
    get_task(cd.task, **cd.task_options())  # constructs
    assert TrainConfig(task_kwargs={}).task_options() == {}  # explicit: the task's own defaults (cell reward)
    assert TrainConfig(task_kwargs={"reward_cells": "all"}).task_options() == {"reward_cells": "all"}


def test_algorithm_defaults_resolve_per_algorithm_and_follow_a_change_of_algorithm(tmp_path):
    # num_iterations left at null: 2 optimizer steps per buffer, 1 for MRO (its REINFORCE has no ratio).
    assert TrainConfig().num_iterations == 2
    mro = TrainConfig(algorithm="mro")
    assert mro.num_iterations == 1
    assert TrainConfig().replace(algorithm="mro").num_iterations == 1
    assert TrainConfig().with_overrides(["algorithm=mro"]).num_iterations == 1
    assert mro.replace(algorithm="dmpo").num_iterations == 2
    # The learning rate: 3e-4, MRO and wd1 3e-5.
    assert (TrainConfig().learning_rate, mro.learning_rate) == (3e-4, 3e-5)
    assert TrainConfig(algorithm="wd1").learning_rate == 3e-5
    assert mro.replace(algorithm="dmpo").learning_rate == 3e-4
    assert TrainConfig(algorithm="mro", learning_rate=1e-4).replace(algorithm="dmpo").learning_rate == 1e-4
    # A value the user states is kept, whatever the algorithm.
    assert TrainConfig(algorithm="mro", num_iterations=2).num_iterations == 2
    assert TrainConfig(num_iterations=3).replace(algorithm="mro").num_iterations == 3
    assert TrainConfig().with_overrides(["algorithm=mro", "num_iterations=2"]).num_iterations == 2
    # A saved config holds the number, so a resumed run keeps it.
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(mro.to_dict()))
    assert "num_iterations: 1" in (tmp_path / "c.yaml").read_text()
    assert TrainConfig.from_yaml(tmp_path / "c.yaml").replace(algorithm="dmpo").num_iterations == 1
    with pytest.raises(ValueError, match="num_iterations must be an int >= 1"):
        TrainConfig(num_iterations=0)


def test_mro_perplexity_scorer_auto_is_the_tasks_built_in_one():
    assert TrainConfig(algorithm="mro").ppl_model == "tiny_ar_sudoku"
    assert TrainConfig(algorithm="mro").effective_ppl_weight == 1.0
    assert TrainConfig(algorithm="mro", task="countdown").ppl_model == "tiny_ar_countdown"
    gsm8k = TrainConfig(algorithm="mro", task="gsm8k")
    assert gsm8k.ppl_model is None and gsm8k.effective_ppl_weight == 0.0
    off = TrainConfig(algorithm="mro", mro_ppl_model=None)
    assert off.ppl_model is None and off.effective_ppl_weight == 0.0
    assert TrainConfig(mro_ppl_model="gpt2").ppl_model == "gpt2"
    with pytest.raises(ValueError, match="mro_states_per_window must be an int >= 1 or null"):
        TrainConfig(mro_states_per_window=0)


def test_a_saved_run_without_a_newer_field_keeps_its_own_behaviour(tmp_path):
    # A run saved before mro_states_per_window etc. existed ran every state, verified every token, had no
    # anchor: from_saved (saved_config, --resume) restores that, and a resume that would change it is refused.
    import yaml

    from dmpo_fast.checkpointing import check_resume_config
    from dmpo_fast.config import SAVED_WITHOUT
    from dmpo_fast.evaluation import saved_config
    from dmpo_fast.run_io import RunDir

    old = TrainConfig(algorithm="mro", output_dir=str(tmp_path / "run")).to_dict()
    for name in SAVED_WITHOUT:
        del old[name]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = saved_config(str(tmp_path / "run"))
    assert (cfg.mro_anchor, cfg.mro_verification_tokens, cfg.mro_tts_vote) == ("none", "all", False)
    assert cfg.mro_states_per_window is None and cfg.mro_verification_steps is None
    run = RunDir(tmp_path / "run", resume=True, main=False)
    check_resume_config(run, cfg.replace(resume=True), {"step": 1, "config": old})  # the same run: accepted
    with pytest.raises(ValueError, match=r"mro_states_per_window: None -> 1"):
        check_resume_config(run, TrainConfig(algorithm="mro", resume=True, output_dir=str(tmp_path / "run")),
                            {"step": 1, "config": old})  # fmt: skip
    # A user's YAML file is not a saved run: absent fields take their defaults.
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"algorithm": "mro"}))
    assert TrainConfig.from_yaml(tmp_path / "mine.yaml").mro_states_per_window == 1


def test_printed_defaults_leave_the_algorithm_dependent_fields_to_the_algorithm(tmp_path, capsys):
    # `dmpo-fast config > my.yaml`, then algorithm: mro in it: MRO's own rate and steps per buffer, not DMPO's.
    import yaml

    from dmpo_fast import cli

    assert cli.main(["config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["learning_rate"] is None and printed["num_iterations"] is None
    (tmp_path / "my.yaml").write_text(yaml.safe_dump({**printed, "algorithm": "mro"}))
    cfg = TrainConfig.from_yaml(tmp_path / "my.yaml")
    assert (cfg.learning_rate, cfg.num_iterations) == (3e-5, 1)
    assert TrainConfig.from_dict(printed) == TrainConfig()


def test_rejection_sampling_keeps_solved_bests_by_default_only_for_mro_rs(tmp_path):
    # mro_rs ranks by the multi-reward, so a group that solved nothing would hand it its most confident failure.
    import yaml

    from dmpo_fast.evaluation import saved_config

    assert TrainConfig(algorithm="mro_rs").rs_keep == "solved"
    assert TrainConfig(algorithm="rejection_sft").rs_keep == "best" == TrainConfig().rs_keep
    assert TrainConfig(algorithm="mro_rs").replace(algorithm="rejection_sft").rs_keep == "best"
    assert TrainConfig(algorithm="mro_rs", rs_keep="best").replace(max_steps=3).rs_keep == "best"
    with pytest.raises(ValueError, match=r"rs_keep.*'best', 'solved'"):
        TrainConfig(rs_keep="all")
    old = TrainConfig(algorithm="mro_rs", output_dir=str(tmp_path / "run")).to_dict()
    del old["rs_keep"]  # an mro_rs run saved before the field: it kept every group's best
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    assert saved_config(str(tmp_path / "run")).rs_keep == "best"
