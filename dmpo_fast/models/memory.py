"""GPU memory of one DMPO training step on a LLaDA-shaped model, computed from its shapes.

``docs/memory.md`` is this module's output (``python -m dmpo_fast.models.memory``; a test checks it is
current).
Every term is bytes, derived from what the code keeps, not fitted:

weights      bf16: 2 bytes per parameter. NF4 with double quantization (``load_in_4bit``): 4 bits per weight
             of the blocks' linear layers, one uint8 scale per 64 weights, one float32 scale per 256 of those
             (0.5 + 1/64 + 1/4096 bytes per weight); the embedding, the norms and the output head stay bf16.
             LLM.int8 (``load_in_8bit``): 1 byte per weight and a float32 scale per output row.
trainable    full: bf16 gradients (2 bytes) and AdamW's two moments in the parameter dtype (4 bytes).
             LoRA / QLoRA: r·(in + out) parameters per adapted layer, float32 (PEFT's adapter dtype), their
             gradients and AdamW moments: 16 bytes per adapter parameter.
activations  what autograd saves in the forward of the loss, per token per block (h = d_model, F = MLP
             hidden, n_h heads, r = LoRA rank), for a bf16 model whose attention is SDPA's flash kernel:
             full:   norms 2·(4h + 4 + 2h) (float32 statistic input, rsqrt, normalised input), the inputs
                     of q/k/v and of the MLP 2·2h (attn_out's input is the attention output, whose memory
                     SDPA keeps already), q/k/v/output of attention 4·2h and its log-sum-exp 4·n_h, MLP
                     4·2F -> 24h + 8F + 4n_h + 8;
             LoRA:   the frozen base saves no matmul inputs; norms 2·(4h + 4), attention 8h + 4n_h, MLP 3·2F,
                     and per adapted layer its input cast to float32 (4·in) and A's output (4r), plus a bool
                     dropout mask (1·in) when lora_dropout > 0 -> with the recipe's six layers
                     40h + 6F + 24r + 4n_h + 8 (+ 6h with dropout); the first block's norm saves nothing
                     (its input, the frozen embedding, needs no gradient);
             QLoRA:  as LoRA (bitsandbytes' 4-bit matmul saves no input for a frozen weight); its one
                     dequantized weight at a time (F·h bf16) is the ``workspace`` term;
             once:   the final norm's input (4h + 4 per token; + 2h and the ids' 8 bytes when training in
                     full), the rotary tables.
             With gradient checkpointing each block keeps its input (2h per token) and one block's
             activations live again during its recompute.
loss         the fused loss (``wdce_loss``, Triton) gathers the masked positions (2h each), keeps dL/dh in
             float32 (4h) and a float32 cross-entropy per position; the masked positions are
             rows · gen_length · E[rate] with rate ~ U[0.1, 1) (0.55). A trainable head would add a float32
             dL/dW (4·V·h); none of the recipes trains it. For comparison, DMPO's research code builds the
             logits of every position: bf16 logits, their float32 copy and the saved log-softmax,
             10 bytes · rows · L · V.

Not counted: the CUDA context (~0.5 GB), allocator fragmentation, cuBLAS/flash workspaces, the rollout KV
cache (freed before the loss) and the reference model (the adapter-off policy: no second copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .configuration_llada import LLaDAConfig

Mode = Literal["full", "lora", "qlora", "qlora8"]
GIB = 1024**3
RECIPE_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed codes, uint8 block scales, float32 scales of the scales


@dataclass(frozen=True)
class Step:
    """One training step: ``sequences`` rollouts per micro-batch, each seen through ``replicates`` masks."""

    mode: Mode = "qlora"
    replicates: int = 4
    sequences: int = 1
    prompt_length: int = 128
    gen_length: int = 256
    gradient_checkpointing: bool = True
    lora_r: int = 128
    lora_dropout: float = 0.05
    lora_targets: tuple = field(default=RECIPE_TARGETS)
    mask_rate: float = 0.55  # E[U(0.1, 1.0)]

    def __post_init__(self):
        if self.mode not in ("full", "lora", "qlora", "qlora8"):
            raise ValueError(f"mode must be one of 'full', 'lora', 'qlora', 'qlora8', got {self.mode!r}")
        for name in ("replicates", "sequences", "prompt_length", "gen_length", "lora_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")

    @property
    def rows(self) -> int:
        return self.sequences * self.replicates

    @property
    def tokens(self) -> int:
        return self.rows * (self.prompt_length + self.gen_length)


def linear_shapes(config: LLaDAConfig) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of one block's linear layers."""
    h, F = config.d_model, config.effective_mlp_hidden_size
    q, kv = config.n_heads * config.head_dim, config.effective_n_kv_heads * config.head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "attn_out": (h, h),
        "ff_proj": (h, F), "up_proj": (h, F), "ff_out": (F, h),
    }  # fmt: skip


def parameter_counts(config: LLaDAConfig) -> dict[str, int]:
    """Parameters by kind: ``blocks_linear`` (what gets quantized), ``embedding``, ``head``, ``other`` (norms,
    biases)."""
    h, n = config.d_model, config.n_layers
    linear = sum(i * o for i, o in linear_shapes(config).values())
    bias = sum(o for _, o in linear_shapes(config).values()) if config.include_bias else 0
    norms = (2 * n + 1) * h if config.layer_norm_with_affine else 0
    return {
        "blocks_linear": n * linear,
        "embedding": config.output_size * h,
        "head": 0 if config.weight_tying else config.output_size * h,
        "other": n * bias + norms,
    }


def adapter_parameters(config: LLaDAConfig, r: int, targets=RECIPE_TARGETS) -> int:
    """LoRA parameters: r·(in + out) per adapted block layer (the output head is not adapted)."""
    shapes = linear_shapes(config)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"targets {unknown} are not block layers; allowed: {sorted(shapes)}")
    return config.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def weight_bytes(config: LLaDAConfig, mode: Mode) -> float:
    counts = parameter_counts(config)
    rest = 2 * (counts["embedding"] + counts["head"] + counts["other"])
    if mode == "qlora":
        return NF4_BYTES * counts["blocks_linear"] + rest
    if mode == "qlora8":
        rows = config.n_layers * sum(o for _, o in linear_shapes(config).values())
        return counts["blocks_linear"] + 4 * rows + rest
    return 2 * counts["blocks_linear"] + rest


def trainable_bytes(config: LLaDAConfig, step: Step) -> float:
    """Gradients and optimizer state (and, for adapters, the adapter itself)."""
    if step.mode == "full":
        return (2 + 4) * sum(parameter_counts(config).values())
    return 16 * adapter_parameters(config, step.lora_r, step.lora_targets)


def block_activation_bytes(config: LLaDAConfig, step: Step, first: bool = False) -> float:
    """Bytes autograd saves in one block's forward, per token (see the module docstring)."""
    h, F, nh, r = config.d_model, config.effective_mlp_hidden_size, config.n_heads, step.lora_r
    attention = 4 * 2 * config.n_heads * config.head_dim + 4 * nh
    if step.mode == "full":
        return 2 * (4 * h + 4 + 2 * h) + 2 * 2 * h + attention + 4 * 2 * F
    shapes = linear_shapes(config)
    adapters = sum(
        4 * shapes[t][0] + 4 * r + (shapes[t][0] if step.lora_dropout > 0 else 0) for t in step.lora_targets
    )
    norms = (1 if first else 2) * (4 * h + 4)
    return norms + attention + 3 * 2 * F + adapters


def activation_bytes(config: LLaDAConfig, step: Step, gradient_checkpointing: bool | None = None) -> float:
    """Saved activations of the training forward over ``step.rows`` rows (peak, with or
    without checkpointing)."""
    gc = step.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    T, L, n, h = step.tokens, step.prompt_length + step.gen_length, config.n_layers, config.d_model
    once = T * (4 * h + 4) + 2 * L * config.head_dim * 4 + ((2 * h + 8) * T if step.mode == "full" else 0)
    if gc:
        return once + n * T * 2 * h + T * block_activation_bytes(config, step)
    blocks = (n - 1) * block_activation_bytes(config, step) + block_activation_bytes(config, step, first=True)
    return once + T * blocks


def loss_bytes(config: LLaDAConfig, step: Step, fused: bool = True) -> float:
    """Extra memory of the loss over the hidden states: the fused path, or the research code's full logits."""
    h, V = config.d_model, config.vocab_size
    if not fused:
        return 10 * step.rows * (step.prompt_length + step.gen_length) * V
    masked = step.rows * step.gen_length * step.mask_rate
    head_grad = 4 * V * h if step.mode == "full" else 0
    return masked * (2 * h + 4 * h + 4) + head_grad


def estimate(config: LLaDAConfig, step: Step) -> dict[str, float]:
    """Every term in bytes, and ``total`` (with ``step.gradient_checkpointing`` and the fused loss)."""
    out = {
        "weights": weight_bytes(config, step.mode),
        "trainable": trainable_bytes(config, step),
        "activations": activation_bytes(config, step, gradient_checkpointing=False),
        "activations_gc": activation_bytes(config, step, gradient_checkpointing=True),
        "loss": loss_bytes(config, step),
        "loss_unfused": loss_bytes(config, step, fused=False),
        # bitsandbytes dequantizes one weight at a time for its matmul (forward and backward)
        "workspace": 2 * config.effective_mlp_hidden_size * config.d_model
        if step.mode in ("qlora", "qlora8")
        else 0,
    }
    act = out["activations_gc"] if step.gradient_checkpointing else out["activations"]
    out["total"] = out["weights"] + out["trainable"] + act + out["loss"] + out["workspace"]
    return out


def llada_8b() -> LLaDAConfig:
    """LLaDA-8B-Instruct's shapes (its config.json): d_model 4096, 32 layers x 32 heads, MLP 12288,
    vocabulary 126464."""
    return LLaDAConfig(
        d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
        embedding_size=126464, weight_tying=False, max_sequence_length=4096, mask_token_id=126336,
    )  # fmt: skip


_LABELS = {"full": "bf16, full", "lora": "bf16 + LoRA r=128", "qlora": "NF4 + LoRA r=128 (QLoRA)"}


def markdown(config: LLaDAConfig | None = None, prompt_length: int = 128) -> str:
    """docs/memory.md's table: GiB per term, for each mode x replicates (1, 4) x gen length (256, 512)."""
    config = config or llada_8b()
    lines = [
        "| model | replicates | gen length | weights | adapter + grads + AdamW | activations | activations, "
        "checkpointed | fused loss | unfused loss | total (checkpointed, fused) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("full", "lora", "qlora"):
        for replicates in (1, 4):
            for gen in (256, 512):
                step = Step(mode=mode, replicates=replicates, gen_length=gen, prompt_length=prompt_length)
                e = estimate(config, step)
                cells = [e[k] / GIB for k in ("weights", "trainable", "activations", "activations_gc", "loss",
                                              "loss_unfused", "total")]  # fmt: skip
                lines.append(
                    f"| {_LABELS[mode]} | {replicates} | {gen} | "
                    + " | ".join(f"{c:.2f}" for c in cells)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def recipe_markdown(config: LLaDAConfig | None = None, prompt_length: int = 128) -> str:
    """Total GiB of the recipes' step (gen 256, 4 replicates, checkpointing, fused loss) by rollouts per
    micro-batch: prompts_per_step · num_generations / gradient_accumulation_steps, whole groups of 16."""
    config = config or llada_8b()
    micro = ((16, 8), (32, 4))
    lines = [
        "| model | " + " | ".join(f"{n} rollouts (gradient_accumulation_steps={g})" for n, g in micro) + " |",
        "|---|" + "---|" * len(micro),
    ]
    for mode in ("full", "lora", "qlora"):
        cells = [
            estimate(config, Step(mode=mode, sequences=n, prompt_length=prompt_length))["total"] / GIB
            for n, _ in micro
        ]
        lines.append(f"| {_LABELS[mode]} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown())
    print(recipe_markdown(), end="")
