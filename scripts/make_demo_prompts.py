"""Write the demo prompts: instructions carrying verifiable constraints, for the `rule` oracle.

    python scripts/make_demo_prompts.py            # -> data/demo_train.jsonl, data/demo_heldout.jsonl

Each row is {"id", "prompt", "constraints"}; the constraint types are defined in docs/rule_oracle.md (and
checked by the rule oracle). Each prompt is a simple task on an everyday topic (things a 135M
instruct model can write about) plus one to three constraints, stated in words in the prompt. The
same seed gives the same files byte for byte.
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: common.py
from common import UserError, cli  # noqa: E402

# topic -> words that fit it, for "include" constraints (a model on topic uses them naturally)
TOPICS = {
    "the water cycle": ["rain", "cloud"], "the moon": ["light", "night"], "honeybees": ["flower", "honey"],
    "volcanoes": ["lava", "mountain"], "a trip to the beach": ["sand", "waves"], "saving money": ["budget", "bank"],
    "drinking enough water": ["health", "thirst"], "a friendly robot": ["metal", "help"],
    "the history of bread": ["flour", "oven"], "recycling": ["plastic", "waste"], "a lost cat": ["home", "search"],
    "morning routines": ["coffee", "breakfast"], "winter": ["snow", "cold"], "the ocean": ["fish", "salt"],
    "trees": ["leaves", "roots"], "a birthday party": ["cake", "friends"], "time management": ["plan", "schedule"],
    "the solar system": ["planet", "sun"], "dogs as pets": ["walk", "loyal"], "daily exercise": ["muscles", "energy"],
    "reading books": ["story", "library"], "a mountain village": ["stone", "quiet"], "rainbows": ["colors", "sunlight"],
    "learning to play chess": ["board", "move"], "gardening": ["soil", "seeds"], "the internet": ["computer", "website"],
    "learning music": ["practice", "song"], "friendship": ["trust", "together"], "a snowstorm": ["wind", "white"],
    "cooking pasta": ["boil", "sauce"], "a good night's sleep": ["bed", "rest"], "a train journey": ["station", "window"],
    "bicycles": ["wheel", "ride"], "the desert": ["sand", "heat"], "elephants": ["trunk", "herd"],
    "learning a new language": ["words", "practice"], "a city park": ["bench", "grass"], "keeping a diary": ["write", "day"],
    "the first day of school": ["teacher", "class"], "a thunderstorm": ["lightning", "thunder"],
}
TASKS = [
    "Write a short story about {t}.", "Explain {t} in simple words.", "Describe {t}.",
    "Write a short poem about {t}.", "Give some practical tips about {t}.", "Write a short blog post about {t}.",
    "Write a letter to a friend about {t}.", "Share some interesting facts about {t}.",
    "Why do people care about {t}? Explain.", "Write a short speech about {t}.",
]
BANNED = ["very", "really", "also", "important", "however", "many", "thing", "great"]
START = ["Here is", "Sure", "In short", "Once upon a time", "Dear friend"]
END = ["Hope this helps!", "Is there anything else I can help with?", "That is all.", "Thank you for reading."]


def make_constraint(kind, rng, keywords):
    """One constraint of `kind` with random parameters, and the sentence that asks for it."""
    if kind == "max_words":
        n = rng.choice([20, 30, 50, 80])
        return {"type": kind, "n": n}, f"Answer in at most {n} words."
    if kind == "min_words":
        n = rng.choice([30, 50, 80])
        return {"type": kind, "n": n}, f"Write at least {n} words."
    if kind == "include_words":
        chosen = rng.sample(keywords, rng.choice([1, 2]))
        said = " and ".join(f'"{w}"' for w in chosen)
        return {"type": kind, "words": chosen}, f"Include the word{'s' if len(chosen) > 1 else ''} {said}."
    if kind == "exclude_words":
        chosen = rng.sample(BANNED, rng.choice([1, 2]))
        said = " or ".join(f'"{w}"' for w in chosen)
        return {"type": kind, "words": chosen}, f"Do not use the word{'s' if len(chosen) > 1 else ''} {said}."
    if kind == "lowercase":
        return {"type": kind}, "Write your whole answer in lowercase letters, with no capital letters at all."
    if kind == "uppercase":
        return {"type": kind}, "Write your whole answer in capital letters only."
    if kind == "bullets":
        n = rng.choice([3, 4, 5])
        return {"type": kind, "n": n}, f'Answer with exactly {n} markdown bullet points (lines that start with "- ").'
    if kind == "paragraphs":
        n = rng.choice([2, 3])
        return {"type": kind, "n": n}, f"Write exactly {n} paragraphs, separated by a blank line."
    if kind == "start_with":
        phrase = rng.choice(START)
        return {"type": kind, "phrase": phrase}, f'Start your answer with "{phrase}".'
    if kind == "end_with":
        phrase = rng.choice(END)
        return {"type": kind, "phrase": phrase}, f'End your answer with the exact phrase "{phrase}".'
    if kind == "json":
        return {"type": kind}, "Format your entire answer as valid JSON."
    if kind == "no_commas":
        return {"type": kind}, "Do not use any commas in your answer."
    raise ValueError(kind)


KINDS = ["max_words", "min_words", "include_words", "exclude_words", "lowercase", "uppercase", "bullets",
         "paragraphs", "start_with", "end_with", "json", "no_commas"]
# Pairs no answer can meet together, or that make the check ambiguous (a bullet list's paragraphs).
CONFLICTS = [{"max_words", "min_words"}, {"lowercase", "uppercase"}, {"bullets", "paragraphs"}, {"json", "bullets"},
             {"json", "paragraphs"}, {"json", "start_with"}, {"json", "end_with"}, {"json", "no_commas"},
             {"json", "lowercase"}, {"json", "uppercase"}]


def make_prompt(rng):
    """(prompt text, constraints) for one random task, topic and one to three compatible constraints."""
    topic = rng.choice(sorted(TOPICS))
    n = rng.choices([1, 2, 3], weights=[1, 2, 1])[0]
    kinds = []
    for kind in rng.sample(KINDS, len(KINDS)):
        if len(kinds) < n and not any({kind, k} in CONFLICTS for k in kinds):
            kinds.append(kind)
    made = [make_constraint(k, rng, TOPICS[topic]) for k in kinds]
    text = " ".join([rng.choice(TASKS).format(t=topic)] + [sentence for _, sentence in made])
    return text, [c for c, _ in made]


def main(out_dir="data", n_train=240, n_heldout=60, seed=0):
    """Write <out_dir>/demo_train.jsonl and <out_dir>/demo_heldout.jsonl.

    Args:
        out_dir: folder of the two files
        n_train: prompts in the train split
        n_heldout: prompts in the held-out split (never in the train split)
        seed: seed of every random choice; the same seed writes the same files
    """
    if n_train < 1 or n_heldout < 1:
        raise UserError("--n_train and --n_heldout must be at least 1")
    rng = random.Random(seed)
    prompts, seen = [], set()
    for _ in range(100 * (n_train + n_heldout)):
        text, constraints = make_prompt(rng)
        if text not in seen:  # a prompt in both splits would leak the held-out set into training
            seen.add(text)
            prompts.append((text, constraints))
        if len(prompts) == n_train + n_heldout:
            break
    else:
        raise UserError(f"only {len(prompts)} distinct prompts could be made; ask for fewer")
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", prompts[:n_train]), ("heldout", prompts[n_train:])):
        path = os.path.join(out_dir, f"demo_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i, (text, constraints) in enumerate(part):
                f.write(json.dumps({"id": f"{split}-{i:04d}", "prompt": text, "constraints": constraints},
                                   ensure_ascii=False) + "\n")
        print(f"{len(part)} prompts -> {path}")


if __name__ == "__main__":
    cli(main)
