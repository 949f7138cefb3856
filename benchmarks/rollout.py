"""Benchmark: rollout throughput (completion tokens per second) of the samplers at an equal number of steps.

Providers (all ``dmpo_fast.sampling.generate`` but the last):
  llada             LLaDA's sampler: a full forward over prompt + completion at every step (no cache)
  fast_dllm-prefix  Fast-dLLM's prefix cache: a full forward at a block's first step, then the block and what
                    follows it against the cached prefix
  fast_dllm-dual    Fast-dLLM's dual cache: then the block alone against everything else cached
  reference-prefix  the prefix-cache loop as Fast-dLLM's research code runs it (``reference_rollout``): the
                    head over every query row, float64 Gumbel noise and softmax over the full vocabulary,
                    top-k per row in a Python loop (``denoise_step_reference_fastdllm``)
The providers are timed round-robin (a shared host's load then hits them alike). Every provider uses LLaDA's
fixed schedule (``steps`` model calls, an even share of each block per step), so
the cached samplers do the same number of steps as ``llada`` and the difference is what a step costs. Rows
never stop at EOS (random weights would end rows at random): every row decodes the whole completion.

Models: on CUDA LLaDA-8B's architecture with random weights in bf16 (``--layers`` fewer blocks than 32 if
memory or time demand; the row states them), batch 8, prompt 256, completion 256 in blocks of 32, 64 steps;
on CPU the built-in tiny model (fp32), batch 8, prompt 64, completion 64 in blocks of 16, 32 steps.
``model_tflops`` is an estimate: the matmul FLOPs of the model calls each sampler makes (projections, MLP,
attention scores and values, the head over the rows each step projects) over the median time.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    bench_interleaved,
    build_lm,
    check_target,
    environment,
    finish,
    native_ready,
    parse,
    parser,
)
from dmpo_fast.ops import denoise_step_reference_fastdllm
from dmpo_fast.profiling import peak_memory
from dmpo_fast.sampling import generate, transfer_schedule

TEMPERATURE = 0.7  # the trainer's rollout temperature: the sampling (Gumbel) path

PROVIDERS = {
    "llada": dict(sampler="llada"),
    "fast_dllm-prefix": dict(sampler="fast_dllm", cache="prefix"),
    "fast_dllm-dual": dict(sampler="fast_dllm", cache="dual"),
    "reference-prefix": None,
}


@torch.no_grad()
def reference_rollout(
    lm, prompt_ids: torch.Tensor, *, gen_length: int, block_length: int, steps: int, temperature: float
) -> torch.Tensor:
    """[B, P + G] ids decoded as Fast-dLLM's prefix-cache loop does, with its own step.

    A block's first step is a full forward (its keys and values become the prefix cache) and its head runs
    over every position; later steps run the block and everything after it against the prefix; in both,
    only the block's masked positions are candidates. The tokens differ from ``generate``'s (torch noise, not
    Philox); the work per step is the research code's (at T = 0, where neither draws noise, the same tokens).
    """
    B, P = prompt_ids.shape
    mask_id, head, scale = lm.mask_id, lm.head_weight, float(getattr(lm, "logit_scale", 1.0))
    ids = torch.cat((prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)), dim=1)
    n_blocks = gen_length // block_length
    was_training = lm.training
    lm.eval()
    for k in range(n_blocks):
        s, e = P + k * block_length, P + (k + 1) * block_length
        for i, n in enumerate(transfer_schedule(block_length, steps // n_blocks)):
            if i == 0:
                hidden, cache = lm.prefill(ids)
                cache, start = cache.truncate(s), 0  # queries: the whole sequence
            else:
                hidden, start = lm.hidden(ids[:, s:], cache=cache), s  # queries: positions s..end
            x = ids[:, start:]
            active = x == mask_id
            active[:, e - start :] = False  # candidates: the current block only
            out = denoise_step_reference_fastdllm(
                hidden, head, x, active, temperature=temperature, logit_scale=scale,
                num_transfer=torch.full((B,), n, device=ids.device),
            )  # fmt: skip
            ids[:, start:] = out.x
    lm.train(was_training)
    return ids


def random_prompts(lm, arch: str, B: int, P: int, generator: torch.Generator) -> torch.Tensor:
    """[B, P] ordinary token ids: the character vocabulary's 4 special tokens come first (with ``--vocab`` the
    last two are EOS and mask: both excluded), LLaDA's sit at the top (EOS 126081, mask 126336)."""
    low, high = (4, lm.vocab_size - 2) if arch == "tiny" else (0, lm.eos_id)
    return torch.randint(low, high, (B, P), generator=generator)


def forward_flops(cfg, queries: int, keys: int) -> int:
    """Matmul FLOPs of one sequence's forward, ``queries`` query tokens over ``keys`` keys, head excluded."""
    d, hd, kv = cfg.d_model, cfg.head_dim, cfg.effective_n_kv_heads * cfg.head_dim
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * cfg.effective_mlp_hidden_size)  # q, o; k, v; MLP
    attention = 2 * 2 * queries * keys * cfg.n_heads * hd  # scores and weighted values
    return cfg.n_layers * (queries * per_token + attention)


def rollout_flops(cfg, provider: str, B: int, P: int, G: int, block: int, steps: int) -> int:
    """Matmul FLOPs of one rollout of ``provider`` (see ``forward_flops``), the head included."""
    n_blocks, T, d, V = G // block, P + G, cfg.d_model, cfg.vocab_size
    cache = {"llada": "none", "fast_dllm-dual": "dual"}.get(provider, "prefix")
    total = 0
    for k in range(n_blocks):
        s, left = P + k * block, block
        for i, n in enumerate(transfer_schedule(block, steps // n_blocks)):
            queries = T if cache == "none" or i == 0 else (T - s if cache == "prefix" else block)
            total += forward_flops(cfg, queries, T)
            total += 2 * (queries if provider == "reference-prefix" else left) * d * V  # the head
            left -= n
    return B * total


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.quick:
        arch, layers, dtype = "tiny", 1, torch.float32
        B, P, G, block, steps, repeats = 2, 8, 8, 4, 4, 1
    elif device.type == "cuda":
        arch, layers, dtype = "llada8b", args.layers, torch.bfloat16
        B, P, G, block, steps, repeats = 8, 256, 256, 32, 64, 3
    else:
        arch, layers, dtype = "tiny", args.layers, torch.float32
        B, P, G, block, steps, repeats = 8, 64, 64, 16, 32, 5
    if device.type == "cpu" and not args.quick:
        native_ready(build=True)  # impl="auto" picks the native CPU ops only once they are built
    lm, model = build_lm(arch, device, dtype, layers=layers, vocab=args.vocab)
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = random_prompts(lm, arch, B, P, g).to(device)
    common = dict(gen_length=G, block_length=block, steps=steps, temperature=TEMPERATURE)
    calls = {}
    for name, kwargs in PROVIDERS.items():
        if kwargs is None:
            calls[name] = lambda: reference_rollout(lm, prompt, **common)
        else:
            calls[name] = lambda kwargs=kwargs: generate(lm, prompt, **kwargs, **common, eos_id=None, seed=0)
    timings = bench_interleaved(calls, device, repeats=repeats, warmup=0 if args.quick else 1)
    rows = []
    for name, call in calls.items():
        ms = timings[name]
        _, mem = peak_memory(call, device)
        seconds = ms["median_ms"] * 1e-3
        rows.append({
            "op": "rollout",
            "provider": name,
            **ms,
            "tokens_per_s": B * G / seconds,
            "ms_per_step": ms["median_ms"] / steps,
            "model_tflops": rollout_flops(lm.config, name, B, P, G, block, steps) / seconds / 1e12,
            "peak_extra_bytes": mem,
            "shape": {"B": B, "P": P, "G": G, "block": block, "steps": steps, "temperature": TEMPERATURE},
            **model,
            **environment(device),
        })  # fmt: skip
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_llada"] = r["tokens_per_s"] / base
    return rows


def main(argv=None):
    p = parser("rollout", __doc__)
    blocks = "transformer blocks (default: the architecture's own: 32 for LLaDA-8B, 4 for tiny)"
    p.add_argument("--layers", type=int, default=None, help=blocks)
    p.add_argument(
        "--vocab", type=int, default=None, help="the tiny model's vocabulary (cpu; default: 55 chars)"
    )
    args = parse(p, argv)
    if args.vocab is not None and (args.device == "cuda" or args.vocab < 8):
        p.error("--vocab sizes the tiny (cpu) model: an int >= 8, and not with --device cuda")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    rows = run(args)
    columns = ["model", "layers", "provider", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "ms_per_step",
               "model_tflops", "speedup_vs_llada", "peak_extra_bytes"]  # fmt: skip
    return finish(rows, "rollout", args, columns, targets)


def targets(rows: list[dict]) -> None:
    prefix = next(r for r in rows if r["provider"] == "fast_dllm-prefix")["speedup_vs_llada"]
    check_target("prefix cache >= 2x llada", f"{prefix:.2f}x", prefix >= 2)
