"""Answer extraction and comparison for free-form math tasks (GSM8K, MATH-500).

Extraction order for a completion: the last ``\\boxed{...}`` (braces matched), else the last
``<answer>...</answer>`` block, else the text after the last ``####``, else (for numeric tasks) the last
number in the text. The first three count as an explicit, well-formatted final answer.

Equivalence for MATH answers: math-verify when it is installed (symbolic, with its own timeouts), and in
any case a plain comparison after normalising the LaTeX (``\\dfrac``->``\\frac``, no ``\\left``/``\\right``,
spaces, ``$``, ``\\text{}`` wrappers, degree signs, trailing period), with numbers compared exactly.
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


# --------------------------------------------------------------------------- MATH equivalence
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_SHORT = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")


def normalize_math(answer: str) -> str:
    """A canonical string form of a MATH answer for plain comparison."""
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", "").replace("$", "")
    for old, new in (
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\displaystyle", ""),
    ):
        s = s.replace(old, new)
    for _ in range(3):  # nested wrappers, e.g. \text{\textbf{A}}
        s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace(" ", "").rstrip(".")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_SHORT.sub(r"\\frac{\1}{\2}", s)
    if re.fullmatch(r"[a-zA-Z]=.+", s):  # "x=5" -> "5"
        s = s[2:]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        s = f"{'-' if num.startswith('-') else ''}\\frac{{{num.lstrip('-')}}}{{{den}}}"
    if s.startswith("."):
        s = "0" + s
    return s


def _exact_value(s: str) -> Fraction | None:
    m = _FRAC.match(s)
    if m:
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s) and len(s) < 100:
        return Fraction(s)
    return None


def math_equal_plain(prediction: str, reference: str) -> bool:
    """Normalised string equality, or exact numeric equality when both sides are plain numbers."""
    p, r = normalize_math(prediction), normalize_math(reference)
    if not p:
        return False
    if p == r:
        return True
    pv, rv = _exact_value(p), _exact_value(r)
    return pv is not None and pv == rv


def _math_verify():
    try:
        import math_verify  # noqa: PLC0415  (optional dependency, extra "tasks")
    except ImportError:
        return None
    return math_verify


def have_math_verify() -> bool:
    return _math_verify() is not None


def math_equal(prediction: str, reference: str, *, use_math_verify: bool = True) -> bool:
    """Whether ``prediction`` is mathematically the reference answer. Never raises."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        return False
    try:
        if math_equal_plain(prediction, reference):
            return True
    except Exception:  # a normaliser bug must not cost a training step
        pass
    mv = _math_verify() if use_math_verify else None
    if mv is None:
        return False
    # math-verify times out with SIGALRM, which only the main thread may install.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = mv.parse(f"${reference}$", parsing_timeout=timeout)
        pred = mv.parse(f"${prediction}$", parsing_timeout=timeout)
        return bool(gold) and bool(pred) and bool(mv.verify(gold, pred, timeout_seconds=timeout))
    except Exception:
        return False
