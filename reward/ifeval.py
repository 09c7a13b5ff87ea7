"""Verifiable instruction constraints in the IFEval style (Zhou et al. 2023, arXiv 2311.07911).

A prompt row may carry `constraints`: a list of dicts such as `{"type": "max_words", "n": 50}`. Each type is a
rule a program can check, so a response either meets it or not; `reward.verifiers.InstructionFollowing` turns
them into a reward. The checks are simplified IFEval: words are `\\w+` runs, sentences end at `.`, `!` or `?`
followed by a space, paragraphs are separated by blank lines.
"""

from __future__ import annotations

import json
import re

# type -> (parameter name, parameter type) pairs it needs.
CONSTRAINT_PARAMS: dict[str, tuple[tuple[str, type], ...]] = {
    "max_words": (("n", int),),
    "min_words": (("n", int),),
    "max_sentences": (("n", int),),
    "lowercase": (),
    "uppercase": (),
    "num_bullets": (("n", int),),
    "keyword_present": (("keyword", str),),
    "keyword_absent": (("keyword", str),),
    "ends_with": (("phrase", str),),
    "starts_with": (("phrase", str),),
    "json": (),
    "no_commas": (),
    "num_paragraphs": (("n", int),),
}

_WORD = re.compile(r"\w+(?:['’]\w+)*")  # "don't" is one word, as a reader counts it
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")  # "3.5" does not end a sentence: no space after the dot
_BULLET = re.compile(r"^\s*[-*]\s+\S", re.MULTILINE)  # "**bold**" and "---" rules are not bullets
_FENCE = re.compile(r"^```(?:json)?[ \t]*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def count_words(text: str) -> int:
    """Number of words in `text` (runs of letters/digits, apostrophes inside a word allowed).

    >>> count_words("Don't panic: it's 42.")
    4
    """
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Number of sentences: pieces ended by `.`, `!` or `?` plus whitespace, or by the end of the text.

    >>> count_sentences("One. Two! Is it 3.5? Yes")
    4
    """
    return sum(1 for piece in _SENTENCE_END.split(text) if piece.strip())


def _is_json(text: str) -> bool:
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def _has_keyword(text: str, keyword: str) -> bool:
    # Look-arounds instead of \b so that keywords starting or ending with punctuation ("C++") still work.
    return re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.IGNORECASE) is not None


_CHECKS = {
    "max_words": lambda r, n: count_words(r) <= n,
    "min_words": lambda r, n: count_words(r) >= n,
    "max_sentences": lambda r, n: count_sentences(r) <= n,
    # str.islower()/isupper() also require at least one cased letter: "123" is neither.
    "lowercase": lambda r: r.islower(),
    "uppercase": lambda r: r.isupper(),
    "num_bullets": lambda r, n: len(_BULLET.findall(r)) == n,
    "keyword_present": lambda r, keyword: _has_keyword(r, keyword),
    "keyword_absent": lambda r, keyword: not _has_keyword(r, keyword),
    # Case-insensitive, as IFEval's end_checker/startend checks are.
    "ends_with": lambda r, phrase: r.strip().lower().endswith(phrase.strip().lower()),
    "starts_with": lambda r, phrase: r.strip().lower().startswith(phrase.strip().lower()),
    "json": _is_json,
    "no_commas": lambda r: "," not in r,
    "num_paragraphs": lambda r, n: sum(1 for p in re.split(r"\n\s*\n", r) if p.strip()) == n,
}


def validate_constraints(constraints) -> None:
    """Raise ValueError when `constraints` is not a list of known constraint dicts with their parameters.

    >>> validate_constraints([{"type": "max_words", "n": 10}, {"type": "lowercase"}])
    >>> validate_constraints([{"type": "max_words"}])
    Traceback (most recent call last):
    ...
    ValueError: constraint 0 (max_words) needs parameter 'n' (int)
    """
    if not isinstance(constraints, list):
        raise ValueError(f"constraints must be a list of dicts, got {type(constraints).__name__}")
    for i, constraint in enumerate(constraints):
        if not isinstance(constraint, dict) or "type" not in constraint:
            raise ValueError(f"constraint {i} must be a dict with a 'type', got {constraint!r}")
        kind = constraint["type"]
        if kind not in CONSTRAINT_PARAMS:
            raise ValueError(f"constraint {i}: unknown type {kind!r}; known types: {', '.join(CONSTRAINT_PARAMS)}")
        for name, kind_of in CONSTRAINT_PARAMS[kind]:
            value = constraint.get(name)
            # bool is an int subclass, but {"n": True} is a data bug, not a count.
            if not isinstance(value, kind_of) or isinstance(value, bool):
                raise ValueError(f"constraint {i} ({kind}) needs parameter {name!r} ({kind_of.__name__})")
            if kind_of is int and value < 0 or kind_of is str and not value.strip():
                raise ValueError(f"constraint {i} ({kind}): parameter {name!r} must be non-negative/non-empty")


def check_constraint(constraint: dict, response: str) -> bool:
    """True when `response` meets `constraint` (`{"type": ..., **params}`); ValueError for an unknown type.

    >>> check_constraint({"type": "keyword_present", "keyword": "llama"}, "Llamas hum; a llama spits.")
    True
    >>> check_constraint({"type": "num_bullets", "n": 2}, "- one\\n- two\\n- three")
    False
    """
    validate_constraints([constraint])
    params = {name: constraint[name] for name, _ in CONSTRAINT_PARAMS[constraint["type"]]}
    return bool(_CHECKS[constraint["type"]](response, **params))
