"""Test-time scaling: k = 1 is plain decoding, branching re-seeds every candidate from the best partial state,
the result is the best final candidate, caches stay exact after re-seeding, MRO rewards on partial states."""

import pytest
import torch
from toy_models import ToyDenoiser

from dmpo_fast import mro
from dmpo_fast.models import build_tiny
from dmpo_fast.sampling import generate, generate_tts, llada

V, MASK, EOS = 37, 36, 35
GEN, BLOCK = 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy():
    return ToyDenoiser(vocab=V, hidden=8, mask_id=MASK, seed=0)


@pytest.fixture(scope="module")
def one_layer():
    return build_tiny(V, mask_id=MASK, eos_id=EOS, seed=0, n_layers=1, d_model=32, mlp_hidden_size=64)


def _prompts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


def _count_reward(token):
    """Score = how many completion tokens equal ``token`` (masked positions count for nothing)."""

    def fn(rollout, *, final):
        return (rollout.ids[:, rollout.prompt_length :] == token).sum(1).float()

    return fn


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_k1_equals_plain_decoding(toy, temperature):
    ids, mask = _prompts()
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=4, temperature=temperature, seed=5, eos_id=None)
    plain = llada(toy, ids, mask, **kw)
    out = generate_tts(toy, ids, mask, k=1, window=1, reward_fn=_count_reward(3), sampler="llada", **kw)
    assert torch.equal(out.rollout.ids, plain.ids)
    assert torch.equal(out.rollout.commit_step, plain.commit_step)
    assert out.branches == 0 and out.chosen.tolist() == [0, 0]


def test_greedy_branches_equal_plain_decoding(toy):
    # T = 0, low-confidence remasking: every branch decodes the same tokens, so k copies change nothing.
    ids, mask = _prompts()
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=4, temperature=0.0, seed=5, eos_id=None)
    plain = llada(toy, ids, mask, **kw)
    out = generate_tts(toy, ids, mask, k=3, window=1, reward_fn=_count_reward(3), sampler="llada", **kw)
    assert out.branches == 3  # after calls 1, 2, 3; none after the last step
    assert torch.equal(out.candidates.ids, plain.ids.repeat_interleave(3, 0))


def test_branching_keeps_the_best_partial_state(toy):
    ids, mask = _prompts()
    k, seen = 4, []
    score = _count_reward(7)

    def reward_fn(rollout, *, final):
        s = score(rollout, final=final)
        if not final:
            seen.append((rollout.ids.clone(), rollout.commit_step.clone(), s))
        return s

    kw = dict(gen_length=GEN, block_length=BLOCK, steps=8, temperature=1.5, seed=11, eos_id=None)
    out = generate_tts(toy, ids, mask, k=k, window=2, reward_fn=reward_fn, sampler="llada", **kw)
    assert out.branches == len(seen) == 3  # after calls 2, 4, 6 of 8
    P = ids.shape[1]
    finals = [(out.candidates.ids, out.candidates.commit_step)]
    for (ids_a, cs_a, s_a), (ids_b, cs_b) in zip(
        seen, [(i, c) for i, c, _ in seen[1:]] + finals, strict=True
    ):
        best = s_a.view(-1, k).argmax(1)
        for b in range(2):
            src = b * k + int(best[b])
            done = (ids_a[src, P:] != MASK).nonzero().flatten()
            for j in range(k):  # every candidate continued from the best state: its tokens and steps
                assert torch.equal(ids_b[b * k + j, P + done], ids_a[src, P + done])
                assert torch.equal(cs_b[b * k + j, done], cs_a[src, done])
    diverged = (out.candidates.ids.view(2, k, -1) != out.candidates.ids.view(2, k, -1)[:, :1]).any()
    assert diverged  # at T > 0 the branches differ (their own row keys)
    # The result is the best final candidate, never below any candidate it was chosen from.
    cand = out.candidate_rewards.view(2, k)
    assert torch.equal(out.rewards, cand.max(1).values)
    assert (out.rewards[:, None] >= cand).all()
    assert torch.equal(out.rollout.ids, out.candidates.ids[torch.arange(2) * k + out.chosen])


def test_grouped_rows_are_the_candidates(toy):
    # Step-wise group sampling: rows arrive repeated (k per prompt, their own keys) and all come back; the
    # same rows decoded ungrouped with keys key_b * k + j give the same candidates.
    ids, mask = _prompts()
    k = 3
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=8, temperature=1.5, seed=11, eos_id=None)
    ref = generate_tts(toy, ids, mask, k=k, window=2, reward_fn=_count_reward(7), sampler="llada", **kw)
    keys = torch.arange(2 * k)
    out = generate_tts(toy, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), k=k, window=2,
                       reward_fn=_count_reward(7), sampler="llada", row_keys=keys, grouped=True, **kw)  # fmt: skip
    assert torch.equal(out.rollout.ids, ref.candidates.ids) and out.rollout.ids.shape[0] == 2 * k
    assert torch.equal(out.rewards, ref.candidate_rewards) and torch.equal(out.chosen, ref.chosen)
    assert out.branches == ref.branches == 3
    with pytest.raises(ValueError, match="k consecutive rows"):
        generate_tts(toy, ids, mask, k=3, reward_fn=_count_reward(1), grouped=True, **kw)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_reseeded_rows_refresh_the_cache(one_layer, cache, monkeypatch):
    # A re-seeded row's cached keys/values are another row's: the next step must run a full forward
    # (prefill). One layer makes the caches exact, so the cached run must also equal the uncached one.
    ids, mask = _prompts()
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=8, temperature=1.0, seed=2, eos_id=None)
    prefills = []
    real = one_layer.prefill
    monkeypatch.setattr(one_layer, "prefill", lambda *a, **k: prefills.append(1) or real(*a, **k))
    runs = {
        c: generate_tts(one_layer, ids, mask, k=3, window=3, reward_fn=_count_reward(5), sampler="fast_dllm",
                        cache=c, **kw)  # fmt: skip
        for c in ("none", cache)
    }
    # 4 steps per block; branches after calls 3 and 6, each followed by a step of the same block:
    # 2 block refreshes + 2 re-seed refreshes.
    assert runs[cache].branches == 2 and len(prefills) == 4
    assert torch.equal(runs[cache].candidates.ids, runs["none"].candidates.ids)


def test_mro_rewards_on_partial_states_match_the_final_rollout(toy):
    # Token verification of a step depends only on the state after it: scored on a partial rollout inside
    # the decoding loop, it equals the score of the same steps of the finished rollout.
    ids, mask = _prompts()
    cfg = mro.MROConfig(window=2, ppl_weight=0.0)
    fn = mro.tts_reward_fn(toy, cfg, impl="chunked")
    recorded = []

    def reward_fn(rollout, *, final):
        r = fn(rollout, final=final)
        recorded.append((rollout.num_steps.clone(), r))
        return r

    kw = dict(gen_length=GEN, block_length=BLOCK, steps=8, temperature=1.0, seed=3, eos_id=None)
    out = generate_tts(toy, ids, mask, k=1, window=2, reward_fn=reward_fn, sampler="llada", **kw)
    full = mro.token_verification_rewards(toy, out.candidates, impl="chunked")
    assert len(recorded) == 1  # k = 1 never branches: only the final call
    steps, final = recorded[0]
    torch.testing.assert_close(final, full[:, -2:].sum(1))
    # With k = 2: a branch point's best candidate hands its state to every row, so its score (the last
    # window's verification) equals that window's score in every final candidate of the prompt.
    recorded.clear()
    out = generate_tts(toy, ids, mask, k=2, window=2, reward_fn=reward_fn, sampler="llada", **kw)
    assert len(recorded) == 4 and out.branches == 3
    full = mro.token_verification_rewards(toy, out.candidates, impl="chunked")  # [4, 8]
    for steps, r in recorded[:-1]:
        t = int(steps[0])  # the rows move in lockstep (fixed schedule)
        best = r.view(2, 2).argmax(1) + torch.arange(2) * 2
        for row in range(4):
            torch.testing.assert_close(r[best[row // 2]], full[row, t - 2 : t].sum())


def test_errors(toy):
    ids, mask = _prompts()
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=4, seed=0, eos_id=None)
    with pytest.raises(ValueError, match="k must"):
        generate_tts(toy, ids, mask, k=0, reward_fn=_count_reward(1), **kw)
    with pytest.raises(ValueError, match="window"):
        generate_tts(toy, ids, mask, window=0, reward_fn=_count_reward(1), **kw)
    with pytest.raises(ValueError, match="one score per row"):
        generate_tts(toy, ids, mask, k=2, window=1, reward_fn=lambda r, final: torch.zeros(1), **kw)
    assert generate(toy, ids, mask, **kw).ids.shape == (2, 5 + GEN)  # the hook is gone afterwards
