"""QLoRA: a 4-bit (or 8-bit) base from bitsandbytes, LoRA on top, the fused loss reading a 16-bit head.

bitsandbytes (0.50) runs NF4 and LLM.int8 on CPU, so everything here runs on the CI machine, which installs it
with the ``dev`` extra; without it the bitsandbytes tests skip and the validation tests still run.
"""

import importlib.util
from pathlib import Path

import json

import pytest
import torch

from dmpo_fast import dmpo
from dmpo_fast import trainer as train_mod
from dmpo_fast.assets import TINY_SUDOKU
from dmpo_fast.config import TrainConfig
from dmpo_fast.models import LLaDAModelLM, load, tiny_config
from dmpo_fast.models import quantization as quant
from dmpo_fast.run_io import RunDir

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(
    not HAS_BNB, reason="bitsandbytes is not installed (pip install 'dmpo-fast[quant]')"
)
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")

SMALL = dict(
    prompts_per_step=2, num_generations=4, num_iterations=2, eval_size=4, progress=False, save_every=2,
    num_replicates=2, elbo_replicates=2, impl="chunked", tensorboard=False, plot=False, lora=True,
    reference="adapter_disabled", lora_target_modules=["q_proj", "v_proj", "attn_out", "ff_proj", "up_proj"],
)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj"]


# ---- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"load_in_4bit": True, "load_in_8bit": True, "lora": True},
            "load_in_4bit and load_in_8bit are exclusive",
        ),
        ({"load_in_4bit": True}, "load_in_4bit=true needs lora=true"),
        ({"load_in_8bit": True}, "load_in_8bit=true needs lora=true"),
        ({"load_in_4bit": True, "lora": True, "fsdp": True}, "does not work with fsdp=true"),
        ({"load_in_4bit": "yes", "lora": True}, "load_in_4bit must be true or false"),
    ],
)
def test_bad_quantization_configs_are_refused_with_the_field_names(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_a_quantized_lora_config_is_accepted_and_overridable():
    cfg = TrainConfig().with_overrides(["lora=true", "load_in_4bit=true"])
    assert cfg.load_in_4bit and not cfg.load_in_8bit


def test_missing_bitsandbytes_names_the_install_command_before_any_work(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    # The path does not exist: the bitsandbytes error comes first, before any file or hub access.
    with pytest.raises(
        ValueError,
        match=r"load_in_4bit=true needs the bitsandbytes package: pip install 'dmpo-fast\[quant\]'",
    ):
        load("no/such-model-anywhere", load_in_4bit=True)
    with pytest.raises(ValueError, match=r"load_in_8bit=true needs the bitsandbytes package"):
        load("no/such-model-anywhere", load_in_8bit=True)
    with pytest.raises(ValueError, match="exclusive"):
        load("no/such-model-anywhere", load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize(
    "overrides, expected",
    [({}, ["model.transformer.ff_out"]), ({"weight_tying": True}, ["model.transformer.wte"])],
    ids=["separate-head", "tied-head"],
)
def test_skip_modules_name_the_output_layer_only(overrides, expected):
    with torch.device("meta"):
        model = LLaDAModelLM(tiny_config(40, **overrides))
    names = quant.skip_modules(model)
    assert names == expected
    # transformers matches skip names as prefixes and suffixes: the blocks' own ff_out must stay out of it.
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert should_convert_module("model.transformer.blocks.0.ff_out", names)
    assert not should_convert_module(expected[0], names)


# ---- loading -----------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_llada_keeps_its_head_in_16_bit(bits):
    plain = load(str(TINY_SUDOKU), dtype="bfloat16")
    lm = load(str(TINY_SUDOKU), dtype="bfloat16", **{f"load_in_{bits}bit": True})
    found = quant.quantized_modules(lm)
    blocks = lm.config.n_layers
    assert len(found) == 7 * blocks and set(found.values()) == {f"{bits}bit"}
    assert "model.model.transformer.ff_out" not in found
    assert any(name.endswith("blocks.0.ff_out") for name in found)  # the MLP's ff_out is quantized
    assert lm.head_weight.dtype == torch.bfloat16
    assert torch.equal(lm.head_weight, plain.head_weight)  # the 16-bit matrix, untouched
    ids = torch.randint(0, lm.vocab_size - 2, (2, 12))
    with torch.no_grad():
        assert torch.isfinite(lm.logits(ids)).all()


@needs_bnb
def test_quantized_hf_model_through_the_adapter(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, mask_token_id=39, eos_token_id=38,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    lm = load(str(tmp_path), dtype="float32", load_in_4bit=True)
    found = quant.quantized_modules(lm)
    assert "model.lm_head" not in found and len(found) == 2 * 7
    plain = load(str(tmp_path), dtype="float32")
    assert torch.equal(lm.head_weight, plain.head_weight)


# ---- the loss on a 4-bit base -----------------------------------------------------------------------------
def _with_lora(lm, seed=0):
    from dmpo_fast.models.peft_support import add_lora

    lm = add_lora(lm, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init: give the adapter a value so its gradient path is exercised
        for _, p in sorted(lm.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)
    return lm


def _loss_and_grads(lm):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, lm.vocab_size - 2, (4, 30), generator=gen)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 10:] = True
    weights = torch.tensor([0.7, -0.2, 0.4, 0.1])
    noise = dmpo.NoiseConfig(replicates=2)
    out = dmpo.wdce(lm, ids, maskable, weights, group_size=2, noise=noise, seed=11, impl="chunked")
    out.loss.backward()
    grads = {n: p.grad.detach().double() for n, p in lm.named_parameters() if p.requires_grad}
    return out.loss.detach().double(), grads


@needs_bnb
@needs_peft
def test_4bit_loss_and_gradients_are_the_dequantized_weights_loss(one_thread):
    """The 4-bit model computes exactly the loss of its dequantized weights (to float32 rounding, judged by
    the float32 error of that same model), and differs from the unquantized model by that much, no more."""
    import bitsandbytes as bnb

    q4 = load(str(TINY_SUDOKU), dtype="float32", load_in_4bit=True).train()
    dequantized = {}
    for name, module in q4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dequantized[name + ".weight"] = w.double()

    def plain(dtype, weights=None):
        lm = load(str(TINY_SUDOKU), dtype=dtype).train()
        if weights is not None:
            state = lm.state_dict()
            assert set(weights) <= set(state)
            lm.load_state_dict({**state, **{k: v.to(dtype) for k, v in weights.items()}})
        return lm

    original = plain(torch.float64)
    weight_err = max(
        (dequantized[k] - original.state_dict()[k]).abs().max().item() for k in dequantized
    )  # NF4's rounding of the weights themselves
    assert weight_err > 0

    truth, truth_g = _loss_and_grads(_with_lora(plain(torch.float64, dequantized)))  # dequantized, fp64
    fp32, fp32_g = _loss_and_grads(_with_lora(plain(torch.float32, dequantized)))  # same weights, fp32
    q4_loss, q4_g = _loss_and_grads(_with_lora(q4))  # the 4-bit model, fp32 compute
    full, _ = _loss_and_grads(_with_lora(original))  # the unquantized model, fp64

    eps = torch.finfo(torch.float32).eps
    fp32_err = (fp32 - truth).abs().item()
    q4_err = (q4_loss - truth).abs().item()
    assert q4_err <= 4 * fp32_err + 8 * eps * truth.abs().item(), (q4_err, fp32_err)
    for name, g in truth_g.items():
        ref_err = (fp32_g[name] - g).abs().max().item()
        err = (q4_g[name] - g).abs().max().item()
        assert err <= 4 * ref_err + 64 * eps * g.abs().max().item(), (name, err, ref_err)
    # Against the unquantized model: the gap is the quantization's (the dequantized model has the same gap),
    # and it is far above the compute rounding, so the comparisons above are not vacuous.
    gap = (q4_loss - full).abs().item()
    assert gap == pytest.approx((truth - full).abs().item(), abs=4 * fp32_err + 8 * eps * truth.abs().item())
    assert gap > 100 * (q4_err + eps * truth.abs().item())


# ---- the trainer ------------------------------------------------------------------------------------------
def _metrics(run_dir):
    rows = RunDir(run_dir, resume=True, main=False).read_metrics()
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]


@needs_bnb
@needs_peft
def test_qlora_run_trains_resumes_and_repeats_itself(tmp_path, one_thread):
    cfg = TrainConfig(output_dir=str(tmp_path / "a"), load_in_4bit=True, max_steps=4, **SMALL)
    first = train_mod.train(cfg)
    again = train_mod.train(cfg.replace(output_dir=str(tmp_path / "b")))
    assert _metrics(first.output_dir) == _metrics(again.output_dir)  # a QLoRA run is deterministic
    train_mod.train(cfg.replace(output_dir=str(tmp_path / "c"), max_steps=2))
    resumed = train_mod.train(cfg.replace(output_dir=str(tmp_path / "c"), resume=True))
    assert _metrics(resumed.output_dir) == _metrics(first.output_dir)  # resumed == uninterrupted
    end = [
        RunDir.load_checkpoint(Path(r.output_dir) / "checkpoints" / "step-000004")["model"]
        for r in (first, resumed)
    ]
    lora = [k for k in end[0] if "lora_" in k]
    assert lora and all(torch.equal(end[0][k], end[1][k]) for k in end[0])
    assert any(end[0][k].abs().sum() > 0 for k in lora if "lora_B" in k), "the adapter never moved"
    # The checkpoint holds the PEFT adapter in Hugging Face form; the 4-bit base is cfg.model, loaded 4-bit
    # again from what dmpo_fast.json records (the whole quantized base used to be copied into every checkpoint).
    ckpt = Path(first.output_dir) / "checkpoints" / "step-000004"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "dmpo_fast.json").read_text())["load_in_4bit"] is True
    assert not any("absmax" in k for k in end[0])
    from dmpo_fast.models import load

    assert any(k.endswith("q_proj.base_layer.weight.absmax") for k in load(ckpt).state_dict())  # a 4-bit base
    # Evaluating the checkpoint loads the base 4-bit again, as the run did.
    rows = train_mod.evaluate_model(
        TrainConfig(progress=False, impl="chunked"), checkpoint=first.output_dir, n=4
    )
    assert rows[0]["n"] == 4 and 0.0 <= rows[0]["accuracy"] <= 1.0


@needs_bnb
@needs_peft
def test_8bit_lora_run_trains(tmp_path, one_thread):
    result = train_mod.train(
        TrainConfig(output_dir=str(tmp_path / "r"), load_in_8bit=True, max_steps=2, **SMALL)
    )
    state = RunDir.load_checkpoint(Path(result.output_dir) / "checkpoints" / "step-000002")["model"]
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)
    # The checkpoint holds the adapter; loading it loads the base 8-bit again, as the run did.
    from dmpo_fast.models import load

    loaded = load(result.output_dir).state_dict()
    assert any(k.endswith("q_proj.base_layer.weight") and loaded[k].dtype == torch.int8 for k in loaded)


@needs_bnb
@needs_peft
def test_a_checkpoint_of_another_4bit_base_is_refused():
    cfg = TrainConfig(load_in_4bit=True, **{**SMALL, "output_dir": "unused"})
    policy, _ = train_mod.load_policy(cfg, torch.device("cpu"))
    state = policy.state_dict()
    policy.load_state_dict(state)  # its own state loads back (the quantization state is consumed)
    key = next(k for k in state if k.endswith("q_proj.base_layer.weight.absmax"))
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="differs from the loaded model's"):
        policy.load_state_dict(state)


# ---- the recipes ------------------------------------------------------------------------------------------
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipes_state_their_quantization(path):
    cfg = TrainConfig.from_yaml(path)
    text = path.read_text()
    if path.stem.startswith("llada8b"):  # the reference recipe: a 4-bit base, LoRA r=128
        assert cfg.load_in_4bit and cfg.lora and cfg.lora_r == 128 and not cfg.load_in_8bit
    else:  # said explicitly, with the reason in a comment
        assert "load_in_4bit: false" in text and "# bf16 base:" in text


@needs_bnb
@needs_peft
def test_the_llada_recipe_runs_its_qlora_path_on_the_tiny_model(tmp_path, one_thread):
    cfg = TrainConfig.from_yaml(next(p for p in CONFIGS if p.stem == "llada8b_sudoku")).replace(
        model="tiny", dtype="float32", device="cpu", task="sudoku", task_kwargs={}, prompts_per_step=2,
        num_generations=2, reward_preset="default", gen_length=24, block_length=8, steps=6, num_iterations=1, lora_r=4,
        gradient_accumulation_steps=2, max_steps=1, eval_size=2, progress=False, tensorboard=False,
        plot=False,
        output_dir=str(tmp_path / "run"), impl="chunked",
    )  # fmt: skip
    assert cfg.load_in_4bit and cfg.gradient_checkpointing and cfg.lora_dropout > 0
    result = train_mod.train(cfg)
    assert len(result.metrics) == 1 and result.metrics[0]["skipped"] is False


# ---- the memory table (dmpo_fast.models.memory, docs/memory.md) -------------------------------------------
from dmpo_fast.models import memory  # noqa: E402

SMALL_SHAPES = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=96)


def test_memory_doc_is_generated_from_the_module():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    assert memory.markdown() in doc, (
        "docs/memory.md is stale: regenerate it with python -m dmpo_fast.models.memory"
    )


def test_llada_8b_parameter_and_adapter_counts():
    config = memory.llada_8b()
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    counts = memory.parameter_counts(config)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["head"] == counts["embedding"] == 126464 * 4096
    # r·(in + out) over q, k, v, attn_out (4096 -> 4096) and ff_proj, up_proj (4096 -> 12288), 32 blocks
    assert memory.adapter_parameters(config, 128) == 32 * 128 * (4 * 8192 + 2 * 16384)
    full = memory.Step(mode="full")
    assert memory.weight_bytes(config, "full") == 2 * sum(counts.values())
    assert memory.trainable_bytes(config, full) == 6 * sum(counts.values())
    nf4 = memory.weight_bytes(config, "qlora")
    assert nf4 == pytest.approx(
        counts["blocks_linear"] * (0.5 + 1 / 64 + 1 / 4096)
        + 2 * (counts["embedding"] + counts["head"] + counts["other"])
    )


@needs_peft
def test_adapter_count_is_what_peft_trains():
    from dmpo_fast.models import build_tiny
    from dmpo_fast.models.peft_support import add_lora

    shapes = {**SMALL_SHAPES, "n_kv_heads": 2}  # grouped k/v: narrower k_proj and v_proj
    lm = add_lora(build_tiny(40, 39, 38, **shapes), r=8, alpha=16, dropout=0.0, target_modules=list(TARGETS))
    trained = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert trained == memory.adapter_parameters(tiny_config(40, **shapes), 8, TARGETS)


@needs_bnb
def test_nf4_weight_bytes_are_what_bitsandbytes_holds(tmp_path):
    import bitsandbytes as bnb

    from dmpo_fast.models import build_tiny, save_llada

    shapes = dict(d_model=128, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=384)
    save_llada(build_tiny(64, 63, 62, **shapes).model.to(torch.bfloat16), str(tmp_path))
    lm = load(str(tmp_path), dtype="bfloat16", load_in_4bit=True)
    held, layers = 0, 0
    for module in lm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            tensors = [module.weight.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            held += sum(t.numel() * t.element_size() for t in tensors)
            layers += 1
        else:
            held += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    expected = memory.weight_bytes(tiny_config(64, **shapes), "qlora")
    # The formula leaves out per-layer constants: the NF4 and the scale code books (16 + 256 float32), the
    # offset, and rounding the scales' blocks up to whole blocks of 256.
    assert expected <= held <= expected + layers * (4 * (16 + 256) + 4 + 4)


def _saved_bytes(lm, ids):
    """Bytes of the distinct storages autograd saves in ``lm.hidden(ids)``'s forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm.hidden(ids)
    return sum(seen.values())


@needs_peft
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_activation_bytes_are_what_autograd_saves(mode, tmp_path, one_thread):
    """The per-block derivation of the module docstring, against the tensors autograd really keeps (bf16,
    SDPA's flash path on CPU as on GPU; lora_dropout 0: CPU dropout keeps a float mask, CUDA a bool one)."""
    from dmpo_fast.models import build_tiny, save_llada
    from dmpo_fast.models.peft_support import add_lora

    if mode == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed")
    save_llada(build_tiny(64, 63, 62, **SMALL_SHAPES).model.to(torch.bfloat16), str(tmp_path))
    lm = load(str(tmp_path), dtype="bfloat16", load_in_4bit=mode == "qlora").train()
    if mode != "full":
        lm = add_lora(lm, r=8, alpha=16, dropout=0.0, target_modules=list(TARGETS))
    rows, length, gen = 3, 40, 24
    ids = torch.randint(0, 60, (rows, length), generator=torch.Generator().manual_seed(0))
    step = memory.Step(mode=mode, replicates=1, sequences=rows, prompt_length=length - gen, gen_length=gen,
                       lora_r=8, lora_dropout=0.0, gradient_checkpointing=False)  # fmt: skip
    assert _saved_bytes(lm, ids) == memory.activation_bytes(tiny_config(64, **SMALL_SHAPES), step)


@pytest.mark.gpu
@needs_peft
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_memory_estimate_matches_cuda_peak(mode, tmp_path):
    """A scaled-down LLaDA (d_model 1024, 4 blocks, MLP 3072, vocab 32000) on CUDA: weights as loaded, and the
    peak of one loss forward + backward above them, against the estimate. The estimate leaves out allocator
    rounding and kernel workspaces, hence the 15% band."""
    from dmpo_fast.models import build_tiny, save_llada
    from dmpo_fast.models.peft_support import add_lora

    if mode == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed")
    shapes = dict(
        d_model=1024, n_heads=16, n_kv_heads=16, n_layers=4, mlp_hidden_size=3072, max_sequence_length=1024
    )
    V = 32000
    save_llada(build_tiny(V, V - 1, V - 2, **shapes).model.to(torch.bfloat16), str(tmp_path))
    config = tiny_config(V, **shapes)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    lm = load(str(tmp_path), dtype="bfloat16", device="cuda", load_in_4bit=mode == "qlora").train()
    weights = torch.cuda.memory_allocated() - start
    assert weights == pytest.approx(memory.weight_bytes(config, mode), rel=0.02)
    lm = add_lora(lm, r=16, alpha=32, dropout=0.05, target_modules=list(TARGETS))
    step = memory.Step(mode=mode, replicates=4, sequences=2, prompt_length=128, gen_length=256, lora_r=16,
                       gradient_checkpointing=False)  # fmt: skip
    N, L = step.sequences, step.prompt_length + step.gen_length
    ids = torch.randint(0, V - 2, (N, L), device="cuda")
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, step.prompt_length :] = True
    weights_w = torch.tensor([0.6, -0.4], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = dmpo.wdce(lm, ids, maskable, weights_w, group_size=2, noise=dmpo.NoiseConfig(replicates=4), seed=0)
    out.loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    e = memory.estimate(config, step)
    adapter_grads = 4 * memory.adapter_parameters(config, step.lora_r)
    expected = e["activations"] + e["loss"] + e["workspace"] + adapter_grads
    assert 0.85 * expected <= peak <= 1.15 * expected, (peak / 2**20, expected / 2**20)
