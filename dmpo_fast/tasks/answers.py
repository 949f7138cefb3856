"""Answer extraction and comparison for free-form math tasks (GSM8K, MATH-500).

Extraction order for a completion: the last ``\\boxed{...}`` (braces matched), else the last
``<answer>...</answer>`` block, else the text after the last ``####``, else (for numeric tasks) the last
number in the text. The first three count as an explicit, well-formatted final answer.

Equivalence of math answers is math-verify's (``math_equal``; the package is the optional extra ``tasks``,
and the math tasks refuse to start without it): symbolic, so ``\\sqrt2`` and ``\\sqrt{2}``, ``\\dfrac78`` and
``0.875``, ``5 \\text{ cm}`` and ``5``, ``\\$5`` and ``5`` agree.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``); None if absent or
    unbalanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    rest = rest[len("\\boxed") :] if rest.startswith("\\boxed") else rest[len("\\fbox") :]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        token = rest.strip().split()
        return token[0].rstrip(".$") if token else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


def answer_tag(text: str) -> str | None:
    """Content of the last closed ``<answer>...</answer>`` block, or None."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def after_hashes(text: str) -> str | None:
    """Text after the last ``####`` up to the end of that line (GSM8K's final-answer marker)."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    line = text[idx + 4 :].strip().splitlines()
    return line[0].strip() if line else None


def last_number(text: str) -> str | None:
    """The last number in ``text`` ('1,234.5' keeps its digits), or None."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def parse_number(text: str | None) -> Fraction | None:
    """Exact value of a plain number answer ('72', '$1,200', '-3.50', '3/4', '50%'), else None."""
    if text is None:
        return None
    s = text.strip().strip("$").strip()
    s = re.sub(r"^\\\$|\\%$|%$", "", s).strip().rstrip(".").replace(",", "").replace(" ", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        return Fraction(int(num), int(den)) if int(den) else None
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s) and len(s) < 100:
        return Fraction(s)
    return None


def gsm8k_reference(answer: str) -> str:
    """The final number of a GSM8K reference: the text after '####' with commas removed (the whole
    string when there is no '####')."""
    tail = after_hashes(answer)
    return (tail if tail is not None else answer).replace(",", "").strip()


def extract_final(text: str, *, numeric: bool) -> tuple[str | None, bool]:
    """(answer, formatted): the completion's final answer and whether it was marked explicitly
    (boxed, answer tag or ####). With ``numeric``, falls back to the last number and reduces a marked
    answer that is not itself a number (e.g. '18 dollars') to its last number."""
    for extract in (last_boxed, answer_tag, after_hashes):
        found = extract(text)
        if found is not None:
            if numeric and parse_number(found) is None:
                found = last_number(found) or found
            return found, True
    return (last_number(text) if numeric else None), False


# --------------------------------------------------------------------------- equivalence (math-verify)
MATH_VERIFY_HINT = 'pip install "dmpo-fast[tasks]" (or pip install math-verify)'


def require_math_verify(task: str) -> None:
    """Stop before any work when math-verify, which judges ``task``'s answers, is not installed."""
    try:
        import math_verify  # noqa: F401, PLC0415  (optional dependency, extra "tasks")
    except ImportError as e:
        raise ImportError(
            f"the {task} task checks answers with math-verify, which is not installed: {MATH_VERIFY_HINT}"
        ) from e


def math_equal(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` is mathematically the reference answer, by math-verify (symbolic: ``\\sqrt2``
    and ``\\sqrt{2}``, ``0.875`` and ``\\frac78``, ``5 \\text{ cm}`` and ``5``, ``x=6`` and ``6`` agree).
    Never raises; False when either side does not parse."""
    if not isinstance(prediction, str) or not isinstance(reference, str) or not prediction.strip():
        return False
    from math_verify import parse, verify  # noqa: PLC0415  (optional dependency, extra "tasks")

    # math-verify bounds its own time with SIGALRM, which only the main thread may set. Elsewhere (the
    # trainer runs rewards in a worker thread) the trainer's reward_timeout bounds the whole call instead.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout)
        pred = parse(f"${prediction}$", parsing_timeout=timeout)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # a parser bug or timeout must not cost a training step: not equal
        return False
