"""MRO: each step reward against a direct recomputation, SGRO windows / advantages / window sampling, the
REINFORCE loss and its gradient against an eager full-logit version, rejection SFT."""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from toy_models import ToyDenoiser

from dmpo_fast import dmpo, mro
from dmpo_fast.kernels import runtime as kernels
from dmpo_fast.sampling import llada
from dmpo_fast.tokenizer import CharTokenizer

TOK = CharTokenizer()
V, MASK, EOS, BOS = TOK.vocab_size, TOK.mask_id, TOK.eos_id, TOK.bos_id
SPECIAL = (0, 1, 2, 3)
GROUP = 2

# The fused Triton kernels run where they can (a GPU, or the interpreter on CPU).
IMPLS = ["chunked", "eager"] + (["triton"] if kernels.available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return ToyDenoiser(vocab=V, hidden=16, mask_id=MASK, seed=0)


@pytest.fixture(scope="module")
def rollout(model):
    # 2 prompts x 2 rollouts, one left-padded prompt; 2 tokens per step, 4 steps, EOS possible.
    ids, am = TOK.batch_encode(["12+3=", "12+3=", "7*8=", "7*8="])
    ids[2:, 0], am[2:, 0] = 0, 0
    return llada(model, ids, am, gen_length=8, block_length=4, steps=4, temperature=1.0, seed=3, eos_id=EOS)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=BOS, eos_token_id=EOS
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _verified_logp(model, rollout, n, t, j, U, verification):
    """log p of row n's token j (committed at step t with U) in its verification context, full logits."""
    P = rollout.prompt_length
    if verification == "leave_one_out":
        x = rollout.state_at(t + 1)[n].clone()
        x[P + j] = MASK
    elif verification == "pre_step":
        x = rollout.state_at(t)[n]
    else:
        x = rollout.ids[n].clone()
        x[[P + u for u in U]] = MASK
    return _logp_full(model, x, rollout.attention_mask[n], P + j, rollout.ids[n, P + j])


def _logp_full(model, x, am, pos, token):
    """log softmax of the full logits at ``pos`` of state ``x`` (fp64)."""
    logits = model.logits(x[None], am[None])[0, pos].double()
    return torch.log_softmax(logits, -1)[token]


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verification", ["leave_one_out", "pre_step", "final"])
@pytest.mark.parametrize("score", ["prob", "logprob"])
def test_token_verification_matches_direct(model, rollout, verification, score):
    impl = IMPLS[-1] if score == "prob" else "chunked"
    got = mro.token_verification_rewards(
        model, rollout, verification=verification, score=score, micro_batch=5, impl=impl
    )
    cs, ns = rollout.commit_step, rollout.num_steps
    N, G = cs.shape
    assert got.shape == (N, int(ns.max()))
    for n in range(N):
        for t in range(got.shape[1]):
            if t >= ns[n]:
                assert math.isnan(got[n, t])
                continue
            U = [j for j in range(G) if cs[n, j] == t]
            vals = []
            for j in U:
                lp = _verified_logp(model, rollout, n, t, j, U, verification)
                vals.append(lp.exp() if score == "prob" else lp)
            want = torch.stack(vals).mean() if vals else torch.tensor(0.0)
            torch.testing.assert_close(got[n, t].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("verification", ["leave_one_out", "pre_step", "final"])
def test_one_verified_token_per_step(model, rollout, verification):
    # tokens="one": each step's reward is one of its tokens' values under tokens="all" contexts, drawn by
    # row key (a row slice draws the same), not always the same position of the step.
    from dmpo_fast.sampling.tts import select_rows

    kw = dict(verification=verification, score="logprob", impl="chunked")
    one = mro.token_verification_rewards(model, rollout, tokens="one", micro_batch=3, **kw)
    cs, ns = rollout.commit_step, rollout.num_steps
    picked = []
    for n in range(cs.shape[0]):
        for t in range(int(ns[n])):
            U = [j for j in range(cs.shape[1]) if cs[n, j] == t]
            if not U:
                assert one[n, t] == 0
                continue
            vals = [float(_verified_logp(model, rollout, n, t, j, U, verification).detach()) for j in U]
            hits = [i for i, v in enumerate(vals) if abs(v - float(one[n, t])) < 1e-4]
            assert hits, (n, t)
            if len(U) > 1:
                picked.append(hits[0])
    assert len(set(picked)) > 1  # the drawn token's place in its step varies
    rows = torch.tensor([2, 3])
    part = mro.token_verification_rewards(model, select_rows(rollout, rows), tokens="one", **kw)
    torch.testing.assert_close(part, one[rows, : part.shape[1]], equal_nan=True)


def _direct_ppl(gpt2, tokens):
    ar = [BOS] + [t for t in tokens if t not in SPECIAL]
    if len(ar) < 2:
        return math.inf
    logits = gpt2(torch.tensor([ar])).logits[0].double()
    return F.cross_entropy(logits[:-1], torch.tensor(ar[1:])).exp().item()


@pytest.mark.parametrize("text", ["visible", "prefix"])
@pytest.mark.parametrize("bridge", [False, True])
def test_perplexity_reward_matches_direct(gpt2, rollout, text, bridge):
    if bridge:  # decode to text and re-encode: the same ids for the character tokenizer
        scorer = mro.load_ar_scorer(gpt2, bridge_from=TOK, tokenizer=TOK, batch_size=3, impl="chunked")
    else:
        scorer = mro.ARScorer(gpt2, skip_ids=SPECIAL, batch_size=3, impl="chunked")
    cap, scale = 52.0, 30.0  # this random 55-token GPT-2 gives PPL 49..54 here: both sides of the cap occur
    got = mro.perplexity_rewards(scorer, rollout, text=text, cap=cap, scale=scale)
    P, cs, cm = rollout.prompt_length, rollout.commit_step, rollout.completion_mask
    seen_capped = seen_free = False
    for n in range(cs.shape[0]):
        for t in range(int(rollout.num_steps[n])):
            js = []
            for j in range(cs.shape[1]):
                if cs[n, j] <= t:
                    js.append(j)
                elif text == "prefix":
                    break
            toks = [int(rollout.ids[n, P + j]) for j in js if cm[n, j]]
            ppl = _direct_ppl(gpt2, toks)
            seen_capped |= ppl >= cap
            seen_free |= ppl < cap
            want = (cap - min(ppl, cap)) / scale
            assert abs(got[n, t].item() - want) < 1e-4, (n, t, got[n, t].item(), want)
    assert seen_free and seen_capped


def test_perplexity_of_empty_and_one_token_texts(gpt2):
    scorer = mro.ARScorer(gpt2, skip_ids=SPECIAL, impl="eager")
    ppl = scorer.perplexity([[], [EOS, MASK], [10]])
    assert math.isinf(ppl[0]) and math.isinf(ppl[1])  # nothing to predict after BOS
    assert ppl[2].item() == pytest.approx(_direct_ppl(gpt2, [10]), rel=1e-5)
    scorer = mro.ARScorer(gpt2, bos_id=None, impl="eager")
    assert math.isinf(scorer.perplexity([[10]])[0])  # one token without BOS: nothing predicted


def test_potential_shaping_telescopes():
    ppl = torch.tensor([[0.2, 0.5, 0.4, float("nan")], [0.1, 0.3, 0.9, 0.6]])
    cfg = mro.MROConfig(shaping="potential", tv_weight=0.0)
    shaped = mro.combine_step_rewards(None, ppl, cfg)
    torch.testing.assert_close(shaped[0, :3], torch.tensor([0.2, 0.3, -0.1]))
    torch.testing.assert_close(shaped[1].sum(), ppl[1, -1])  # the sum is the last state's reward
    tv = torch.ones(2, 4)
    both = mro.combine_step_rewards(tv, ppl, mro.MROConfig(tv_weight=2.0, ppl_weight=0.5))
    torch.testing.assert_close(both[1], 2.0 + 0.5 * ppl[1])


# --------------------------------------------------------------------------------------------------
# SGRO
# --------------------------------------------------------------------------------------------------


def test_window_returns_and_advantages_match_loops():
    g = torch.Generator().manual_seed(1)
    step_r = torch.rand(4, 5, generator=g)
    ns = torch.tensor([5, 3, 5, 4])
    step_r[1, 3:] = float("nan")
    step_r[3, 4:] = float("nan")
    task = torch.tensor([1.0, 0.0, float("nan"), 0.5])
    w = 2
    for returns in ("window", "reward_to_go"):
        R, valid = mro.window_returns(step_r, ns, task, window=w, task_weight=3.0, returns=returns)
        for n in range(4):
            J = math.ceil(ns[n].item() / w)
            per = [sum(step_r[n, t].item() for t in range(j * w, min((j + 1) * w, ns[n]))) for j in range(J)]
            per[-1] += 3.0 * task[n].item() if math.isfinite(task[n]) else 0.0
            want = per if returns == "window" else [sum(per[j:]) for j in range(J)]
            for j in range(R.shape[1]):
                ok = j < J and math.isfinite(task[n])
                assert bool(valid[n, j]) == ok
                assert R[n, j].item() == pytest.approx(want[j] if ok else 0.0, abs=1e-5)
        A = mro.window_advantages(R, valid, GROUP)
        for n in range(4):
            for j in range(R.shape[1]):
                mates = [m for m in range(n - n % GROUP, n - n % GROUP + GROUP) if valid[m, j]]
                want = R[n, j] - sum(R[m, j] for m in mates) / len(mates) if valid[n, j] else 0.0
                assert A[n, j].item() == pytest.approx(float(want), abs=1e-5)
        torch.testing.assert_close(mro.window_advantages(R, valid, GROUP, baseline="none"), R)


def test_window_reward_mean_averages_each_windows_steps():
    g = torch.Generator().manual_seed(2)
    step_r = torch.rand(3, 5, generator=g)
    ns = torch.tensor([5, 3, 4])
    step_r[1, 3:] = step_r[2, 4:] = float("nan")
    task = torch.tensor([1.0, 0.0, 0.5])
    R, valid = mro.window_returns(step_r, ns, task, window=2, task_weight=3.0, returns="window", reduce="mean")
    for n in range(3):
        for j in range(math.ceil(ns[n].item() / 2)):
            steps = range(2 * j, min(2 * j + 2, int(ns[n])))
            want = sum(step_r[n, t].item() for t in steps) / len(steps)
            want += 3.0 * task[n].item() if j == math.ceil(ns[n].item() / 2) - 1 else 0.0
            assert R[n, j].item() == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="reduce must be one of"):
        mro.window_returns(step_r, ns, task, window=2, reduce="max")
    with pytest.raises(ValueError, match="window_reward"):
        mro.MROConfig(window_reward="max")


@pytest.mark.parametrize("importance", ["uniform", "advantage"])
def test_window_sampling_is_unbiased_and_row_keyed(importance):
    A = torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    reps = 4000  # independent draws: the same rows under distinct row keys, one call
    keys = torch.arange(3 * reps)
    draws = mro.sample_windows(A.repeat(reps, 1), valid.repeat(reps, 1), importance=importance, k=2, seed=7,
                               step=3, row_keys=keys).view(reps, 3, 4)  # fmt: skip
    mean = draws.mean(0)
    assert (draws[:, ~valid] == 0).all()
    # Unbiased: E[c_j] = 1 for every window that can be drawn; with "advantage" a window with A = 0
    # is never drawn, and contributes nothing to the loss either (A·c = 0).
    can = valid & ((A != 0) | torch.tensor(importance == "uniform"))
    assert torch.allclose(mean[can], torch.ones(()), atol=0.08), mean
    part = mro.sample_windows(
        A[1:], valid[1:], importance=importance, k=2, seed=7, step=3, row_keys=keys[1:3]
    )
    torch.testing.assert_close(part, draws[0, 1:])  # a row draws the same windows in any micro-batch
    other = mro.sample_windows(A, valid, importance=importance, k=2, seed=7, step=4, row_keys=keys[:3])
    assert not torch.equal(other.repeat(50, 1), draws[:50].reshape(150, 4))  # a new step draws anew


def _eager_sgro(model, ro, coef, window):
    """Σ_n Σ_t coef[n, t // w] Σ_{cs = t} CE at the state before t, with full logits."""
    P, cs = ro.prompt_length, ro.commit_step
    total = 0.0
    for n in range(cs.shape[0]):
        for t in range(int(ro.num_steps[n])):
            c = coef[n, t // window]
            if c == 0:
                continue
            logits = model.logits(ro.state_at(t)[n : n + 1], ro.attention_mask[n : n + 1])[0]
            for j in (cs[n] == t).nonzero().flatten().tolist():
                total = total + c * F.cross_entropy(logits[P + j], ro.ids[n, P + j])
    return total


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_step_matches_eager_full_logits(model, rollout, impl):
    cfg = mro.MROConfig(group_size=GROUP, window=3, ppl_weight=0.0, micro_batch=7)
    task = torch.tensor([1.0, 0.0, 0.25, 0.75])
    buf = mro.make_buffer(model, rollout, task, cfg, seed=0, impl=impl)
    assert (buf["advantages"] != 0).any()
    out = mro.loss_step(model, buf, cfg, step=0, impl=impl)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    coef = buf["advantages"] / (buf["tokens"][:, None] * 4)
    ref = _eager_sgro(model, rollout, coef, cfg.window)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(out.loss, ref.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Micro-batches (row slices of the buffer) sum to the whole.
    halves = [{k: (v[s] if torch.is_tensor(v) and v.dim() and v.shape[0] == 4 else v) for k, v in buf.items()}
              for s in (slice(0, 2), slice(2, 4))]  # fmt: skip
    total = sum(mro.loss_step(model, h, cfg, step=0, impl=impl).loss for h in halves)
    torch.testing.assert_close(total, out.loss, rtol=1e-5, atol=1e-7)


def test_sgro_loss_with_sampled_windows_matches_eager(model, rollout):
    g = torch.Generator().manual_seed(4)
    coef = torch.randn(4, 2, generator=g)
    coef[0, 1] = coef[3, 0] = 0.0  # unselected windows cost nothing and contribute nothing
    out = mro.sgro_loss(model, rollout, coef, window=2, impl="chunked")
    ref = _eager_sgro(model, rollout, coef, 2)
    torch.testing.assert_close(out.loss, ref.float(), rtol=1e-5, atol=1e-6)
    n_states = sum(int(coef[n, t // 2] != 0) for n in range(4) for t in range(int(rollout.num_steps[n])))
    assert int(out.stats["states"]) == n_states


def test_state_sampling_is_unbiased_row_keyed_and_runs_k_states_per_window():
    num_steps = torch.tensor([12, 5, 9, 1])
    window, reps = 4, 3000
    keys = torch.arange(4 * reps)
    draws = mro.sample_steps(num_steps.repeat(reps), window=window, k=1, seed=7, step=3, row_keys=keys)
    draws = draws.view(reps, 4, 12)
    live = torch.arange(12)[None, :] < num_steps[:, None]
    assert (draws[:, ~live] == 0).all()
    # One state per window of each row, weighted by the window's steps in that row: 4, 4, 4 | 4, 1 | 4, 4, 1 | 1.
    picked = (draws > 0).view(reps, 4, 3, 4).sum(-1)
    windows = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert (picked == windows).all()
    assert draws.view(reps, 4, 3, 4).sum(-1).unique().tolist() == [0.0, 1.0, 4.0]
    # Unbiased: E[weight] = 1 on every live step, so E[loss] is the loss over every state (it is linear in them).
    assert torch.allclose(draws.mean(0)[live], torch.ones(()), atol=0.12), draws.mean(0)
    part = mro.sample_steps(num_steps[1:3], window=window, k=1, seed=7, step=3, row_keys=keys[1:3])
    torch.testing.assert_close(part, draws[0, 1:3, :9])  # a row draws the same states in any micro-batch
    other = mro.sample_steps(num_steps, window=window, k=1, seed=7, step=4, row_keys=keys[:4])
    assert not torch.equal(other.repeat(50, 1), draws[:50].reshape(200, 12))  # each optimizer step draws anew
    # k >= the window's steps, or None: every state, weight 1.
    torch.testing.assert_close(
        mro.sample_steps(num_steps, window=window, k=4, seed=7, step=3, row_keys=keys[:4]), live.float()
    )
    torch.testing.assert_close(
        mro.sample_steps(num_steps, window=window, k=None, seed=7, step=3, row_keys=keys[:4]), live.float()
    )
    two = mro.sample_steps(num_steps, window=window, k=2, seed=7, step=3, row_keys=keys[:4])
    assert ((two > 0).view(4, 3, 4).sum(-1) == torch.tensor([[2, 2, 2], [2, 1, 0], [2, 2, 1], [1, 0, 0]])).all()
    with pytest.raises(ValueError, match="states_per_window"):
        mro.MROConfig(states_per_window=0)


def test_verification_on_sampled_steps_scores_k_per_window_and_reweights_the_window_sums(model, rollout):
    full_cfg = mro.MROConfig(group_size=GROUP, window=3, ppl_weight=0.0, verification_tokens="one")
    cfg = mro.MROConfig(group_size=GROUP, window=3, ppl_weight=0.0, verification_tokens="one",
                        verification_steps=1)  # fmt: skip
    keys = torch.arange(10, 14)
    full = mro.step_rewards(model, rollout, full_cfg, verify_keys=(5, keys), impl="chunked")
    part = mro.step_rewards(model, rollout, cfg, verify_keys=(5, keys), impl="chunked")
    w = mro.sample_steps(rollout.num_steps, window=3, k=1, seed=5, step=0, row_keys=keys,
                         stream=mro.STREAM_VERIFY_STEPS)  # fmt: skip
    scored = torch.isfinite(part["tv"])
    torch.testing.assert_close(scored, w > 0)  # one verified step per window of each row
    torch.testing.assert_close(part["tv"][scored], full["tv"][scored])  # the same reward where scored
    live = torch.isfinite(full["tv"])
    torch.testing.assert_close(part["total"][live], (full["tv"] * w)[live])  # weighted m / k, 0 elsewhere
    assert part["total"][~live].isnan().all()
    # Without the keys (rejection sampling, test-time scaling) every step is verified.
    torch.testing.assert_close(mro.step_rewards(model, rollout, cfg, impl="chunked")["tv"], full["tv"])
    with pytest.raises(ValueError, match="verification_steps"):
        mro.MROConfig(verification_steps=0)


def test_loss_step_with_sampled_states_runs_k_states_and_matches_eager(model, rollout):
    cfg = mro.MROConfig(group_size=GROUP, window=2, ppl_weight=0.0, states_per_window=1)
    task = torch.tensor([1.0, 0.0, 0.25, 0.75])
    buf = mro.make_buffer(model, rollout, task, cfg, seed=0, impl="chunked")
    out = mro.loss_step(model, buf, cfg, step=5, impl="chunked")
    s = mro.sample_steps(buf["num_steps"], window=2, k=1, seed=0, step=5, row_keys=buf["row_keys"])
    windows = (buf["num_steps"] + 1) // 2
    assert int(out.stats["states"]) == int(((s > 0) & (buf["advantages"].repeat_interleave(2, 1) != 0)).sum())
    assert int(out.stats["states"]) <= int(windows.sum())
    # The eager sum over each drawn state, weighted A / normaliser × (the window's steps / 1).
    coef = buf["advantages"] / (buf["tokens"][:, None] * 4)
    ref = 0.0
    P, cs = rollout.prompt_length, rollout.commit_step
    for n in range(4):
        for t in range(int(rollout.num_steps[n])):
            if s[n, t] == 0 or coef[n, t // 2] == 0:
                continue
            logits = model.logits(rollout.state_at(t)[n : n + 1], rollout.attention_mask[n : n + 1])[0]
            for j in (cs[n] == t).nonzero().flatten().tolist():
                ref = ref + coef[n, t // 2] * s[n, t] * F.cross_entropy(logits[P + j], rollout.ids[n, P + j])
    torch.testing.assert_close(out.loss, ref.float(), rtol=1e-5, atol=1e-6)
    halves = [{k: (v[s_] if torch.is_tensor(v) and v.dim() and v.shape[0] == 4 else v) for k, v in buf.items()}
              for s_ in (slice(0, 2), slice(2, 4))]  # fmt: skip
    total = sum(mro.loss_step(model, h, cfg, step=5, impl="chunked").loss for h in halves)
    torch.testing.assert_close(total, out.loss, rtol=1e-5, atol=1e-7)


def test_denoising_anchor_adds_the_masked_diffusion_loss_of_the_rollouts(model, rollout):
    # anchor="denoise": SGRO + w · rejection_sft_loss of every rollout with a finite task reward (weight 1/N),
    # its masks keyed by the rows' global index, so row slices still add up to the whole buffer's loss.
    task = torch.tensor([1.0, 0.0, float("nan"), 0.75])
    plain = mro.MROConfig(group_size=GROUP, window=3, ppl_weight=0.0)
    cfg = mro.MROConfig(group_size=GROUP, window=3, ppl_weight=0.0, anchor="denoise", anchor_weight=0.5)
    buf = mro.make_buffer(model, rollout, task, cfg, seed=0, impl="chunked")
    noise = dmpo.NoiseConfig(replicates=2)
    out = mro.loss_step(model, buf, cfg, step=1, noise=noise, anchor_seed=9, impl="chunked")
    sgro = mro.loss_step(model, buf, plain, step=1, impl="chunked").loss
    anchor = mro.rejection_sft_loss(
        model, rollout.ids, buf["maskable"], noise=noise, attention_mask=rollout.attention_mask,
        selected=torch.tensor([True, True, False, True]), total=4, seed=9, impl="eager",
    )  # fmt: skip
    assert anchor.loss > 0
    torch.testing.assert_close(out.loss, sgro + 0.5 * anchor.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["anchor_loss"], anchor.loss.detach(), rtol=1e-5, atol=1e-6)
    halves = [{k: (v[s] if torch.is_tensor(v) and v.dim() and v.shape[0] == 4 else v) for k, v in buf.items()}
              for s in (slice(0, 2), slice(2, 4))]  # fmt: skip
    total = sum(mro.loss_step(model, h, cfg, 1, noise=noise, anchor_seed=9, impl="chunked").loss for h in halves)
    torch.testing.assert_close(total, out.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="anchor"):
        mro.MROConfig(anchor="kl2")
    with pytest.raises(ValueError, match="anchor_weight"):
        mro.MROConfig(anchor_weight=-1.0)


def test_kl_anchor_is_the_k3_kl_to_the_reference_on_the_loss_states(model, rollout):
    task = torch.tensor([1.0, 0.0, 0.25, 0.75])
    plain = mro.MROConfig(group_size=GROUP, window=2, ppl_weight=0.0, states_per_window=1)
    cfg = mro.MROConfig(group_size=GROUP, window=2, ppl_weight=0.0, states_per_window=1, anchor="kl",
                        anchor_weight=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="anchor='kl' needs the reference model"):
        mro.make_buffer(model, rollout, task, cfg, seed=0, impl="chunked")
    # The policy as its own reference: k3 = 0 and its gradient is 0, so the loss is SGRO's.
    buf = mro.make_buffer(model, rollout, task, cfg, seed=0, reference=model, impl="chunked")
    decoded = rollout.commit_step < rollout.num_steps[:, None]
    assert torch.isfinite(buf["ref_logp"][decoded]).all() and buf["ref_logp"][~decoded].isnan().all()
    out = mro.loss_step(model, buf, cfg, step=2, impl="chunked")
    sgro = mro.loss_step(model, buf, plain, step=2, impl="chunked")
    torch.testing.assert_close(out.loss, sgro.loss, rtol=1e-5, atol=1e-7)
    assert abs(float(out.stats["anchor_loss"])) < 1e-6
    # Another reference: the eager sum of s / (n_row · N) · (e^d − d − 1) over every token of the drawn states.
    ref_model = ToyDenoiser(vocab=V, hidden=16, mask_id=MASK, seed=5)
    buf = mro.make_buffer(model, rollout, task, cfg, seed=0, reference=lambda: nullcontext(ref_model),
                          impl="chunked")  # fmt: skip
    out = mro.loss_step(model, buf, cfg, step=2, impl="chunked")
    s = mro.sample_steps(buf["num_steps"], window=2, k=1, seed=0, step=2, row_keys=buf["row_keys"])
    P, cs = rollout.prompt_length, rollout.commit_step
    want = 0.0
    for n in range(4):
        for t in range(int(rollout.num_steps[n])):
            if s[n, t] == 0:
                continue
            state = rollout.state_at(t)[n : n + 1], rollout.attention_mask[n : n + 1]
            lp = torch.log_softmax(model.logits(*state)[0].double(), -1)
            lr = torch.log_softmax(ref_model.logits(*state)[0].double(), -1)
            for j in (cs[n] == t).nonzero().flatten().tolist():
                d = lr[P + j, rollout.ids[n, P + j]] - lp[P + j, rollout.ids[n, P + j]]
                want = want + s[n, t] / (buf["tokens"][n] * 4) * (d.exp() - d - 1)
    assert want > 0
    torch.testing.assert_close(out.stats["anchor_loss"], want.float(), rtol=1e-4, atol=1e-7)
    sgro = mro.loss_step(model, buf, plain, step=2, impl="chunked")
    torch.testing.assert_close(out.loss, sgro.loss + 0.5 * want.float(), rtol=1e-4, atol=1e-6)
    halves = [{k: (v[s_] if torch.is_tensor(v) and v.dim() and v.shape[0] == 4 else v) for k, v in buf.items()}
              for s_ in (slice(0, 2), slice(2, 4))]  # fmt: skip
    total = sum(mro.loss_step(model, h, cfg, step=2, impl="chunked").loss for h in halves)
    torch.testing.assert_close(total, out.loss, rtol=1e-5, atol=1e-7)


def test_baseline_none_keeps_the_returns(model, rollout):
    task = torch.tensor([1.0, 0.0, 0.25, 0.75])
    cfg = mro.MROConfig(group_size=GROUP, window=3, ppl_weight=0.0, baseline="none")
    buf = mro.make_buffer(model, rollout, task, cfg, seed=0, impl="chunked")
    torch.testing.assert_close(buf["advantages"], torch.where(buf["valid"], buf["returns"], 0.0))


def test_a_few_steps_raise_the_advantage_weighted_logprob(rollout):
    policy = ToyDenoiser(vocab=V, hidden=16, mask_id=MASK, seed=1)
    cfg = mro.MROConfig(
        group_size=GROUP, window=2, ppl_weight=0.0, importance="advantage", windows_per_rollout=2
    )
    buf = mro.make_buffer(policy, rollout, torch.tensor([1.0, 0.0, 0.0, 1.0]), cfg, seed=0, impl="chunked")
    coef = buf["advantages"] / buf["tokens"][:, None]

    def objective():  # Σ A·log p over the committed tokens (the REINFORCE surrogate), no sampling
        with torch.no_grad():
            return -_eager_sgro(policy, rollout, coef, cfg.window).item()

    before = objective()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for step in range(8):
        opt.zero_grad()
        mro.loss_step(policy, buf, cfg, step, impl="chunked").loss.backward()
        opt.step()
    assert objective() > before + 1e-3


# --------------------------------------------------------------------------------------------------
# Rejection sampling, config
# --------------------------------------------------------------------------------------------------


def test_select_best_and_rejection_sft_loss(model, rollout):
    r = torch.tensor([0.2, 0.9, float("nan"), 0.1, 0.5, 0.5])
    assert mro.select_best(r, 2).tolist() == [1, 3, 4]
    assert mro.select_best(r, 2, min_reward=0.3).tolist() == [1, 4]
    rows = torch.tensor([1, 2])
    ids = rollout.ids[rows]
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, rollout.prompt_length :] = rollout.completion_mask[rows]
    noise = dmpo.NoiseConfig(replicates=2)
    am = rollout.attention_mask[rows]
    out = mro.rejection_sft_loss(model, ids, maskable, noise=noise, attention_mask=am, seed=5, impl="chunked")
    ref = dmpo.wdce(model, ids, maskable, torch.full((2,), 0.5), group_size=1, noise=noise,
                    attention_mask=rollout.attention_mask[rows], seed=5, impl="eager")  # fmt: skip
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert out.loss > 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="window"):
        mro.MROConfig(window=0)
    with pytest.raises(ValueError, match="verification"):
        mro.MROConfig(verification="joint")
    with pytest.raises(ValueError, match="ppl_cap"):
        mro.MROConfig(ppl_cap=0)
    with pytest.raises(ValueError, match="ARScorer"):
        mro.step_rewards(None, None, mro.MROConfig(tv_weight=0.0))


def test_majority_vote_quality_reward(model, rollout):
    assert mro.majority_vote(["a", "b", "a", None, "", "c", "c", "d"], 4).tolist() == [1, 0, 1, 0, 0, 1, 1, 0]
    assert mro.majority_vote(["x", "y", None, None], 2).tolist() == [1, 0, 0, 0]  # ties: the first seen
    # In the TTS reward: λ_q on the final call for the rows that agree with their prompt's majority.
    cfg = mro.MROConfig(window=2, ppl_weight=0.0, task_weight=0.5)
    plain = mro.tts_reward_fn(model, cfg, window=2, impl="chunked")
    voted = mro.tts_reward_fn(model, cfg, window=2, vote=lambda ro: ["7", "7", "1", "2"], group_size=2,
                              impl="chunked")  # fmt: skip
    torch.testing.assert_close(voted(rollout, final=False), plain(rollout, final=False))
    torch.testing.assert_close(voted(rollout, final=True) - plain(rollout, final=True),
                               torch.tensor([0.5, 0.5, 0.5, 0.0]))  # fmt: skip
    with pytest.raises(ValueError, match="group_size"):
        mro.tts_reward_fn(model, cfg, vote=lambda ro: [])


def test_the_built_in_perplexity_scorer_knows_sudoku():
    # dmpo_fast/assets/tiny_ar_sudoku (scripts/build_ar_scorer.py): offline, small, and a valid grid reads as
    # far more likely than one with a broken row or a half-written one.
    pytest.importorskip("transformers")
    from dmpo_fast.assets import ASSETS, tiny_ar_scorer_dir

    path = tiny_ar_scorer_dir("tiny_ar_sudoku")
    assert sum(f.stat().st_size for f in path.iterdir()) < 2 * 2**20 and path.parent == ASSETS
    scorer = mro.load_ar_scorer("tiny_ar_sudoku", bridge_from=TOK)
    good, bad, half = (TOK.encode(t) for t in ("1234/3412/2143/4321", "1134/3412/2143/4311", "12 4/3"))
    ppl = scorer.perplexity([good, bad, half])
    assert ppl[0] < 2.0 and ppl[1] > 2 * ppl[0] and ppl[2] > ppl[1]
    with pytest.raises(ValueError, match="name must be one of"):
        tiny_ar_scorer_dir("tiny_ar_gsm8k")
