"""Build a built-in perplexity scorer: a tiny GPT-2 trained on a task's reference answers, on a CPU.

    python scripts/build_ar_scorer.py                    # Sudoku: writes dmpo_fast/assets/tiny_ar_sudoku/
    python scripts/build_ar_scorer.py --task countdown   # Countdown: dmpo_fast/assets/tiny_ar_countdown/

MRO's perplexity reward scores the completion text committed so far under an autoregressive LM
(``dmpo_fast.mro.ARScorer``). The built-in tiny dLLMs need one that runs offline and knows their tasks, so this
script trains ``transformers.GPT2LMHeadModel`` (2 layers, d_model 64, about 0.1M parameters, 0.5 MB in fp32)
over the character tokenizer of the tiny models (``dmpo_fast.tokenizer.CharTokenizer``, the same ids, so no
re-tokenisation is needed) on the reference answers of the task's training split: <bos> + answer + <eos>,
next-token cross-entropy, AdamW. The answers alone, not the prompts, because the reward scores the completion
alone. A minute or two of CPU; ``build.json`` next to the weights records the command, the seed and the
held-out perplexity of reference answers against the untrained model's.

``TrainConfig(mro_ppl_model="tiny_ar_sudoku")`` (or ``mro.load_ar_scorer("tiny_ar_sudoku", ...)``) loads it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmpo_fast.assets import ASSETS, TINY_TASK_KWARGS
from dmpo_fast.tasks import get_task
from dmpo_fast.tokenizer import CharTokenizer

TASK_KWARGS = {"sudoku": TINY_TASK_KWARGS["tiny_sudoku"], "countdown": TINY_TASK_KWARGS["tiny_countdown"]}


def encode(tok: CharTokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, length], attention mask): <bos> text <eos>, right-padded with <pad>."""
    ids = torch.full((len(texts), length), tok.pad_id, dtype=torch.long)
    am = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        row = tok.encode(t, add_bos=True, add_eos=True)[:length]
        ids[i, : len(row)] = torch.tensor(row)
        am[i, : len(row)] = 1
    return ids, am


def nll(model, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens after <bos>."""
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    keep = am[:, 1:].float()
    return (ce * keep).sum() / keep.sum()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASK_KWARGS), default="sudoku")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: dmpo_fast/assets/tiny_ar_<task>/")
    args = p.parse_args(argv)
    import transformers

    torch.manual_seed(args.seed)
    out = args.out or ASSETS / f"tiny_ar_{args.task}"
    tok = CharTokenizer()
    task = get_task(args.task, **TASK_KWARGS[args.task])
    train = [r["reference"] for r in task.train(seed=args.seed)]
    test = [r["reference"] for r in task.test(200, seed=args.seed)]
    length = max(len(t) for t in train + test) + 2
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=max(32, length), n_embd=64, n_layer=2, n_head=2, n_inner=128,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    test_ids, test_am = encode(tok, test, length)
    with torch.no_grad():
        untrained = float(nll(model.eval(), test_ids, test_am).exp())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    t0, history = time.time(), []
    model.train()
    for step in range(args.steps):
        pick = torch.randint(len(train), (args.batch_size,), generator=gen).tolist()
        ids, am = encode(tok, [train[i] for i in pick], length)
        loss = nll(model, ids, am)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                ppl = float(nll(model.eval(), test_ids, test_am).exp())
            model.train()
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "test_ppl": round(ppl, 3)})
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out perplexity {ppl:.3f}", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(out)
    record = {
        "command": "python scripts/build_ar_scorer.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "task": args.task, "task_kwargs": TASK_KWARGS[args.task], "seed": args.seed, "steps": args.steps,
        "parameters": sum(p.numel() for p in model.parameters()), "untrained_test_ppl": round(untrained, 3),
        "history": history, "seconds": round(time.time() - t0, 1), "transformers": transformers.__version__,
    }  # fmt: skip
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} (held-out perplexity {untrained:.2f} untrained -> {history[-1]['test_ppl']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
