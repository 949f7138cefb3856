"""Every README snippet runs: each ```python block is executed on the built-in tiny model (in a namespace
that defines the tensors a block's prose says it takes), and each ```bash line is checked: `dmpo-fast` lines
are parsed by the CLI and their config is built and validated (the runs themselves are minutes to days),
`pip install` names extras that exist, `python -m benchmarks` names scripts that exist."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [line.split("#")[0].strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()]
SHELL = [line for line in SHELL if line]


def _namespace():
    """What the snippets' prose says they take: a policy and reference, rollouts, rewards and weights."""
    import dmpo_fast
    from dmpo_fast.models import load

    torch.manual_seed(0)
    policy, ref_model = load("tiny").train(), load("tiny")
    G, B, L = 16, 16, 12
    R = B  # the replicates of the loop's blocks; the single-loss block's rows are ids' noisy copies
    ids = torch.randint(3, 40, (B, L))
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, 5:] = True
    weights = torch.rand(B)
    noisy_ids, masked = dmpo_fast.forward_mask(
        ids, maskable, mask_id=policy.mask_id, replicates=1, antithetic=False, seed=1
    )
    return dict(
        dmpo_fast=dmpo_fast, torch=torch, F=F, policy=policy, ref_model=ref_model, model=policy, ids=ids,
        maskable=maskable, rewards=torch.rand(B), s=3, R=R, L=L, G=G,
        buffer=[(ids[:8], maskable[:8], weights[:8])], optimizer=torch.optim.SGD(policy.parameters(), lr=1e-3),
        noisy_ids=noisy_ids, masked=masked, row_weights=torch.rand(R),
    )  # fmt: skip


def test_the_readme_has_the_snippets_this_file_runs():
    assert len(PYTHON) >= 4 and any(line.startswith("dmpo-fast train") for line in SHELL)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_snippet_runs(index):
    ns = _namespace()
    exec(compile(PYTHON[index], f"README.md python block {index}", "exec"), ns)  # noqa: S102


def _cli_line(line: str) -> list[str] | None:
    words = shlex.split(line)
    if words[:1] == ["dmpo-fast"]:
        return words[1:]
    if words[:2] == ["accelerate", "launch"] and "dmpo_fast" in words:
        return words[words.index("dmpo_fast") + 1 :]
    return None


@pytest.mark.parametrize("line", [ln for ln in SHELL if _cli_line(ln) is not None])
def test_cli_lines_parse_and_build_a_valid_config(line, monkeypatch):
    from dmpo_fast import cli

    monkeypatch.chdir(ROOT)  # the README's paths (configs/...) are relative to the repository root
    args = cli.build_parser().parse_args(_cli_line(line))
    if args.command in ("train", "eval"):
        cfg = cli._config(args)
        assert cfg.to_dict()
    elif args.command == "config":
        assert cli.main(["config"]) == 0


def test_install_and_benchmark_lines_name_what_exists():
    import ast

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r"(?:\.|dmpo-fast)\[([\w,-]+)\]", README)
    assert named and all(e in extras for group in named for e in group.split(",")), named
    tree = ast.parse((ROOT / "benchmarks" / "__main__.py").read_text())
    scripts = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SCRIPTS"
    )  # fmt: skip
    lines = [ln for ln in SHELL if ln.startswith("python -m benchmarks ")]
    assert lines
    for line in lines:
        for name in line.split()[3].split("|"):
            assert name in scripts, line
    assert "dev" in extras and any("hypothesis" in d for d in extras["dev"])  # the README's one install
