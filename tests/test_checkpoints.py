"""Checkpoints in Hugging Face form: the model (safetensors + config + tokenizer, or the PEFT adapter) next to
the training state; loadable by dmpo_fast.models.load, transformers' auto classes, PEFT and TRL; checkpoints of
older releases (the model inside state.pt) still resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmpo_fast import trainer as train_mod
from dmpo_fast.config import TrainConfig
from dmpo_fast.run_io import RunDir

SMALL = dict(
    prompts_per_step=2, num_generations=4, num_iterations=2, eval_size=4, progress=False, save_every=1,
    num_replicates=2, elbo_replicates=2, impl="chunked", tensorboard=False, plot=False,
)  # fmt: skip


def _cfg(tmp_path, name, **kw):
    return TrainConfig(output_dir=str(tmp_path / name), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    return train_mod.train(_cfg(tmp, "run", max_steps=2)), tmp


def test_a_checkpoint_holds_the_model_in_hugging_face_form(full_run):
    result, _ = full_run
    ckpt = Path(result.output_dir) / "checkpoints" / "step-000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "state.pt", "dmpo_fast.json"} <= names
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert "model" not in state and {"optimizer", "scheduler", "rng", "buffer", "config"} <= set(state)


@pytest.mark.parametrize("where", ["checkpoint", "run"])
def test_models_load_reads_a_checkpoint_or_a_run(full_run, where):
    from dmpo_fast.models import load, load_tokenizer

    result, _ = full_run
    run = Path(result.output_dir)
    path = run / "checkpoints" / "step-000002" if where == "checkpoint" else run
    saved = RunDir.load_checkpoint(run / "checkpoints" / "step-000002")["model"]
    lm = load(str(path))
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in saved.items())
    assert load_tokenizer(str(path)).mask_id == lm.mask_id


def test_transformers_auto_classes_load_a_checkpoint_without_remote_code(full_run):
    from transformers import AutoModel

    from dmpo_fast.models import register_auto_classes

    result, _ = full_run
    ckpt = Path(result.output_dir) / "checkpoints" / "step-000002"
    assert "auto_map" not in json.loads((ckpt / "config.json").read_text())
    register_auto_classes()
    model = AutoModel.from_pretrained(str(ckpt))
    saved = RunDir.load_checkpoint(ckpt)["model"]
    assert all(torch.equal(model.state_dict()[k[len("model.") :]], v) for k, v in saved.items())


def test_a_lora_checkpoint_is_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from dmpo_fast.models import load

    result = train_mod.train(_cfg(tmp_path, "lora", max_steps=2, lora=True, reference="adapter_disabled"))
    ckpt = Path(result.output_dir) / "checkpoints" / "step-000002"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    saved = RunDir.load_checkpoint(ckpt)["model"]
    assert saved and all("lora_" in k for k in saved)
    lm = load(str(ckpt))
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in saved.items())
    adapter = peft.PeftModel.from_pretrained(load("tiny").model, str(ckpt))
    lora_b = {k: v for k, v in adapter.state_dict().items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())


def test_trl_starts_from_a_checkpoint(full_run, tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from dmpo_fast.integrations.trl import DMPOConfig, DMPOTrainer

    result, _ = full_run
    args = DMPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, report_to=[], use_cpu=True, bf16=False, impl="chunked")  # fmt: skip
    trainer = DMPOTrainer(model=result.output_dir, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                          args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "1"}] * 4))  # fmt: skip
    saved = RunDir.load_checkpoint(Path(result.output_dir) / "checkpoints" / "step-000002")["model"]
    assert all(torch.equal(trainer.policy.state_dict()[k], v) for k, v in saved.items())


def test_a_checkpoint_of_an_older_release_still_resumes_exactly(tmp_path):
    """Older releases kept the model inside state.pt (no model files): such a run resumes and ends where an
    uninterrupted run ends."""
    whole = train_mod.train(_cfg(tmp_path, "whole", max_steps=4))
    cfg = _cfg(tmp_path, "old", max_steps=2)
    train_mod.train(cfg)
    for ckpt in (Path(cfg.output_dir) / "checkpoints").iterdir():  # rewrite as the older format
        state = RunDir.load_checkpoint(ckpt)
        for name in ("model.safetensors", "config.json", "tokenizer.json", "dmpo_fast.json", "manifest.json"):
            (ckpt / name).unlink()
        torch.save(state, ckpt / "state.pt")
    resumed = train_mod.train(cfg.replace(max_steps=4, resume=True))
    a = RunDir.load_checkpoint(Path(whole.output_dir) / "checkpoints" / "step-000004")["model"]
    b = RunDir.load_checkpoint(Path(resumed.output_dir) / "checkpoints" / "step-000004")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
