"""Rule-based rewards: a right final answer, instructions followed, a length kept.

They follow the Reward protocol (reward/protocol.py): `(prompts, responses) -> list[float | None]`, None where the
prompt carries nothing to check against. Llama 3 keeps math solutions whose final answer is right ("Capability
data: Math") and uses verifiable rules for instruction following; these are those checks.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction

from reward.ifeval import check_constraint, count_words, validate_constraints

__all__ = [
    "InstructionFollowing",
    "LengthPenalty",
    "MathAnswer",
    "check_constraint",
    "extract_final_answer",
    "validate_constraints",
]

_GSM8K = re.compile(r"####\s*([^\n]+)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
# A look-ahead so matches may overlap: in "Final Answer: The final answer is $5$." the last one is "answer is $5$".
_PHRASE = re.compile(r"(?=\banswer\s*(?:is\s*:?|:)\s*([^\n]*))", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")  # "3.5. I hope" ends at the second dot, not inside the number
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,000" but not the "1,2" of a pair
_NUMBER_THEN_UNIT = re.compile(r"(-?\d+(?:\.\d+)?)\s*[a-zA-Z][a-zA-Z\s]*")  # "18 dollars" -> "18"
_FRAC = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")


def _boxed_contents(text: str) -> list[str]:
    """The argument of every \\boxed{...} (balanced braces, so \\boxed{\\frac{1}{2}} is whole), in order."""
    found = []
    for match in _BOXED.finditer(text):
        start = match.end()
        if start < len(text) and text[start] != "{":  # "\boxed 5": the next token is the argument
            found.append(text[start:].split(maxsplit=1)[0] if text[start:].strip() else "")
            continue
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found.append(text[start + 1 : end])
                break
    return found


def _normalize(answer: str) -> str:
    s = answer.strip()
    for wrapper in ("\\text", "\\mathrm", "\\textbf", "\\mathbf"):  # \text{5 apples} -> 5 apples
        s = re.sub(re.escape(wrapper) + r"\{([^{}]*)\}", r"\1", s)
    for noise in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\left", "\\right"):
        s = s.replace(noise, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _THOUSANDS.sub("", s).strip().rstrip(".").strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    unit = _NUMBER_THEN_UNIT.fullmatch(s)
    if unit:
        s = unit.group(1)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"-?\d+\.\d+", s):  # "3.50" -> "3.5", "2.0" -> "2"
        s = s.rstrip("0").rstrip(".")
    return s


def _as_number(answer: str) -> Fraction | None:
    frac = _FRAC.fullmatch(answer)
    try:
        if frac:
            value = Fraction(frac.group(2)) / Fraction(frac.group(3))
            return -value if frac.group(1) else value
        if re.fullmatch(r"-?[\d.]+(?:/-?[\d.]+)?|-?[\d.]+e-?\d+", answer):
            return Fraction(answer)  # exact: "0.1" is 1/10, so 0.1 + 0.2 == 0.3 holds
    except (ValueError, ZeroDivisionError):
        pass
    return None


def extract_final_answer(text: str) -> str | None:
    """The normalised final answer stated in `text`, or None.

    Looked for in this order: a GSM8K `#### N` line, the last `\\boxed{...}`, the last "the answer is X" /
    "final answer: X". Normalised: $, \\text{}, % and thousands commas dropped, "x = " dropped, a trailing unit
    word dropped ("18 dollars" -> "18"), spaces removed, decimals trimmed ("3.50" -> "3.5").

    >>> extract_final_answer("Half of 2,000 is 1,000.\\n#### 1,000")
    '1000'
    >>> extract_final_answer("So $x = \\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_final_answer("The answer is 3.50 dollars.")
    '3.5'
    """
    gsm8k = _GSM8K.findall(text)
    if gsm8k:
        return _normalize(gsm8k[-1]) or None
    boxed = _boxed_contents(text)
    if boxed:
        return _normalize(boxed[-1]) or None
    for match in reversed(list(_PHRASE.finditer(text))):
        # "...what the answer is. First, ..." states nothing: fall back to an earlier phrase.
        answer = _normalize(_SENTENCE_END.split(match.group(1), maxsplit=1)[0])
        if answer:
            return answer
    return None


def _same_answer(a: str, b: str) -> bool:
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


class MathAnswer:
    """1.0 when the response's final answer equals the prompt's reference, else 0.0; None without a reference.

    The reference `prompts[i][answer_key]` may itself be a GSM8K solution ("... #### 42") or a boxed answer.
    Numbers compare exactly as fractions, so "0.5", "1/2" and "\\frac{1}{2}" agree.

    >>> reward = MathAnswer()
    >>> prompts = [{"prompt_id": "a", "answer": "#### 1/2"}, {"prompt_id": "b"}]
    >>> reward(prompts, ["The answer is $\\\\boxed{0.5}$", "The answer is 7."])
    [1.0, None]
    """

    def __init__(self, answer_key: str = "answer"):
        self.answer_key = answer_key

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        scores: list[float | None] = []
        for prompt, response in zip(prompts, responses, strict=True):
            reference = prompt.get(self.answer_key)
            if reference is None or not str(reference).strip():
                scores.append(None)
                continue
            reference = extract_final_answer(str(reference)) or _normalize(str(reference))
            predicted = extract_final_answer(response)
            scores.append(float(predicted is not None and _same_answer(predicted, reference)))
        return scores


class InstructionFollowing:
    """Fraction of the prompt's IFEval-style constraints the response meets; None when it has none.

    `prompts[i][constraints_key]` is a list of constraint dicts (or its JSON text); see reward/ifeval.py for the
    types. `strict=True` gives 1.0 only when every constraint is met (IFEval's strict prompt-level accuracy).

    >>> reward = InstructionFollowing()
    >>> prompt = {"prompt_id": "a", "constraints": [{"type": "lowercase"}, {"type": "max_words", "n": 3}]}
    >>> reward([prompt, prompt, {"prompt_id": "b"}], ["all lower case here", "tiny", "anything"])
    [0.5, 1.0, None]
    """

    def __init__(self, constraints_key: str = "constraints", strict: bool = False):
        self.constraints_key = constraints_key
        self.strict = strict

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        scores: list[float | None] = []
        for prompt, response in zip(prompts, responses, strict=True):
            constraints = prompt.get(self.constraints_key)
            if isinstance(constraints, str):  # a dataset column may hold them as JSON text
                constraints = json.loads(constraints) if constraints.strip() else None
            if not constraints:
                scores.append(None)
                continue
            met = [check_constraint(c, response) for c in constraints]
            scores.append(float(all(met)) if self.strict else sum(met) / len(met))
        return scores


class LengthPenalty:
    """0.0 within the length budget, else -per_word for every word over `max_words` / away from `target_words`.

    Meant to be added to another reward with a small weight, to hold back the answer-length drift seen across
    iterative DPO rounds (RLHFlow). Never None.

    >>> LengthPenalty(max_words=3)([{}, {}], ["short answer", "one two three four five"])
    [0.0, -0.02]
    >>> LengthPenalty(target_words=2, per_word=0.5)([{}], ["one two three"])
    [-0.5]
    """

    def __init__(self, max_words: int | None = None, target_words: int | None = None, per_word: float = 0.01):
        if (max_words is None) == (target_words is None):
            raise ValueError("LengthPenalty needs exactly one of max_words or target_words")
        if per_word < 0:
            raise ValueError(f"per_word must be >= 0, got {per_word}")
        self.max_words = max_words
        self.target_words = target_words
        self.per_word = per_word

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        scores: list[float | None] = []
        for _, response in zip(prompts, responses, strict=True):
            words = count_words(response)
            if self.max_words is not None:
                off = max(0, words - self.max_words)
            else:
                off = abs(words - self.target_words)
            scores.append(-self.per_word * off if off else 0.0)
        return scores
