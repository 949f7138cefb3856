"""Tests of dmpo_fast.models: the LLaDA implementation, the DiffusionLM interface, caches and adapters."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from dmpo_fast import models
from dmpo_fast.models import (
    DreamAdapter,
    HFAdapter,
    KVCache,
    LLaDAConfig,
    LLaDAModelLM,
    build_tiny,
    load,
    tiny_config,
    wrap,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "llada_tiny")
V, MASK, EOS = 37, 36, 35
SMALL = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, max_sequence_length=64)


def small_lm(seed: int = 0, **overrides) -> models.LLaDADiffusionLM:
    lm = build_tiny(V, MASK, EOS, seed=seed, **{**SMALL, **overrides})
    return lm.eval()


def rand_ids(B: int, L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g)


# ---- checkpoint regression ---------------------------------------------------------------------------------
def test_fixture_checkpoint_logits_match_committed_values():
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    ids, want = expected["input_ids"], expected["logits"]  # want: float64 [2, 12, embedding_size]
    lm = load(FIXTURE, dtype=torch.float32)
    assert isinstance(lm, models.LLaDADiffusionLM) and not lm.training
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits
        mine = lm.logits(ids)
    assert full.dtype == torch.float32 and full.shape == want.shape
    # float32 rounding only: the expected values are this network in float64 (= LLaDA's own code, see the
    # script).
    torch.testing.assert_close(full.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(mine.double(), want[..., : lm.vocab_size], rtol=0, atol=2e-5)
    assert (lm.mask_id, lm.eos_id, lm.vocab_size, lm.hidden_size) == (60, 59, 61, 32)


def test_fixture_uses_official_parameter_names_and_loads_through_hf():
    keys = set(load_file(os.path.join(FIXTURE, "model.safetensors")))
    for name in ("wte", "ln_f", "ff_out"):
        assert f"model.transformer.{name}.weight" in keys
    for name in (
        "attn_norm",
        "q_proj",
        "k_proj",
        "v_proj",
        "attn_out",
        "ff_norm",
        "ff_proj",
        "up_proj",
        "ff_out",
    ):
        assert f"model.transformer.blocks.1.{name}.weight" in keys
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    hf = LLaDAModelLM.from_pretrained(FIXTURE).float().eval()
    with torch.no_grad():
        got = hf(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(got.double(), expected["logits"], rtol=0, atol=2e-5)


# ---- padding -----------------------------------------------------------------------------------------------
def test_left_padded_row_matches_unpadded_row():
    lm = small_lm()
    L, pad = 10, 4
    row = rand_ids(1, L)
    other = rand_ids(1, L + pad, seed=2)
    ids = torch.cat((torch.cat((torch.full((1, pad), EOS), row), dim=1), other))  # row 0 left-padded
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = lm.hidden(row)
        batch = lm.hidden(ids, mask)
        other_alone = lm.hidden(other)
    # RoPE depends on position differences only; the shift by `pad` changes float32 rounding of cos/sin.
    torch.testing.assert_close(batch[0, pad:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1], other_alone[0], rtol=0, atol=1e-6)


def test_padded_keys_are_never_attended():
    lm = small_lm()
    ids = rand_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0  # right padding too
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 5) % V
    with torch.no_grad():
        a, b = lm.hidden(ids, mask), lm.hidden(other, mask)
    real = mask.bool()
    assert torch.equal(a[real], b[real])  # changing pad tokens changes nothing at real positions
    assert not torch.equal(a[~real], b[~real])
    all_pad = torch.zeros_like(mask)
    with torch.no_grad():
        assert torch.isfinite(lm.hidden(ids, all_pad)).all()


# ---- caches ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_prefix_and_dual_cache_match_full_forward(padded):
    lm = small_lm()
    B, L, start, end = 2, 24, 8, 16
    ids = rand_ids(B, L)
    ids[:, start:] = MASK
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0  # left-padded prompt of row 1
    with torch.no_grad():
        full = lm.hidden(ids, mask)
        pre_hidden, cache = lm.prefill(ids, mask)
        torch.testing.assert_close(pre_hidden, full, rtol=0, atol=0)
        assert cache.spans == ((0, L),) and cache.length == L

        prefix = cache.truncate(start)
        assert prefix.spans == ((0, start),) and prefix.next_position == start
        h_prefix = lm.hidden(ids[:, start:], cache=prefix)  # positions default to start..L-1
        torch.testing.assert_close(h_prefix, full[:, start:], rtol=0, atol=1e-5)

        dual = cache.exclude(start, end)
        assert dual.spans == ((0, start), (end, L)) and dual.length == L - (end - start)
        h_dual = lm.hidden(ids[:, start:end], cache=dual, positions=start)
        torch.testing.assert_close(h_dual, full[:, start:end], rtol=0, atol=1e-5)
        # positions as a tensor, per row
        pos = torch.arange(start, end).expand(B, -1)
        torch.testing.assert_close(lm.hidden(ids[:, start:end], cache=dual, positions=pos), h_dual)
        # the cache is frozen: committing a token in the block changes the block's states, not the cached keys
        changed = ids[:, start:end].clone()
        changed[:, 0] = 3
        assert not torch.allclose(lm.hidden(changed, cache=dual, positions=start), h_dual)


def test_cache_misuse_raises():
    lm = small_lm()
    ids = rand_ids(2, 16)
    with torch.no_grad():
        _, cache = lm.prefill(ids)
    dual = cache.exclude(4, 8)
    with pytest.raises(ValueError, match="positions"):
        lm.hidden(ids[:, 4:8], cache=dual)  # not a prefix: positions required
    with pytest.raises(ValueError, match="positions"):
        lm.hidden(ids[:, 4:8], cache=dual, positions=2)  # overlaps cached positions 2, 3
    with pytest.raises(ValueError, match="cache"):
        lm.hidden(ids[:1, 4:8], cache=dual, positions=4)  # batch mismatch
    with pytest.raises(ValueError, match="max_sequence_length"):
        lm.hidden(torch.zeros(2, 60, dtype=torch.long), cache=cache)  # 16 + 60 > 64
    with pytest.raises(ValueError, match="cache"):
        lm.hidden(ids, cache=(cache.keys, cache.values))


def test_kvcache_span_bookkeeping():
    k = torch.arange(10.0).view(1, 1, 10, 1)
    cache = KVCache(keys=(k,), values=(k,), key_mask=None, spans=((0, 10),))
    d = cache.exclude(3, 6)
    assert d.spans == ((0, 3), (6, 10)) and d.keys[0].flatten().tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert d.truncate(8).keys[0].flatten().tolist() == [0, 1, 2, 6, 7]
    assert d.exclude(0, 2).spans == ((2, 3), (6, 10))
    assert cache.truncate(0).length == 0 and cache.truncate(0).next_position == 0
    with pytest.raises(ValueError, match="start"):
        cache.exclude(5, 2)


# ---- training features -------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("via", ["hf", "lm"])
def test_gradient_checkpointing_gives_same_gradients(via):
    ids = rand_ids(2, 12)
    weights = torch.randn(2, 12, V, generator=torch.Generator().manual_seed(3))

    def grads(checkpointing: bool):
        lm = small_lm().train()
        calls = []
        for block in lm.model.model.transformer.blocks:
            # a pre-hook: the recompute may stop early (after the last saved tensor), before a post-hook would
            # run
            block.register_forward_pre_hook(lambda *a: calls.append(1))
        if checkpointing:  # HF's own switch on the PreTrainedModel, or the DiffusionLM pass-through
            (lm.model if via == "hf" else lm).gradient_checkpointing_enable()
        (lm.logits(ids) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert ckpt_calls == 2 * plain_calls == 4  # each block ran again in backward: checkpointing is really on
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"scale_logits": True}, {"weight_tying": True, "embedding_size": 40}, {"include_bias": True}],
    ids=["plain", "scale_logits", "tied+padded-vocab", "output-bias"],
)
def test_hidden_times_head_is_logits(overrides):
    lm = small_lm(**overrides)
    if overrides.get("include_bias"):
        with torch.no_grad():
            lm.model.model.transformer.ff_out.bias.normal_()
    ids = rand_ids(2, 9)
    with torch.no_grad():
        h, W = lm.hidden(ids), lm.head_weight
        full = lm.model(input_ids=ids).logits  # what the HF module (= LLaDA's code) returns
    assert W.shape == (V, lm.hidden_size) and h.shape == (2, 9, lm.hidden_size)
    scale = lm.logit_scale
    assert scale == (1 / 32**0.5 if overrides.get("scale_logits") else 1.0)
    torch.testing.assert_close(F.linear(h, W) * scale, lm.logits(ids), rtol=0, atol=0)
    torch.testing.assert_close(lm.logits(ids), full[..., :V], rtol=1e-6, atol=1e-6)


def test_head_weight_is_differentiable_view_of_parameters():
    lm = small_lm(weight_tying=True)
    W = lm.head_weight
    assert W.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    W.sum().backward()
    assert lm.model.get_input_embeddings().weight.grad is not None


def test_bf16_forward_close_to_fp32():
    lm = small_lm()
    ids = rand_ids(2, 16)
    with torch.no_grad():
        ref64 = lm.double().logits(ids)
        l32 = lm.float().logits(ids)
        l16 = lm.to(torch.bfloat16).logits(ids)
    assert l16.dtype == torch.bfloat16 and torch.isfinite(l16).all()
    err16 = (l16.double() - ref64).abs().max().item()
    err32 = (l32.double() - ref64).abs().max().item()
    assert err32 < 1e-5
    assert err16 < 0.05 * ref64.abs().max().item()  # bf16 keeps ~3 significant digits through 2 layers


# ---- save / load / build -----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    lm = small_lm(seed=5)
    lm.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["d_model"] == 32 and "auto_map" not in config
    back = load(str(tmp_path))
    ids = rand_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(back.hidden(ids), lm.hidden(ids), rtol=0, atol=0)
    assert (back.mask_id, back.eos_id, back.vocab_size) == (MASK, EOS, V)
    bf16 = load(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_build_tiny_is_seeded_and_sized():
    a, b, c = (
        build_tiny(V, MASK, EOS, seed=1),
        build_tiny(V, MASK, EOS, seed=1),
        build_tiny(V, MASK, EOS, seed=2),
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.model.transformer.wte.weight"], sc["model.model.transformer.wte.weight"])
    cfg = a.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden_size) == (128, 4, 4, 344)
    assert a.training and a.mask_id == MASK and a.eos_id == EOS
    assert tiny_config(100).mask_token_id == 99 and tiny_config(100, n_layers=2).n_layers == 2


# ---- adapters ----------------------------------------------------------------------------------------------
def test_generic_adapter_on_tiny_bert_masked_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    bert = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        bert.get_output_embeddings().bias.normal_()  # a trained decoder bias is not zero
    lm = wrap(bert, mask_id=MASK)
    assert isinstance(lm, HFAdapter) and lm.path == "hook"  # BERT's head transforms the encoder output
    assert lm.hidden_size == 33 and lm.vocab_size == V  # bias column
    ids = rand_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).logits
        h = lm.hidden(ids, mask)
        torch.testing.assert_close(F.linear(h, lm.head_weight), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm.logits(ids, mask), want, rtol=1e-5, atol=1e-5)
    # and through load() from a local directory (no download)
    bert.save_pretrained(str(tmp_path))
    loaded = load(str(tmp_path), mask_id=MASK)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ids, mask), want, rtol=1e-5, atol=1e-5)


def test_generic_adapter_on_tiny_llama_uses_decoder_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    llama = LlamaForCausalLM(cfg).eval()
    lm = wrap(llama, mask_id=MASK, eos_id=EOS)
    assert lm.path == "decoder" and lm.hidden_size == 32
    ids = rand_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(ids), llama(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


class _Head(nn.Module):
    """Stand-in HF model: an embedding-and-mix body, a linear head, and a configurable read-out."""

    def __init__(self, readout=lambda x: x, model_type="toy", shift=False, one_hot=True):
        super().__init__()
        self.config = types.SimpleNamespace(model_type=model_type, mask_token_id=MASK, eos_token_id=EOS)
        self.emb = nn.Embedding(V, V)
        self.lm_head = nn.Linear(V, V, bias=False)
        if one_hot:  # one-hot states: logits peak at the token they encode
            with torch.no_grad():
                self.emb.weight.copy_(torch.eye(V) * 4)
                self.lm_head.weight.copy_(torch.eye(V))
        self.readout, self.shift = readout, shift
        self.seen = {}

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.seen = {"attention_mask": attention_mask, "position_ids": position_ids}
        src = torch.cat((input_ids[:, 1:], input_ids[:, -1:]), dim=1) if self.shift else input_ids
        # Shifted: the state at position i encodes token i + 1, as an AR-adapted model predicts.
        h = self.emb(src)
        return types.SimpleNamespace(logits=self.readout(self.lm_head(h)))


def test_dream_adapter_shifts_predictions_to_their_own_position():
    toy = _Head(model_type="Dream", shift=True)
    lm = wrap(toy)
    assert isinstance(lm, DreamAdapter)
    ids = rand_ids(2, 12)
    with torch.no_grad():
        raw = toy(ids).logits.argmax(-1)
        pred = lm.logits(ids).argmax(-1)
    assert torch.equal(raw[:, :-1], ids[:, 1:])  # the stand-in predicts the next token, like Dream
    assert torch.equal(pred[:, 1:], ids[:, 1:])  # after the adapter, position i predicts token i
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        lm.hidden(ids, mask)
    assert toy.seen["attention_mask"].shape == (2, 1, 12, 12)
    assert toy.seen["position_ids"][0].tolist() == [0, 0, 0] + list(range(9))


def test_generic_adapter_rejects_nonlinear_readout_and_fits_a_scale():
    with pytest.raises(ValueError, match="not .*hidden @ output_embeddings"):
        wrap(_Head(readout=lambda x: 3.0 * torch.tanh(x / 3.0), one_hot=False))  # soft-capping
    scaled = wrap(_Head(readout=lambda x: 0.25 * x, one_hot=False))
    assert scaled.logit_scale == pytest.approx(0.25)
    ids = rand_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(scaled.logits(ids), 0.25 * scaled.model.lm_head(scaled.model.emb(ids)))


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error_naming_the_argument(tmp_path):
    lm = small_lm()
    with pytest.raises(ValueError, match="ids length 65 exceeds max_sequence_length=64"):
        lm.hidden(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_sequence_length"):
        lm.model(input_ids=torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="ids must have 2 dimensions"):
        lm.hidden(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="ids must have an integer dtype"):
        lm.hidden(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        lm.hidden(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 7))
    with pytest.raises(ValueError, match="name_or_path 'no-such-model'"):
        load("no-such-model")
    with pytest.raises(ValueError, match="name_or_path"):
        load(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ValueError, match="name_or_path .* no config.json"):
        load(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load(FIXTURE, dtype="float8")
    with pytest.raises(ValueError, match="block_type"):
        LLaDAConfig(**{**SMALL, "block_type": "sequential"})
    with pytest.raises(ValueError, match="n_heads"):
        LLaDAConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="mask_id"):
        build_tiny(V, V + 3, EOS)
    dream_dir = tmp_path / "dream"
    dream_dir.mkdir()
    (dream_dir / "config.json").write_text(json.dumps({"model_type": "Dream"}))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load(str(dream_dir))


def test_builtin_model_names_load_everywhere_with_their_tokenizer():
    """"tiny" and "tiny_countdown" are model names wherever a model is accepted, tokenizer included."""
    from dmpo_fast.models import load, load_tokenizer
    from dmpo_fast.tokenizer import CharTokenizer

    lm = load("tiny")
    tok = load_tokenizer("tiny")
    assert isinstance(tok, CharTokenizer) and lm.mask_id == tok.mask_id
    ids, am = tok.batch_encode(["1 2"], pad_left=True)
    assert lm.hidden(ids, am).shape[-1] == lm.head_weight.shape[1]
    hf = load_tokenizer("tiny_countdown", hf=True)
    assert hf("12")["input_ids"] == tok.encode("12") and hf.padding_side == "left"
    with pytest.raises(ValueError, match="neither an existing checkpoint directory nor a hub id"):
        load("tiny_nonexistent")
