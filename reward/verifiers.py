"""Rule-based rewards: a right final answer, instructions followed, a length kept.

They follow the Reward protocol (reward/protocol.py): `(prompts, responses) -> list[float | None]`, None where the
prompt carries nothing to check against. Llama 3 keeps math solutions whose final answer is right ("Capability
data: Math") and uses verifiable rules for instruction following; these are those checks.
"""

from __future__ import annotations

import json
import re
import threading

from reward.ifeval import check_constraint, count_words, validate_constraints

__all__ = [
    "InstructionFollowing",
    "LengthPenalty",
    "MathAnswer",
    "check_constraint",
    "extract_final_answer",
    "validate_constraints",
]

# A GSM8K answer line: "#### 72", not a markdown heading such as "#### Step 1: add".
_GSM8K = re.compile(r"^[ \t]*####[ \t]*([-−+$\\\d.(][^\n]*)$", re.MULTILINE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
# A look-ahead so matches may overlap: in "Final Answer: The final answer is $5$." the last one is "answer is $5$".
_PHRASE = re.compile(r"(?=\banswer\s*(?:is\s*:?|:)\s*([^\n]*))", re.IGNORECASE)
# Where a stated answer ends: a sentence end, or a clause after a comma ("7, since 3 + 4 = 7").
_ANSWER_END = re.compile(r"\.(?:\s|$)|,\s+(?=[a-zA-Z])|;|\s+(?:since|because|as|so|which)\b", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,000" but not the "1,2" of a pair
_NUMBER_THEN_UNIT = re.compile(r"(-?\d+(?:\.\d+)?)\s*[a-zA-Z][a-zA-Z/\s]*")  # "18 dollars", "60 km/h" -> the number
_MIXED = re.compile(r"(-?\d+)\s+(\d+)/(\d+)")  # "1 2/3": one and two thirds
_SHORT_FRAC = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")  # "\frac12" is \frac{1}{2}


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
    """The stated answer as LaTeX math-verify reads: markdown, $ signs, units, "x = " and thousands separators
    dropped; the Unicode minus, "\\frac12" and mixed numbers ("1 2/3") spelled out."""
    s = answer.strip().replace("\u2212", "-").replace("{,}", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("**", "").replace("__", "").replace("`", "")
    for wrapper in ("\\text", "\\mathrm", "\\textbf", "\\mathbf"):  # \text{5 apples} -> 5 apples
        s = re.sub(re.escape(wrapper) + r"\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _THOUSANDS.sub("", s).strip().rstrip(".!").strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    unit = _NUMBER_THEN_UNIT.fullmatch(s)
    if unit:
        s = unit.group(1)
    mixed = _MIXED.fullmatch(s)
    if mixed:
        s = f"{mixed.group(1)}\\frac{{{mixed.group(2)}}}{{{mixed.group(3)}}}"
    return _SHORT_FRAC.sub(r"\\frac{\1}{\2}", s).strip()


def extract_final_answer(text: str) -> str | None:
    """The final answer stated in `text` (normalised, as LaTeX), or None when it states none.

    Looked for in this order: the last GSM8K `#### N` line, the last `\\boxed{...}`, the last "the answer is X" /
    "final answer: X" (X ends at the sentence or at a clause: "7, since 3 + 4 = 7" states 7). Normalised by
    `_normalize`; parsing and equivalence are math-verify's (`MathAnswer`).

    >>> extract_final_answer("Half of 2,000 is 1,000.\\n#### 1,000")
    '1000'
    >>> extract_final_answer("So $x = \\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_final_answer("The answer is 7, since 3 + 4 = 7.")
    '7'
    """
    gsm8k = _GSM8K.findall(text)
    if gsm8k:
        return _normalize(gsm8k[-1]) or None
    boxed = _boxed_contents(text)
    if boxed:
        return _normalize(boxed[-1]) or None
    for match in reversed(list(_PHRASE.finditer(text))):
        # "...what the answer is. First, ..." states nothing: fall back to an earlier phrase.
        answer = _normalize(_ANSWER_END.split(match.group(1), maxsplit=1)[0])
        if answer:
            return answer
    return None


def _timeout() -> int | None:
    """math-verify bounds parsing with SIGALRM, which only the main thread may set; other threads go without."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(answer: str):
    from math_verify import LatexExtractionConfig, parse

    return parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=_timeout())


def same_answer(predicted: str, reference: str) -> bool:
    """Whether two normalised answers are mathematically equal, by math-verify ("0.5", "1/2" and "\\frac{1}{2}"
    agree; "1\\frac{2}{3}" is 5/3, not 4)."""
    from math_verify import verify

    gold, pred = _parse(reference), _parse(predicted)
    if not gold or not pred:
        return predicted.replace(" ", "") == reference.replace(" ", "")
    return bool(verify(gold, pred, timeout_seconds=_timeout()))


class MathAnswer:
    """1.0 when the response's final answer equals the prompt's reference, else 0.0; None without a reference.

    The reference `prompts[i][answer_key]` may itself be a GSM8K solution ("... #### 42") or a boxed answer.
    Answers are parsed and compared by Hugging Face's math-verify, so "0.5", "1/2" and "\\frac{1}{2}" agree.

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
            scores.append(float(predicted is not None and same_answer(predicted, reference)))
        return scores


class InstructionFollowing:
    """Fraction of the prompt's IFEval-style constraints the response meets; None when it has none.

    `prompts[i][constraints_key]` is a list of constraint dicts (or its JSON text); see reward/ifeval.py for the
    types. `strict=True` gives 1.0 only when every constraint is met (IFEval's strict prompt-level accuracy).

    >>> reward = InstructionFollowing()
    >>> prompt = {"prompt_id": "a", "constraints": [{"type": "lowercase"}, {"type": "max_words", "n": 3}]}
    >>> reward([prompt, prompt, {"prompt_id": "b"}], ["all lower case here", "a short answer", "anything"])
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
