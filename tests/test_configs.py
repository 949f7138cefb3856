"""The shipped recipes in configs/: each parses and validates, and the code path each one takes (LoRA with
the adapter-off reference, the sampler and cache, the baseline, gradient accumulation) runs one real
optimizer step with the tiny model in its place."""

from pathlib import Path

import pytest

from dmpo_fast.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj"]


def test_there_are_recipes_for_both_models_and_all_four_tasks():
    names = {p.stem for p in CONFIGS}
    for model in ("llada8b", "dream7b"):
        for task in ("gsm8k", "math500", "countdown", "sudoku"):
            assert f"{model}_{task}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_validates_with_the_paper_values(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.alpha == 0.04 and cfg.num_generations == 16 and cfg.num_iterations == 8
    assert cfg.learning_rate == 3e-6 and cfg.max_grad_norm == 0.2 and cfg.weight_decay == 0.1
    assert cfg.lora and cfg.lora_r == 128 and cfg.lora_alpha == 64 and cfg.reference == "adapter_disabled"
    assert cfg.sampler == "fast_dllm" and cfg.gen_length == 256 and cfg.block_length == 32


def _path_signature(cfg: TrainConfig) -> tuple:
    return (
        cfg.lora,
        cfg.reference,
        cfg.sampler,
        cfg.cache,
        cfg.baseline,
        cfg.loss,
        cfg.gradient_accumulation_steps > 1,
    )


def _distinct_paths():
    seen, out = set(), []
    for p in CONFIGS:
        sig = _path_signature(TrainConfig.from_yaml(p))
        if sig not in seen:
            seen.add(sig)
            out.append(p)
    return out


@pytest.mark.parametrize("path", _distinct_paths(), ids=lambda p: p.stem)
def test_recipe_code_path_runs_on_the_tiny_model(path, tmp_path):
    pytest.importorskip("peft")
    from dmpo_fast.trainer import train

    cfg = TrainConfig.from_yaml(path).replace(
        model="tiny", trust_remote_code=False, dtype="float32", device="cpu", task="sudoku", task_kwargs={},
        reward_preset="default",  # the tiny model's compact Sudoku has no <answer> block for d1's reward
        prompts_per_step=2, num_generations=2, gen_length=24, block_length=8, steps=6, num_iterations=1,
        lora_target_modules=TINY_TARGETS, lora_r=4, gradient_accumulation_steps=2,
        max_steps=1, eval_size=2, progress=False, tensorboard=False, plot=False,
        output_dir=str(tmp_path / "run"), impl="chunked",
    )  # fmt: skip
    if cfg.load_in_4bit or cfg.load_in_8bit:  # the LLaDA recipes' QLoRA base (CI installs it with [dev])
        pytest.importorskip("bitsandbytes")
    result = train(cfg)
    assert len(result.metrics) == 1 and result.metrics[0]["skipped"] is False
