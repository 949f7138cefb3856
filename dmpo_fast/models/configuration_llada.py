"""Configuration of the LLaDA architecture, with the field names LLaDA's own ``config.json`` uses.

An official checkpoint directory (``GSAI-ML/LLaDA-8B-Instruct`` and friends) carries a ``config.json`` written
by LLaDA's trainer: ``d_model``, ``n_heads``, ``n_kv_heads``, ``n_layers``, ``mlp_hidden_size``,
``rope_theta``, ... . :class:`LLaDAConfig` reads those fields as they are, so the checkpoint loads without
``trust_remote_code``; fields this implementation does not use (``init_device``, ``precision``,
``flash_attention``, ``auto_map``, ...) are kept as plain attributes and written back on save.

Only the variant LLaDA actually ships is implemented: the Llama-style block (``block_type="llama"``), RMS
norms, RoPE, no ALiBi, no QK-norm, one block per group. Any other value of those switches raises
``ValueError`` naming the field, rather than running a different network than the checkpoint was trained as.

The defaults are LLaDA-8B's architecture choices (LLaDA's trainer defaults are GPT-2-like and describe a model
this code does not implement); every official ``config.json`` sets all of them explicitly anyway.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

BLOCK_TYPES = ("llama",)
LAYER_NORM_TYPES = ("rms", "gemma_rms")
ACTIVATION_TYPES = ("silu", "gelu", "relu")


class LLaDAConfig(PretrainedConfig):
    """LLaDA architecture hyper-parameters (``model_type = "llada"``).

    Shapes: hidden size ``d_model``; ``n_heads`` query heads of size ``d_model // n_heads``; ``n_kv_heads``
    key/value heads (grouped-query attention when fewer than ``n_heads``); MLP width ``mlp_hidden_size`` (or
    ``mlp_ratio * d_model``); ``embedding_size`` rows in the embedding and output matrices (at least
    ``vocab_size``; the extra rows are padding that no token id reaches).

    Numerics: ``scale_logits`` multiplies the logits by ``1 / sqrt(d_model)``; ``input_emb_norm`` multiplies
    the embeddings by ``d_model ** 0.5``; ``rope_full_precision`` applies the rotary embedding in float32
    whatever the model dtype. ``init_fn`` only matters for a randomly initialised model: "mitchell" as LLaDA
    defines it, any other value is LLaDA's "normal" (``init_std``, optional ``init_cutoff_factor``).
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = 12288,
        activation_type: str = "silu",
        block_type: str = "llama",
        block_group_size: int = 1,
        alibi: bool = False,
        rope: bool = True,
        rope_theta: float = 500000.0,
        rope_full_precision: bool = True,
        multi_query_attention: bool | None = None,
        attention_layer_norm: bool = False,
        layer_norm_type: str = "rms",
        layer_norm_with_affine: bool = True,
        bias_for_layer_norm: bool | None = False,
        rms_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        input_emb_norm: bool = False,
        max_sequence_length: int = 4096,
        include_bias: bool = False,
        include_qkv_bias: bool | None = False,
        scale_logits: bool = False,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        weight_tying: bool = False,
        eos_token_id: int | None = 126081,
        pad_token_id: int | None = 126081,
        mask_token_id: int | None = 126336,
        init_fn: str = "mitchell",
        init_std: float = 0.02,
        init_cutoff_factor: float | None = None,
        use_cache: bool = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = str(activation_type)
        self.block_type = str(block_type)
        self.block_group_size = block_group_size
        self.alibi = alibi
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_full_precision = rope_full_precision
        self.multi_query_attention = multi_query_attention
        self.attention_layer_norm = attention_layer_norm
        self.layer_norm_type = str(layer_norm_type)
        self.layer_norm_with_affine = layer_norm_with_affine
        self.bias_for_layer_norm = bias_for_layer_norm
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        self.input_emb_norm = input_emb_norm
        self.max_sequence_length = max_sequence_length
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.scale_logits = scale_logits
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.init_fn = str(init_fn)
        self.init_std = init_std
        self.init_cutoff_factor = init_cutoff_factor
        self.use_cache = use_cache
        # HF's generic tying logic keys off tie_word_embeddings; LLaDA's switch is weight_tying. Keep them
        # equal so no transformers version ties (or unties) the output matrix behind the checkpoint's back.
        kwargs.pop("tie_word_embeddings", None)
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=weight_tying,
            **kwargs,
        )
        self.validate_llada()

    # Names the rest of the HF ecosystem (PEFT, accelerate, vLLM-style tooling) looks for.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads, from LLaDA's two ways of saying it (``n_kv_heads``, ``multi_query_attention``)."""
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        return self.n_kv_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        """Rows of the embedding / output matrices (``embedding_size``, falling back to ``vocab_size``)."""
        return self.embedding_size or self.vocab_size

    @property
    def logit_scale(self) -> float:
        """Factor the logits are multiplied by: ``1 / sqrt(d_model)`` with ``scale_logits``, else 1.

        Computed as LLaDA computes it (``1 / math.sqrt``), so ``(hidden @ W.T) * logit_scale`` is
        bit-identical.
        """
        return 1 / math.sqrt(self.d_model) if self.scale_logits else 1.0

    def validate_llada(self) -> None:
        """Raise ``ValueError`` naming the field for shapes or variants this implementation does not run."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("d_model", "n_heads", "n_layers", "vocab_size", "max_sequence_length"):
            positive(name)
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(f"d_model // n_heads must be even for RoPE, got {self.d_model // self.n_heads}")
        if self.n_kv_heads is not None:
            positive("n_kv_heads")
            if self.multi_query_attention is not None and self.n_kv_heads != (
                1 if self.multi_query_attention else self.n_heads
            ):
                raise ValueError(
                    f"n_kv_heads ({self.n_kv_heads}) contradicts "
                    f"multi_query_attention ({self.multi_query_attention})"
                )
        if self.n_heads % self.effective_n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.effective_n_kv_heads})"
            )
        if self.mlp_hidden_size is not None:
            positive("mlp_hidden_size")
        else:
            positive("mlp_ratio")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ValueError(
                f"embedding_size ({self.embedding_size}) must be at least vocab_size ({self.vocab_size})"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id must be in [0, vocab_size={self.vocab_size}), got {self.mask_token_id}"
            )
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {self.block_type!r}")
        if self.layer_norm_type not in LAYER_NORM_TYPES:
            raise ValueError(
                f"layer_norm_type must be one of {LAYER_NORM_TYPES}, got {self.layer_norm_type!r}"
            )
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(
                f"activation_type must be one of {ACTIVATION_TYPES}, got {self.activation_type!r}"
            )
        if self.block_group_size != 1:
            raise ValueError(f"block_group_size must be 1, got {self.block_group_size!r}")
        if self.alibi:
            raise ValueError("alibi must be False (LLaDA uses RoPE; ALiBi is not implemented)")
        if not self.rope:
            raise ValueError("rope must be True (LLaDA uses RoPE; learned positions are not implemented)")
        if self.attention_layer_norm:
            raise ValueError("attention_layer_norm must be False (QK-norm is not implemented)")
        for name in ("attention_dropout", "residual_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
