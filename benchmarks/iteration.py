"""Benchmark: one full DMPO iteration, the reference pipeline against dmpo_fast's defaults.

One iteration, as the trainer runs it (built here from the public pieces):

    rollouts   N = prompts × group size completions, the default sampler: Fast-dLLM prefix cache, fixed
               schedule (``steps`` model calls), temperature 0.7
    reward     synthetic: the fraction of even token ids in the completion (a cheap stand-in; random weights)
    ELBO       log p_ref and log p_old of every rollout on the same masks (``dmpo.elbo``, 4 replicates)
    weights    ``importance_weights`` (alpha 0.04, "individual" baseline)
    F steps    ``num_iterations`` = 4 passes over the buffer: ``dmpo.wdce`` (4 replicates, fresh masks) in
               micro-batches of one prompt group, backward, gradient clipping at 1.0, AdamW step

Pipelines:
  reference  the reference implementation's choices: the rollout loop with the research code's step
             (``benchmarks.rollout.reference_rollout``: float64 noise and softmax over every query row), and
             ``impl="eager"`` for the ELBO and the loss (the loss takes logits at every position; the eager
             ELBO materialises the masked rows' fp32 logits at once, so this baseline is, if anything,
             favoured)
  dmpo_fast  ``generate(sampler="fast_dllm", cache="prefix")`` and ``impl="auto"`` (triton on CUDA, else the
             native ops when built, else chunked)
Both run on one policy, one frozen reference copy and one AdamW (the work does not depend on the weights'
values: rows never stop at EOS, the schedule is fixed), timed round-robin.

Models: on CUDA LLaDA-8B's architecture with random weights in bf16, 4 of its 32 blocks by default (a full
fine-tune of 8B with AdamW and a frozen reference does not fit one 80 GB GPU; ``--layers``), 2 prompts × 8,
prompt 128, completion 256 in blocks of 32, 64 steps; on CPU the built-in tiny model, fp32, 2 prompts × 8,
prompt 32, completion 24 in one block, 12 steps (the trainer's defaults).
Memory: ``static_bytes`` = weights of policy and reference + optimizer state; ``peak_extra_bytes`` = what the
iteration allocates on top at its peak (activations, logits, gradients); ``peak_bytes`` = the sum.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

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
    synchronize,
    tensor_bytes,
)
from benchmarks.rollout import random_prompts, reference_rollout
from dmpo_fast.dmpo import NoiseConfig, elbo, wdce
from dmpo_fast.ops import importance_weights
from dmpo_fast.profiling import peak_memory
from dmpo_fast.sampling import generate


@dataclasses.dataclass(frozen=True)
class Setup:
    prompts: int
    group: int
    prompt_length: int
    gen_length: int
    block_length: int
    steps: int
    temperature: float = 0.7
    replicates: int = 4
    elbo_replicates: int = 4
    num_iterations: int = 4  # F
    alpha: float = 0.04
    lr: float = 1e-4
    max_grad_norm: float = 1.0


def synthetic_reward(completion: torch.Tensor) -> torch.Tensor:
    """[N] fp32: the fraction of even token ids (no task: the weights are random)."""
    return (completion % 2 == 0).float().mean(dim=1)


def dmpo_iteration(
    policy, ref, opt, prompts: torch.Tensor, s: Setup, *, pipeline: str, seed: int, phases: dict
):
    """One iteration (see the module docstring); appends each phase's milliseconds to ``phases``."""
    device, impl = prompts.device, "eager" if pipeline == "reference" else "auto"
    G, P = s.group, s.prompt_length
    clock = [time.perf_counter()]

    def lap(name):
        synchronize(device)
        clock.append(time.perf_counter())
        phases.setdefault(name, []).append((clock[-1] - clock[-2]) * 1e3)

    rows = prompts.repeat_interleave(G, dim=0)  # [N, P], a group's rollouts consecutive
    decode = dict(
        gen_length=s.gen_length, block_length=s.block_length, steps=s.steps, temperature=s.temperature
    )
    if pipeline == "reference":
        ids = reference_rollout(policy, rows, **decode)  # [N, P + gen]
    else:
        ids = generate(
            policy, rows, sampler="fast_dllm", cache="prefix", eos_id=None, seed=seed, **decode
        ).ids
    lap("rollout_ms")

    rewards = synthetic_reward(ids[:, P:])  # [N]
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, P:] = True
    elbo_noise = NoiseConfig(replicates=s.elbo_replicates)
    with torch.no_grad():  # the same seed: reference and policy scored on the same masks
        log_p_ref = elbo(
            ref, ids, maskable, noise=elbo_noise, seed=seed, micro_batch=G * s.elbo_replicates, impl=impl
        )
        log_p_old = elbo(
            policy, ids, maskable, noise=elbo_noise, seed=seed, micro_batch=G * s.elbo_replicates, impl=impl
        )
    weights = importance_weights(rewards, log_p_ref - log_p_old, group_size=G, alpha=s.alpha).weights  # [N]
    lap("elbo_ms")

    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    for f in range(s.num_iterations):
        opt.zero_grad(set_to_none=True)
        for a in range(0, ids.shape[0], G):  # micro-batches of one prompt group
            out = wdce(
                policy, ids[a : a + G], maskable[a : a + G], weights[a : a + G], group_size=G,
                noise=NoiseConfig(replicates=s.replicates), seed=seed * 1000 + f, impl=impl,
            )  # fmt: skip
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
    policy.eval()
    lap("loss_steps_ms")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.quick:
        arch, layers, dtype, repeats = "tiny", 1, torch.float32, 1
        s = Setup(
            prompts=1,
            group=2,
            prompt_length=6,
            gen_length=4,
            block_length=4,
            steps=2,
            replicates=2,
            elbo_replicates=2,
            num_iterations=1,
        )
    elif device.type == "cuda":
        arch, layers, dtype, repeats = "llada8b", args.layers or 4, torch.bfloat16, 3
        s = Setup(prompts=2, group=8, prompt_length=128, gen_length=256, block_length=32, steps=64)
    else:
        arch, layers, dtype, repeats = "tiny", args.layers, torch.float32, 5
        s = Setup(prompts=2, group=8, prompt_length=32, gen_length=24, block_length=24, steps=12)
    if device.type == "cpu" and not args.quick:
        native_ready(build=True)  # impl="auto" picks the native CPU ops only once they are built
    policy, model = build_lm(arch, device, dtype, layers=layers, vocab=args.vocab)
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    prompts = random_prompts(policy, arch, s.prompts, s.prompt_length, torch.Generator().manual_seed(0)).to(
        device
    )

    phases = {"reference": {}, "dmpo_fast": {}}
    calls = {
        name: lambda name=name: dmpo_iteration(
            policy, ref, opt, prompts, s, pipeline=name, seed=1, phases=phases[name]
        )
        for name in phases
    }  # fmt: skip
    timings = bench_interleaved(calls, device, repeats=repeats, warmup=0 if args.quick else 1)
    static = tensor_bytes(
        [
            *policy.parameters(),
            *ref.parameters(),
            *(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)),
        ]
    )
    rows = []
    for name, call in calls.items():
        ms = timings[name]
        by_phase = {k: statistics.median(v[-repeats:]) for k, v in phases[name].items()}  # the timed calls
        _, mem = peak_memory(call, device)
        rows.append({
            "op": "dmpo_iteration",
            "provider": name,
            **ms,
            **by_phase,
            "iterations_per_s": 1e3 / ms["median_ms"],
            "rollout_tokens_per_s": s.prompts * s.group * s.gen_length / (ms["median_ms"] * 1e-3),
            "static_bytes": static,
            "peak_extra_bytes": mem,
            "peak_bytes": static + mem,
            "impl": "eager" if name == "reference" else "auto",
            "shape": dataclasses.asdict(s),
            **model,
            **environment(device),
        })  # fmt: skip
    base = rows[0]
    for r in rows:
        r["speedup_vs_reference"] = base["median_ms"] / r["median_ms"]
        r["peak_vs_reference"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def main(argv=None):
    p = parser("iteration", __doc__)
    blocks = "transformer blocks (default: 4 of LLaDA-8B's 32 on cuda, the tiny model's 4 on cpu)"
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
    columns = ["model", "layers", "provider", "median_ms", "p20_ms", "p80_ms", "rollout_ms", "elbo_ms",
               "loss_steps_ms", "speedup_vs_reference", "peak_bytes", "peak_vs_reference"]  # fmt: skip
    return finish(rows, "iteration", args, columns, targets)


def targets(rows: list[dict]) -> None:
    """>= 2x the reference's throughput at <= half its peak memory (set for CUDA)."""
    fast = next(r for r in rows if r["provider"] == "dmpo_fast")
    measured = f"{fast['speedup_vs_reference']:.2f}x at {fast['peak_vs_reference']:.2f}x the peak memory"
    check_target(">= 2x throughput at <= 0.5x peak memory", measured,
                 fast["speedup_vs_reference"] >= 2 and fast["peak_vs_reference"] <= 0.5)  # fmt: skip
