"""Regenerate tests/fixtures/llada_tiny: a random-weight LLaDA checkpoint in the official layout + its logits.

    python scripts/make_llada_fixture.py [--out tests/fixtures/llada_tiny]

The directory holds what an official LLaDA checkpoint holds: ``config.json`` with the key set of
GSAI-ML/LLaDA-8B-Instruct's (tiny values; ``auto_map`` and trainer-only fields included, as a real download
has them) and ``model.safetensors`` with LLaDA's parameter names. ``expected.safetensors`` holds input ids and
the float64 logits of this implementation (float64 so that the float32 regression test measures only float32
rounding). When the fixture was made, the same weights run through LLaDA's own modeling_llada.py gave these
logits to within float32 rounding (bit-identical in float32 on CPU), so the regression test also pins
equivalence with LLaDA's code.

The shapes exercise grouped-query attention (4 query heads, 2 key/value heads), an embedding_size padded
beyond vocab_size, an untied output matrix and non-unit norm weights. About 80 kB in all.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

from dmpo_fast.models import LLaDAModelLM, load
from dmpo_fast.models.configuration_llada import LLaDAConfig

# Key set of LLaDA-8B-Instruct's config.json, with tiny shapes.
CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 32,
    "embedding_dropout": 0.0,
    "embedding_size": 64,
    "eos_token_id": 59,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 60,
    "max_sequence_length": 32,
    "mlp_hidden_size": 48,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_layers": 2,
    "pad_token_id": 59,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 10000.0,
    "scale_logits": False,
    "use_cache": False,
    "vocab_size": 61,
    "weight_tying": False,
}
SEED = 20250214


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "llada_tiny"))
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LLaDAModelLM(LLaDAConfig(**CONFIG)).float()
        with torch.no_grad():  # norms away from 1 so a dropped or misplaced norm weight changes the logits
            for name, p in model.named_parameters():
                if "norm" in name or "ln_f" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
        ids[:, 3] = CONFIG["mask_token_id"]
        ids[1, 7:] = CONFIG["mask_token_id"]

    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(out, "model.safetensors"),
        metadata={"format": "pt"},
    )

    lm = load(out, dtype=torch.float64)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits  # [2, 12, embedding_size], float64
    save_file({"input_ids": ids, "logits": logits.contiguous()}, os.path.join(out, "expected.safetensors"))
    print(f"wrote {out}: logits {list(logits.shape)}, max |logit| {logits.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
