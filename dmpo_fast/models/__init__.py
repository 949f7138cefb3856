"""Models: one ``DiffusionLM`` interface over the built-in LLaDA implementation, Dream and other HF models.

    lm = dmpo_fast.models.load("GSAI-ML/LLaDA-8B-Instruct", dtype="bfloat16", device="cuda")  # or a local dir
    h = lm.hidden(ids, attention_mask)     # [B, L, H] after the final norm; position i predicts token i
    W = lm.head_weight                     # [V, H];  lm.logits(ids) == (h @ W.T) * lm.logit_scale
    hidden, cache = lm.prefill(ids, attention_mask)                   # KV cache (LLaDA): see models.cache
    lm.hidden(ids[:, s:e], cache=cache.exclude(s, e), positions=s)    # dual cache: block s..e-1 only

``build_tiny(vocab_size, mask_id, eos_id, seed)`` makes the small LLaDA the default run and the tests use.
"""

from .base import DiffusionLM
from .cache import KVCache
from .configuration_llada import LLaDAConfig
from .hf_adapter import DreamAdapter, HFAdapter
from .llada import LLaDAModel, LLaDAModelLM
from .llada_lm import LLaDADiffusionLM
from .loading import build_tiny, load, load_llada, load_tokenizer, save_llada, tiny_config, wrap


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel`` resolve ``model_type "llada"`` to this implementation (opt-in)."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM  # noqa: PLC0415

    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)


__all__ = [
    "DiffusionLM",
    "DreamAdapter",
    "HFAdapter",
    "KVCache",
    "LLaDAConfig",
    "LLaDADiffusionLM",
    "LLaDAModel",
    "LLaDAModelLM",
    "build_tiny",
    "load",
    "load_tokenizer",
    "load_llada",
    "register_auto_classes",
    "save_llada",
    "tiny_config",
    "wrap",
]
