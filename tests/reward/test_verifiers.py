"""Tests for the rule-based rewards: final answers, IFEval-style constraints, length penalty."""

import doctest

import pytest

import reward.ifeval
import reward.verifiers
from reward.protocol import Reward
from reward.verifiers import (
    InstructionFollowing,
    LengthPenalty,
    MathAnswer,
    check_constraint,
    extract_final_answer,
    same_answer,
    validate_constraints,
)


@pytest.mark.parametrize("module", [reward.verifiers, reward.ifeval])
def test_docstring_examples_hold(module):
    assert doctest.testmod(module).failed == 0


def test_rewards_follow_the_protocol():
    for reward_fn in (MathAnswer(), InstructionFollowing(), LengthPenalty(max_words=5)):
        assert isinstance(reward_fn, Reward)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("Half of 2,000 is 1,000.\n#### 1,000", "1000"),
        ("#### 5\nlater text\n#### 6", "6"),  # the last GSM8K line
        ("So x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces kept whole
        ("First \\boxed{3}, then corrected: \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("$\\boxed{\\text{(B)}}$", "(B)"),
        ("\\boxed 7", "7"),
        ("The answer is 42.", "42"),
        ("the answer is 3.50 dollars.", "3.5"),  # equal as numbers
        ("THE ANSWER IS: $1,234,567.00$", "1234567"),
        ("Final answer: -3/4", "-3/4"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("I guess the answer is 12. Checking again... final answer: 13", "13"),  # last occurrence
        ("The answer is x = 7.", "7"),
        ("The answer is 50%.", "50"),
        ("The answer is (1, 2).", "(1, 2)"),  # a pair, not a thousands separator
        ("the answer is 12\n#### 13", "13"),  # GSM8K's marker comes first
        ("\\boxed{4} and the answer is 5", "4"),  # \boxed before the phrase
        ("Let me see what the answer is. First, add them.", None),
        ("I computed 12 apples.", None),
        ("", None),
        # Text after the answer, markdown, units, headings, LaTeX spellings (math-verify compares them).
        ("The answer is 7, since 3 + 4 = 7.", "7"),
        ("The answer is 72!", "72"),
        ("The answer is **72**.", "72"),
        ("The answer is 60 km/h.", "60"),
        ("#### Step 1: add them\n3 + 4 = 7\n#### 7", "7"),
        ("#### Step 1: add them\nThe answer is 7.", "7"),  # a markdown heading is not a GSM8K answer
        ("The answer is \\frac12.", "1/2"),
        ("The answer is 1{,}000.", "1000"),
        ("The answer is \u22125.", "-5"),  # the Unicode minus
        ("The answer is 1 2/3.", "5/3"),  # a mixed number, not 12/3
    ],
)
def test_extract_final_answer(text, expected):
    got = extract_final_answer(text)
    assert (got is None) == (expected is None), got
    assert expected is None or same_answer(got, expected), (got, expected)


def test_a_mixed_number_is_not_its_digits_run_together():
    assert MathAnswer()([{"answer": "4"}], ["The answer is 1 2/3."]) == [0.0]
    assert MathAnswer()([{"answer": "5/3"}], ["The answer is 1 2/3."]) == [1.0]


@pytest.mark.parametrize(
    "reference, response, score",
    [
        ("#### 72", "She sold 72 clips.\n#### 72", 1.0),
        ("He has 5 + 5 = 10.\n#### 1,000", "The answer is 1000.", 1.0),  # GSM8K-form reference, commas
        ("3.5", "The answer is 3.50", 1.0),
        ("\\frac{1}{2}", "The answer is 0.5.", 1.0),
        ("1/2", "$\\boxed{\\dfrac{1}{2}}$", 1.0),
        ("-\\frac{3}{4}", "\\boxed{-0.75}", 1.0),
        ("\\boxed{x^2+1}", "\\boxed{x^2 + 1}", 1.0),
        (42, "#### 42", 1.0),  # a numeric reference field
        ("72", "#### 73", 0.0),
        ("0.333", "\\boxed{\\frac{1}{3}}", 0.0),  # exact comparison, no rounding
        ("72", "I think it is 72.", 0.0),  # nothing extracted
    ],
)
def test_math_answer(reference, response, score):
    assert MathAnswer()([{"prompt_id": "p", "answer": reference}], [response]) == [score]


def test_math_answer_is_none_without_a_reference():
    prompts = [{"prompt_id": "a"}, {"prompt_id": "b", "answer": None}, {"prompt_id": "c", "answer": "  "}]
    assert MathAnswer()(prompts, ["#### 1"] * 3) == [None, None, None]


def test_math_answer_reads_its_key():
    prompts = [{"prompt_id": "a", "solution": "#### 9", "answer": "8"}]
    assert MathAnswer(answer_key="solution")(prompts, ["#### 9"]) == [1.0]


def test_math_answer_needs_aligned_batches():
    with pytest.raises(ValueError):
        MathAnswer()([{"prompt_id": "a", "answer": "1"}], ["#### 1", "#### 2"])


BULLETS = "Intro\n- one\n* two\n- three\n**bold** line\n---"

CASES = [  # (constraint, response that meets it, response that does not)
    ({"type": "max_words", "n": 3}, "Stop right now.", "Don't stop now."),  # IFEval: "don't" is two words
    ({"type": "min_words", "n": 3}, "one two three", "one two"),
    ({"type": "max_sentences", "n": 2}, "It costs 3.5 dollars. Buy it!", "One. Two. Three?"),
    ({"type": "lowercase"}, "all lower, 123.", "Not lower"),
    ({"type": "uppercase"}, "THE WEATHER IS NICE TODAY!", "ALL CAPS but one"),  # and English, by langdetect
    ({"type": "num_bullets", "n": 4}, BULLETS, "- only\n- two"),  # IFEval counts the "---" rule too
    ({"type": "keyword_present", "keyword": "llama"}, "Llamas and llamalike alpacas", "Alpacas only"),
    ({"type": "keyword_present", "keyword": "C++"}, "I write C++ daily", "I write C daily"),
    ({"type": "keyword_absent", "keyword": "sorry"}, "Unsorry-ish? No: unsorry.", "I'm Sorry."),
    ({"type": "ends_with", "phrase": "Is there anything else?"}, "Done. Is there anything else?  \n", "Bye."),
    ({"type": "starts_with", "phrase": "Dear Sir"}, "  dear sir, hello", "Hello, dear sir"),
    ({"type": "json"}, '```json\n{"a": [1, 2]}\n```', '{"a": 1} trailing'),
    ({"type": "json"}, '  [1, 2, 3]\n', "Here it is: {}"),
    ({"type": "no_commas"}, "No commas here.", "One, two"),
    ({"type": "num_paragraphs", "n": 2}, "First para\n\nstill first.\n***\nSecond.", "One\n\nparagraph only"),
]


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_check_constraint(constraint, good, bad):
    assert check_constraint(constraint, good) is True
    assert check_constraint(constraint, bad) is False


def test_every_constraint_type_is_tested():
    assert {c["type"] for c, _, _ in CASES} == set(reward.ifeval.CONSTRAINT_PARAMS)


def test_unknown_constraint_type_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match="unknown type 'rhyme'.*max_words.*num_paragraphs"):
        check_constraint({"type": "rhyme"}, "text")


@pytest.mark.parametrize(
    "constraints, message",
    [
        ({"type": "lowercase"}, "must be a list"),
        (["lowercase"], "must be a dict with a 'type'"),
        ([{"n": 3}], "must be a dict with a 'type'"),
        ([{"type": "lowercase"}, {"type": "shout"}], "constraint 1: unknown type 'shout'"),
        ([{"type": "max_words"}], "needs parameter 'n'"),
        ([{"type": "max_words", "n": "3"}], "needs parameter 'n'"),
        ([{"type": "max_words", "n": True}], "needs parameter 'n'"),
        ([{"type": "min_words", "n": -1}], "non-negative"),
        ([{"type": "keyword_absent", "keyword": " "}], "non-empty"),
    ],
)
def test_validate_constraints_rejects(constraints, message):
    with pytest.raises(ValueError, match=message):
        validate_constraints(constraints)


def test_instruction_following_scores_the_fraction_met():
    constraints = [{"type": "lowercase"}, {"type": "no_commas"}, {"type": "max_words", "n": 4}]
    prompts = [{"prompt_id": "a", "constraints": constraints}] * 3
    responses = ["short and lower", "Short, and Not lower at all", "lower, but with commas"]
    assert InstructionFollowing()(prompts, responses) == [1.0, 0.0, pytest.approx(2 / 3)]
    assert InstructionFollowing(strict=True)(prompts, responses) == [1.0, 0.0, 0.0]


def test_instruction_following_none_without_constraints_and_reads_json_text():
    prompts = [
        {"prompt_id": "a"},
        {"prompt_id": "b", "constraints": []},
        {"prompt_id": "c", "constraints": '[{"type": "uppercase"}]'},
        {"prompt_id": "d", "rules": [{"type": "uppercase"}]},
    ]
    assert InstructionFollowing()(prompts, ["THE WEATHER IS NICE TODAY"] * 4) == [None, None, 1.0, None]
    assert InstructionFollowing(constraints_key="rules")(prompts[3:], ["x"]) == [0.0]


def test_instruction_following_raises_on_an_unknown_type():
    with pytest.raises(ValueError, match="unknown type 'haiku'"):
        InstructionFollowing()([{"prompt_id": "a", "constraints": [{"type": "haiku"}]}], ["text"])


def test_length_penalty():
    prompts = [{"prompt_id": str(i)} for i in range(3)]
    responses = ["one two", "one two three four five", ""]
    assert LengthPenalty(max_words=3)(prompts, responses) == [0.0, pytest.approx(-0.02), 0.0]
    assert LengthPenalty(target_words=3, per_word=0.5)(prompts, responses) == [-0.5, -1.0, -1.5]
    assert LengthPenalty(target_words=2)(prompts[:1], responses[:1]) == [0.0]


@pytest.mark.parametrize("kwargs", [{}, {"max_words": 5, "target_words": 5}, {"max_words": 5, "per_word": -1}])
def test_length_penalty_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        LengthPenalty(**kwargs)
