"""Build the instruction-following prompt sets of the default recipe from templates.

    python -m data_gen.make_ifeval_prompts            # rewrites the two files below (deterministic)

writes
    data_gen/prompts/ifeval_train.jsonl   the training pool: 320 prompts
    evals/data/ifeval_heldout.jsonl       the held-out set: 48 prompts, other topics and other task templates

Each row is `{"id", "prompt", "constraints": [...]}`: a task ("Describe volcanoes.") on a topic, followed by one or
two IFEval-style constraints stated in words ("Answer in 20 words or fewer."), and the same constraints as
checkable dicts for `reward.verifiers.InstructionFollowing` (types in reward/ifeval.py).

The constraint types are the ones SmolLM2-135M-Instruct meets sometimes but not always (measured on its greedy
and sampled answers, 64 new tokens): a length in words or sentences, a first word, a keyword, exactly 3 bullets,
no commas. Types it (nearly) never meets (lowercase, uppercase, ends_with) give best-of-K nothing to pick, so they
are left out. Training and held-out prompts share constraint wording but no topic and no task template, so the
held-out check (ids and normalised text) passes and held-out compliance measures instruction following, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAIN_TOPICS = [
    "the ocean", "volcanoes", "honeybees", "the moon", "bicycles", "coffee", "chess", "rainforests", "penguins",
    "trains", "guitars", "libraries", "recycling", "sleep", "elephants", "thunderstorms", "gardening",
    "the Roman Empire", "solar panels", "football", "cats", "mountains", "baking bread", "airplanes", "jazz",
    "friendship", "rivers", "snow", "dinosaurs", "computers", "green tea", "museums", "marathons", "bridges",
    "owls", "the sun", "cheese", "painting", "kites", "robots", "castles", "whales", "camping", "yoga",
    "deserts", "the piano", "butterflies", "earthquakes", "chocolate", "swimming", "forests", "maps",
    "dolphins", "bees and flowers", "clocks", "tigers", "farming", "the weather", "photography", "volunteering",
    "rice", "city buses", "space travel", "dogs",
]
HELDOUT_TOPICS = [
    "lighthouses", "glaciers", "octopuses", "origami", "the violin", "submarines", "hot air balloons", "tulips",
    "wolves", "public parks", "comets", "pottery", "sushi", "windmills", "fireflies", "the Arctic",
    "skateboarding", "coral reefs", "board games", "hedgehogs", "waterfalls", "rainbows", "telescopes",
    "volleyball",
]
TRAIN_TASKS = [
    "Describe {t}.",
    "Tell me about {t}.",
    "Write a short paragraph about {t}.",
    "Give some tips about {t}.",
    "Explain the appeal of {t}.",
    "What is interesting about {t}?",
]
HELDOUT_TASKS = [
    "What should a beginner know about {t}?",
    "Share a few thoughts on {t}.",
    "Write a brief introduction to {t}.",
]

KEYWORDS = ["important", "simple", "amazing", "history", "nature", "people", "special", "world", "beautiful",
            "useful"]
FIRST_WORDS = ["Sure", "Yes", "Well", "Certainly", "Absolutely", "Indeed", "Honestly"]


def _max_words(rng: random.Random):
    n = rng.choice([15, 20, 25, 30])
    text = rng.choice([f"Answer in {n} words or fewer.", f"Use at most {n} words.",
                       f"Keep your answer to {n} words or less.", f"Your reply must not exceed {n} words."])
    return {"type": "max_words", "n": n}, text


def _max_sentences(rng: random.Random):
    n = rng.choice([1, 2, 3])
    if n == 1:
        text = rng.choice(["Answer in a single sentence.", "Reply with one sentence only."])
    else:
        text = rng.choice([f"Answer in {n} sentences or fewer.", f"Use no more than {n} sentences."])
    return {"type": "max_sentences", "n": n}, text


def _starts_with(rng: random.Random):
    word = rng.choice(FIRST_WORDS)
    text = rng.choice([f"Begin your answer with the word '{word}'.", f"Start your reply with '{word}'.",
                       f"The first word of your answer must be '{word}'."])
    return {"type": "starts_with", "phrase": word}, text


def _keyword(rng: random.Random):
    word = rng.choice(KEYWORDS)
    text = rng.choice([f"Include the word '{word}' in your answer.", f"Make sure to use the word '{word}'.",
                       f"Your answer must contain the word '{word}'."])
    return {"type": "keyword_present", "keyword": word}, text


def _bullets(rng: random.Random):
    text = rng.choice(["Answer with exactly 3 bullet points, each line starting with '- '.",
                       "Give exactly 3 bullet points (lines that start with '- ') and nothing else.",
                       "Format your answer as exactly 3 bullet points using '- '."])
    return {"type": "num_bullets", "n": 3}, text


def _no_commas(rng: random.Random):
    text = rng.choice(["Do not use any commas in your answer.", "Avoid commas entirely.",
                       "Write your reply without a single comma."])
    return {"type": "no_commas"}, text


MAKERS = {"max_words": _max_words, "max_sentences": _max_sentences, "starts_with": _starts_with,
          "keyword_present": _keyword, "num_bullets": _bullets, "no_commas": _no_commas}
# Pairs that contradict each other or overlap: bullets are lines, not sentences, and do not start with a word.
CLASHES = {frozenset({"num_bullets", "max_sentences"}), frozenset({"num_bullets", "starts_with"}),
           frozenset({"max_words", "max_sentences"})}


def _constraints(rng: random.Random) -> tuple[list[dict], list[str]]:
    """One constraint (half of the prompts) or two compatible ones."""
    kinds = [rng.choice(list(MAKERS))]
    if rng.random() < 0.5:
        second = rng.choice([k for k in MAKERS if k != kinds[0] and frozenset({k, kinds[0]}) not in CLASHES])
        kinds.append(second)
    made = [MAKERS[k](rng) for k in kinds]
    return [c for c, _ in made], [t for _, t in made]


def build(topics: list[str], tasks: list[str], n: int, prefix: str, seed: int) -> list[dict]:
    """`n` rows: distinct (task, topic) combinations, each with its constraints, shuffled by `seed`."""
    rng = random.Random(seed)
    combos = [(task, topic) for topic in topics for task in tasks]
    rng.shuffle(combos)
    if n > len(combos):
        raise ValueError(f"{n} prompts asked, only {len(combos)} task x topic combinations")
    rows = []
    for i, (task, topic) in enumerate(combos[:n]):
        constraints, texts = _constraints(rng)
        prompt = task.format(t=topic)
        prompt = prompt[0].upper() + prompt[1:] + " " + " ".join(texts)
        rows.append({"id": f"{prefix}-{i:03d}", "prompt": prompt, "constraints": constraints})
    return rows


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    train = build(TRAIN_TOPICS, TRAIN_TASKS, 320, "ifeval-train", seed=0)
    heldout = build(HELDOUT_TOPICS, HELDOUT_TASKS, 48, "ifeval-heldout", seed=1)
    assert not {t.casefold() for t in TRAIN_TOPICS} & {t.casefold() for t in HELDOUT_TOPICS}
    write(train, ROOT / "data_gen" / "prompts" / "ifeval_train.jsonl")
    write(heldout, ROOT / "evals" / "data" / "ifeval_heldout.jsonl")
    print(f"wrote {len(train)} training and {len(heldout)} held-out prompts")


if __name__ == "__main__":
    main()
