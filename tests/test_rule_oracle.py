"""The rule oracle: each constraint check on a passing and a failing response, the score, P's invariants."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from common import UserError
from oracle import CHECKS, DEFAULT_TEMPERATURE, RuleOracle, constraint_problem, constraint_score, meets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (constraint, a response that meets it, one that does not)
CASES = [
    ({"type": "max_words", "n": 5}, "One two three, four five.", "One two three four five six."),
    ({"type": "max_words", "n": 3}, "Yes - it is.", "Yes it is so."),  # a lone dash is not a word
    ({"type": "min_words", "n": 4}, "one two three four", "one two three"),
    ({"type": "include_words", "words": ["river", "Blue sky"]}, "The blue sky above the River.", "The river is wide."),
    ({"type": "include_words", "words": ["cat"]}, "A cat!", "A category of things."),  # whole words only
    ({"type": "exclude_words", "words": ["very"]}, "Everything is fine.", "It is Very good."),
    ({"type": "lowercase"}, "all small letters, 123.", "Not all small."),
    ({"type": "lowercase"}, "ok", "123 456"),  # no letter at all does not count as lowercase
    ({"type": "uppercase"}, "ALL CAPS, 42!", "ALL CAPS but one."),
    ({"type": "bullets", "n": 3}, "Intro:\n- a\n* b\n  \u2022 c\nBye.", "- a\n- b"),
    ({"type": "bullets", "n": 2}, "- a\n- b", "- a\n- b\n- c"),
    ({"type": "paragraphs", "n": 2}, "First part.\n\nSecond part.\n", "One block\nof two lines."),
    ({"type": "paragraphs", "n": 3}, "a\n\nb\n \nc", "a\n\nb"),
    ({"type": "start_with", "phrase": "Here is"}, "  here is my answer.", "My answer: here is."),
    ({"type": "end_with", "phrase": "Hope this helps!"}, "Done. hope this helps!\n", "Hope this helps! More."),
    ({"type": "json"}, '{"a": [1, 2]}', "{'a': 1}"),
    ({"type": "json"}, '```json\n{"a": 1}\n```', "Here is JSON: {\"a\": 1}"),
    ({"type": "no_commas"}, "No commas here.", "One, two."),
]


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_each_check_passes_and_fails(constraint, good, bad):
    assert constraint_problem([constraint]) is None
    assert meets(good, constraint)
    assert not meets(bad, constraint)


def test_every_check_has_a_case():
    assert {c["type"] for c, _, _ in CASES} == set(CHECKS)


def test_score_is_the_fraction_met_and_empty_scores_zero():
    constraints = [{"type": "max_words", "n": 3}, {"type": "lowercase"}, {"type": "no_commas"}]
    assert constraint_score("short and calm", constraints) == 1.0
    assert constraint_score("Short and calm", constraints) == pytest.approx(2 / 3)
    assert constraint_score("Far, Too long a text", constraints) == 0.0
    assert constraint_score("   ", constraints) == 0.0  # would otherwise meet max_words and no_commas


def test_pref_is_a_calibrated_constant_sum_matrix():
    row = {"id": "x", "prompt": "p", "constraints": [{"type": "max_words", "n": 3}, {"type": "lowercase"}],
           "responses": ["tiny answer", "Tiny answer", "Much Too Long An Answer", "tiny answer"]}
    (P,) = RuleOracle().pref([row])
    assert P.shape == (4, 4)
    assert np.all(np.diag(P) == 0.5) and np.all(P + P.T == 1.0)
    assert P[0, 3] == 0.5  # equal scores
    assert P[0, 1] == pytest.approx(1 / (1 + math.exp(-0.5 / DEFAULT_TEMPERATURE)))
    assert P[0, 2] == pytest.approx(1 / (1 + math.exp(-1.0 / DEFAULT_TEMPERATURE)))
    (P2,) = RuleOracle(temperature=1.0).pref([row])
    assert 0.5 < P2[0, 1] < P[0, 1]  # a higher temperature gives a softer preference


@pytest.mark.parametrize("constraints, phrase", [
    (None, "non-empty list"), ([], "non-empty list"), ([{"type": "rhyme"}], "unknown type 'rhyme'"),
    ([{"type": "max_words"}], "'n' must be an integer"), ([{"type": "max_words", "n": True}], "'n' must be an integer"),
    ([{"type": "include_words", "words": []}], "non-empty list of non-empty strings"),
    ([{"type": "end_with", "phrase": 3}], "'phrase' must be a string"), ([{"type": "bullets", "n": -1}], ">= 0"),
])
def test_bad_constraints_are_named(constraints, phrase):
    assert phrase in constraint_problem(constraints)
    with pytest.raises(UserError, match=r"row id 'r1': field 'constraints'"):
        RuleOracle().pref([{"id": "r1", "responses": ["a", "b"], "constraints": constraints}])


def test_demo_prompts_are_valid_and_reproducible(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_demo_prompts.py"), "--out_dir", str(tmp_path)],
                   check=True, capture_output=True)
    ids, prompts = set(), {}
    for split, n in (("train", 240), ("heldout", 60)):
        made = (tmp_path / f"demo_{split}.jsonl").read_text(encoding="utf-8")
        assert made == open(os.path.join(ROOT, "data", f"demo_{split}.jsonl"), encoding="utf-8").read()
        rows = [json.loads(line) for line in made.splitlines()]
        assert len(rows) == n
        for row in rows:
            assert set(row) == {"id", "prompt", "constraints"} and constraint_problem(row["constraints"]) is None
            assert row["id"] not in ids and row["prompt"] not in prompts
            ids.add(row["id"])
            prompts[row["prompt"]] = split
