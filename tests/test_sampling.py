"""Samplers on the tiny LLaDA (random weights, fp32): caches, batching, ROAR log-probs, EOS, errors."""

import pytest
import torch
import torch.nn.functional as F
from toy_models import ToyDenoiser

from dmpo_fast.kernels import runtime as kernels
from dmpo_fast.models import build_tiny
from dmpo_fast.sampling import fast_dllm, generate, llada, roar, transfer_schedule

V, MASK, EOS = 37, 36, 35
GEN, BLOCK = 16, 8


@pytest.fixture(scope="module")
def model():
    return build_tiny(V, mask_id=MASK, eos_id=EOS, seed=0)


@pytest.fixture(scope="module")
def one_layer():
    return build_tiny(V, mask_id=MASK, eos_id=EOS, seed=0, n_layers=1)


def _prompts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, :1] = 0
    ids[mask == 0] = EOS  # padding id: anything, it is never attended
    return ids, mask


RULES = [
    dict(threshold=0.15),
    dict(factor=3.0),
    dict(steps=8),
]  # several steps per block, rows at different paces


# --------------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_caches_are_exact_for_a_one_layer_model(one_layer, rule):
    # With one layer the keys/values of a position depend on its token alone: the prefix (committed) and the
    # suffix (still masked) do not change inside a block, so prefix and dual caches are exact, and the three
    # modes must decode the same tokens in the same steps.
    ids, mask = _prompts()
    runs = {
        c: fast_dllm(
            one_layer, ids, mask, gen_length=GEN, block_length=BLOCK, cache=c, seed=1, eos_id=None, **rule
        )
        for c in ("none", "prefix", "dual")
    }
    for c in ("prefix", "dual"):
        assert torch.equal(runs[c].ids, runs["none"].ids), c
        assert torch.equal(runs[c].commit_step, runs["none"].commit_step), c
    assert runs["none"].num_steps.max() > GEN // BLOCK  # several steps per block: the cache was really reused


def test_caches_agree_with_full_forward_at_block_refresh(model):
    # Four layers: a cache is exact only at the block's first step (the refresh), so one step per block must
    # give identical tokens in every mode, at T = 0 and T = 1.
    ids, mask = _prompts()
    for temperature in (0.0, 1.0):
        runs = [
            fast_dllm(
                model,
                ids,
                mask,
                gen_length=GEN,
                block_length=BLOCK,
                steps=GEN // BLOCK,
                cache=c,
                seed=2,
                temperature=temperature,
                eos_id=None,
            )
            for c in ("none", "prefix", "dual")
        ]
        assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].ids, runs[2].ids)
        base = llada(
            model,
            ids,
            mask,
            gen_length=GEN,
            block_length=BLOCK,
            steps=GEN // BLOCK,
            seed=2,
            temperature=temperature,
            eos_id=None,
        )
        assert torch.equal(base.ids, runs[0].ids)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("llada", dict(steps=8)),
        ("llada", dict(steps=4, remasking="random")),
        ("fast_dllm", dict(cache="dual", threshold=0.15)),
        ("fast_dllm", dict(cache="prefix", factor=3.0)),
        ("roar", {}),
    ],
)
def test_batch_rows_equal_rows_alone(model, sampler, kw, temperature):
    ids, mask = _prompts()
    batch = generate(
        model,
        ids,
        mask,
        sampler=sampler,
        gen_length=GEN,
        block_length=BLOCK,
        seed=3,
        temperature=temperature,
        **kw,
    )
    for b in range(ids.shape[0]):
        real = ids[b : b + 1, mask[b] == 1]
        alone = generate(
            model,
            real,
            None,
            sampler=sampler,
            gen_length=GEN,
            block_length=BLOCK,
            seed=3,
            temperature=temperature,
            row_keys=torch.tensor([b]),
            **kw,
        )
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[b])
        assert torch.equal(alone.commit_step[0], batch.commit_step[b])
        assert alone.num_steps.item() == batch.num_steps[b].item()
        if batch.logprobs is not None:
            torch.testing.assert_close(alone.logprobs[0], batch.logprobs[b], rtol=1e-4, atol=1e-5)


def test_seed_and_row_keys_change_the_draw(model):
    ids, mask = _prompts()
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=8, temperature=1.0, eos_id=None)
    a = llada(model, ids, mask, seed=5, **kw)
    assert torch.equal(a.ids, llada(model, ids, mask, seed=5, **kw).ids)
    assert not torch.equal(a.ids, llada(model, ids, mask, seed=6, **kw).ids)
    assert not torch.equal(a.ids, llada(model, ids, mask, seed=5, row_keys=torch.tensor([7, 8, 9]), **kw).ids)


# --------------------------------------------------------------------------------------------------
# ROAR log-probs
# --------------------------------------------------------------------------------------------------


def _recompute(lm, rollout, temperature=1.0):
    """Per-token log-probs rebuilt from the final ids and the commit steps alone."""
    P = rollout.prompt_length
    out = torch.zeros_like(rollout.logprobs)
    attn = rollout.attention_mask
    with torch.no_grad():
        for t in range(int(rollout.num_steps.max())):
            state = rollout.state_at(t)
            z = lm.logits(state, attn)[:, P:].double() / temperature  # [B, G, V]
            logp = F.log_softmax(z, dim=-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
            out = torch.where(rollout.commit_step == t, logp.float(), out)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_roar_logprobs_equal_recomputation(model, temperature):
    ids, mask = _prompts()
    ref = build_tiny(V, mask_id=MASK, eos_id=EOS, seed=1)
    r = roar(
        model,
        ids,
        mask,
        gen_length=GEN,
        block_length=BLOCK,
        temperature=temperature,
        ref_model=ref,
        seed=4,
        eos_id=None,
    )
    # one token per step, every block in a permutation of its positions
    assert (r.num_steps == GEN).all()
    for b in range(3):
        for k in range(GEN // BLOCK):
            steps = r.commit_step[b, k * BLOCK : (k + 1) * BLOCK].sort().values
            assert steps.tolist() == list(range(k * BLOCK, (k + 1) * BLOCK))
    torch.testing.assert_close(r.logprobs, _recompute(model, r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.ref_logprobs, _recompute(ref, r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.sampling_logprobs, _recompute(model, r, temperature), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(r.ref_logprobs, r.logprobs)


def test_roar_order_is_random_per_row_and_block(model):
    ids, mask = _prompts()
    r = roar(model, ids, mask, gen_length=GEN, block_length=BLOCK, seed=4, eos_id=None)
    orders = {
        tuple(r.commit_step[b, k * BLOCK : (k + 1) * BLOCK].argsort().tolist())
        for b in range(3)
        for k in range(2)
    }
    assert len(orders) == 6  # six different permutations of 8 positions (a collision has probability ~4e-4)


# --------------------------------------------------------------------------------------------------
# Schedules and EOS
# --------------------------------------------------------------------------------------------------


def test_llada_commits_the_linear_schedule(model):
    ids, mask = _prompts()
    r = llada(model, ids, mask, gen_length=GEN, block_length=BLOCK, steps=6, eos_id=None, seed=0)
    schedule = transfer_schedule(BLOCK, 3)
    assert schedule == [3, 3, 2]
    for b in range(3):
        counts = torch.bincount(r.commit_step[b], minlength=6).tolist()
        assert counts == schedule * 2
    assert (r.commit_step[:, :BLOCK] < 3).all() and (
        r.commit_step[:, BLOCK:] >= 3
    ).all()  # blocks left to right
    assert r.completion_mask.all() and (r.completion_ids != MASK).all()


def test_threshold_zero_and_factor_commit_blocks_fast(model):
    ids, mask = _prompts()
    r = fast_dllm(model, ids, mask, gen_length=GEN, block_length=BLOCK, threshold=0.0, eos_id=None, seed=0)
    assert (r.num_steps == GEN // BLOCK).all()  # everything above 0 commits: one step per block
    r = fast_dllm(model, ids, mask, gen_length=GEN, block_length=BLOCK, threshold=1.0, eos_id=None, seed=0)
    assert (r.num_steps == GEN).all()  # nothing reaches 1: only the best, one token per step


def test_eos_finishes_rows_and_fills_them(model):
    ids, mask = _prompts()
    kw = dict(gen_length=32, block_length=BLOCK, steps=16, seed=0)
    free = llada(model, ids, mask, eos_id=None, **kw)
    # The token this random model likes most serves as EOS, so rows finish at different blocks.
    eos = int(torch.mode(free.completion_ids.reshape(-1)).values)
    r = llada(model, ids, mask, eos_id=eos, **kw)
    assert torch.equal(r.completion_mask, generate(model, ids, mask, eos_id=eos, **kw).completion_mask)
    finished_any = False
    for b in range(3):
        comp = r.completion_ids[b]
        first = (comp == eos).nonzero()
        assert first.numel(), "pick a prompt set where every row meets the EOS token"
        block_end = (int(first[0]) // BLOCK + 1) * BLOCK
        # identical decoding up to the block holding the first EOS, EOS afterwards, masked in every state
        assert torch.equal(comp[:block_end], free.completion_ids[b, :block_end])
        assert (comp[block_end:] == eos).all()
        assert (r.commit_step[b, block_end:] == r.num_steps[b]).all()
        assert (r.commit_step[b, :block_end] < r.num_steps[b]).all()
        assert r.completion_mask[b].tolist() == [i <= int(first[0]) for i in range(32)]
        assert r.num_steps[b] == block_end // BLOCK * 4  # 4 steps per decoded block, none after finishing
        finished_any |= block_end < 32
    assert finished_any


# --------------------------------------------------------------------------------------------------
# Kernel path and model state
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not kernels.available(), reason="Triton kernels cannot run here")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_triton_impl_gives_the_same_rollout(temperature):
    small = build_tiny(
        V,
        mask_id=MASK,
        eos_id=EOS,
        seed=0,
        d_model=32,
        n_heads=2,
        n_kv_heads=2,
        n_layers=1,
        mlp_hidden_size=64,
    )
    ids, mask = _prompts()
    kw = dict(gen_length=8, block_length=4, temperature=temperature, seed=9, eos_id=None)
    a = fast_dllm(small, ids, mask, cache="dual", threshold=0.05, impl="chunked", **kw)
    b = fast_dllm(small, ids, mask, cache="dual", threshold=0.05, impl="triton", **kw)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)


def test_model_mode_is_restored_and_no_grad(model):
    ids, mask = _prompts()
    model.train()
    r = llada(model, ids, mask, gen_length=GEN, block_length=BLOCK, steps=2, seed=0)
    assert model.training and all(m.training for m in model.modules())
    assert not r.ids.requires_grad
    model.eval()


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sampler="beam"), "sampler must be one of"),
        (dict(gen_length=12), "multiple of block_length"),
        (dict(steps=3), "multiple of the number of blocks"),
        (dict(steps=32), "more than block_length"),
        (dict(gen_length=512), "context"),
        (dict(temperature=-0.5), "temperature"),
        (dict(remasking="lowest"), "remasking"),
        (dict(seed=2**63), "seed"),
        (dict(row_keys=torch.tensor([0, 1])), "row_keys"),
        (dict(eos_id=-1), "eos_id"),
        (dict(sampler="fast_dllm", steps=None, cache="both"), "cache must be one of"),
        (dict(sampler="fast_dllm", threshold=0.9, factor=1.0), "at most one of"),
        (dict(sampler="fast_dllm", steps=None, threshold=1.5), "threshold"),
        (dict(sampler="fast_dllm", steps=None, factor=0.0), "factor"),
        (dict(sampler="roar", steps=8), "steps must be None or gen_length"),
    ],
)
def test_bad_arguments(model, kw, match):
    ids, mask = _prompts()
    args = dict(sampler="llada", gen_length=GEN, block_length=BLOCK, steps=4)
    args.update(kw)
    if args["sampler"] == "roar":
        args.pop("remasking", None)
    with pytest.raises(ValueError, match=match):
        generate(model, ids, mask, **args)


def test_bad_prompts_and_models(model):
    ids, mask = _prompts()
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=4)
    right_padded = mask.flip(1)
    with pytest.raises(ValueError, match="left padding"):
        llada(model, ids, right_padded, **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        llada(model, ids, mask[:, 1:], **kw)
    with pytest.raises(ValueError, match="integer"):
        llada(model, ids.float(), mask, **kw)
    with pytest.raises(ValueError, match="supports_cache"):
        fast_dllm(
            ToyDenoiser(vocab=V, mask_id=MASK), ids, mask, gen_length=GEN, block_length=BLOCK, cache="prefix"
        )
    with pytest.raises(ValueError, match="mask_id"):
        roar(
            model,
            ids,
            mask,
            gen_length=GEN,
            block_length=BLOCK,
            ref_model=build_tiny(V, mask_id=3, eos_id=EOS),
        )
