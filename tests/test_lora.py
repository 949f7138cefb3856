"""LoRA (PEFT) and the fused path: ``head_weight`` carries an adapter on the output layer, or refuses.

The truth for "what the adapted head computes" is PEFT's own module forward (and, for an HF model, PEFT's own
logits); the fused loss's gradients must reach the adapter's A and B exactly as full-logits autograd does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_models import tiny_policy

from dmpo_fast import wdce_loss
from dmpo_fast.models import wrap

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

V, MASK, EOS = 55, 2, 1
HEAD = r"model\.transformer\.ff_out"  # the LLaDA output layer only (blocks.N.ff_out is the MLP)


def _tiny(weight_tying: bool = False):
    return tiny_policy(V, MASK, EOS, weight_tying=weight_tying)


def _adapt(lm, targets, **kwargs):
    # init_lora_weights=False draws a non-zero B, so the delta is visible from the first step.
    kwargs.setdefault("lora_dropout", 0.0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    lm.model = get_peft_model(lm.model, cfg)
    return lm


def _head(lm):
    return lm.base_model.get_output_embeddings()


def _expected(head):
    return head.base_layer.weight + head.scaling["default"] * (
        head.lora_B["default"].weight @ head.lora_A["default"].weight
    )


def test_head_weight_includes_the_lora_delta_and_matches_peft_forward():
    lm = _adapt(_tiny(), HEAD + r"|.*q_proj")
    head = _head(lm)
    delta = head.scaling["default"] * head.lora_B["default"].weight @ head.lora_A["default"].weight
    assert delta.abs().max() > 1e-3  # the test would pass vacuously with a zero delta
    torch.testing.assert_close(lm.head_weight, _expected(head))
    h = torch.randn(7, lm.hidden_size)
    torch.testing.assert_close(F.linear(h, lm.head_weight), head(h), rtol=1e-5, atol=1e-5)
    # The HF forward (PEFT's logits) and the fused path's hidden @ head_weight.T agree.
    ids = torch.randint(4, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, lm.logits(ids), rtol=1e-5, atol=1e-5)


def test_fused_loss_gradients_reach_the_head_adapter_like_full_logits():
    lm = _adapt(_tiny(), HEAD + r"|.*q_proj")
    ids = torch.randint(4, V, (3, 12))
    masked = torch.rand(3, 12) < 0.5
    masked[:, 0] = True
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    w = torch.tensor([0.7, -0.4, 1.3])
    params = [p for n, p in lm.named_parameters() if "lora_" in n]
    assert any("transformer.ff_out.lora_B" in n for n, _ in lm.named_parameters())

    fused = wdce_loss(lm.hidden(noisy) * lm.logit_scale, lm.head_weight, ids, masked, w, impl="chunked")
    g_fused = torch.autograd.grad(fused, params)

    logits = _head(lm)(lm.hidden(noisy)).float() * lm.logit_scale  # PEFT's own head forward, [B, L, V]
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(3, 12)
    ref = ((w[:, None] * ce * masked).sum(1) / masked.sum(1).clamp_min(1)).sum()
    g_ref = torch.autograd.grad(ref, params)

    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_ref, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_disabled_and_merged_adapters_are_not_counted_twice():
    lm = _adapt(_tiny(), HEAD)
    head = _head(lm)
    base = head.base_layer.weight.detach().clone()
    adapted = _expected(head).detach()
    with lm.model.disable_adapter():
        torch.testing.assert_close(lm.head_weight, base)
    lm.model.merge_adapter()
    torch.testing.assert_close(head.base_layer.weight, adapted)  # PEFT merged the delta into the base
    torch.testing.assert_close(lm.head_weight, adapted)  # ... and head_weight does not add it again
    lm.model.unmerge_adapter()
    torch.testing.assert_close(lm.head_weight, adapted)


def test_head_without_adapter_is_the_stored_parameter():
    lm = _adapt(_tiny(), r".*q_proj")
    W = _head(lm).weight
    assert lm.head_weight.data_ptr() == W.data_ptr() and torch.equal(lm.head_weight, W)


def test_head_dropout_while_training_raises_and_eval_merges():
    lm = _adapt(_tiny(), HEAD, lora_dropout=0.1)
    lm.train()
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        _ = lm.head_weight
    lm.eval()
    torch.testing.assert_close(lm.head_weight, _expected(_head(lm)))


def test_dora_on_the_head_raises():
    lm = _adapt(_tiny(), HEAD, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        _ = lm.head_weight


def test_tied_output_matrix_with_adapted_embedding_raises():
    lm = _adapt(_tiny(weight_tying=True), r"model\.transformer\.wte")
    with pytest.raises(ValueError, match="tied"):
        _ = lm.head_weight


def test_hf_model_with_lora_and_modules_to_save_heads_matches_peft_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    ids = torch.randint(4, V, (2, 9))
    lora_head = {"target_modules": ["lm_head", "q_proj"]}
    saved_head = {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    for extra in (lora_head, saved_head):
        lm = wrap(LlamaForCausalLM(cfg).eval(), mask_id=MASK, eos_id=EOS)
        lm.model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra))
        with torch.no_grad():
            if "modules_to_save" in extra:  # train the copy: head_weight must follow it, not the original
                _head(lm).modules_to_save["default"].weight.add_(0.5)
            torch.testing.assert_close(lm.logits(ids), lm.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_wrapping_a_model_that_already_has_a_head_adapter_verifies_against_peft_logits():
    """The once-only check that hidden @ head_weight.T reproduces the logits uses the adapted head: an HF
    model wrapped after LoRA was put on its lm_head (with a non-zero B) passes and matches PEFT's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    peft_model = get_peft_model(
        LlamaForCausalLM(cfg).eval(),
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["lm_head"]),
    )
    lm = wrap(peft_model, mask_id=MASK, eos_id=EOS)
    ids = torch.randint(4, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(ids), peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
