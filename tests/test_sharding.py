"""FSDP options: what turns sharding on, ZeRO-3 vs ZeRO-2, and the launcher options the trainer refuses.
(Two processes training sharded and matching one process: tests/test_train.py.)"""

from pathlib import Path

import pytest
import yaml

from dmpo_fast import sharding
from dmpo_fast.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY", "FSDP_VERSION",
            "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING")  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in FSDP_ENV:
        monkeypatch.delenv(name, raising=False)


def test_fsdp_is_requested_by_the_config_or_an_accelerate_launch(monkeypatch):
    assert not sharding.requested(TrainConfig())
    assert sharding.requested(TrainConfig(fsdp=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding.requested(TrainConfig())


@pytest.mark.parametrize(
    "env, field, expected",
    [
        ({}, True, True),
        ({}, False, False),
        ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, True, False),
        ({"FSDP_RESHARD_AFTER_FORWARD": "true"}, False, True),
        ({"FSDP_RESHARD_AFTER_FORWARD": "shard_grad_op"}, True, False),  # an FSDP1-style config
        ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, True, False),
        ({"FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, False, False),  # the field decides
    ],
)
def test_zero3_or_zero2(monkeypatch, env, field, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sharding.reshard_after_forward(TrainConfig(fsdp_reshard_after_forward=field)) is expected


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("FSDP_RESHARD_AFTER_FORWARD", "hybrid_shard", "FSDP_RESHARD_AFTER_FORWARD must be true or false"),
        ("FSDP_SHARDING_STRATEGY", "NO_SHARD", "FSDP_SHARDING_STRATEGY must be FULL_SHARD"),
    ],
)
def test_unknown_sharding_strategies_are_refused(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        sharding.reshard_after_forward(TrainConfig())


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
        ("FSDP_ACTIVATION_CHECKPOINTING", "true", "gradient_checkpointing=true"),
        ("FSDP_VERSION", "1", "fsdp_version: 2"),
    ],
)
def test_launcher_options_the_trainer_does_not_honour_are_refused(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        sharding.check_launch(world=2)


def test_a_single_process_fsdp_run_warns_that_nothing_is_sharded():
    with pytest.warns(UserWarning, match="nothing to shard"):
        sharding.check_launch(world=1)


@pytest.mark.parametrize("name, zero3", [("fsdp.yaml", True), ("fsdp_zero2.yaml", False)])
def test_the_accelerate_fsdp_configs(name, zero3):
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / name).read_text())
    assert cfg["distributed_type"] == "FSDP"
    fsdp = cfg["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is zero3
    assert fsdp["fsdp_offload_params"] is False and fsdp["fsdp_activation_checkpointing"] is False
