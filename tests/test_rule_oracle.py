"""The rule oracle: each constraint check on a passing and a failing response, the score, P's invariants."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from common import UserError
import oracle
from oracle import (CHECKS, CREDITS, DEFAULT_TEMPERATURE, PARTIAL, RuleOracle, constraint_problem, constraint_score,
                    credit, meets)

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
    (P,) = RuleOracle(credit="binary").pref([row])
    assert P.shape == (4, 4)
    assert np.all(np.diag(P) == 0.5) and np.all(P + P.T == 1.0)
    assert P[0, 3] == 0.5  # equal scores
    assert P[0, 1] == pytest.approx(1 / (1 + math.exp(-0.5 / DEFAULT_TEMPERATURE)))
    assert P[0, 2] == pytest.approx(1 / (1 + math.exp(-1.0 / DEFAULT_TEMPERATURE)))
    (P2,) = RuleOracle(temperature=1.0, credit="binary").pref([row])
    assert 0.5 < P2[0, 1] < P[0, 1]  # a higher temperature gives a softer preference
    # Graded (the default): "Tiny answer" has 1 of 10 letters in upper case -> 0.9 for lowercase; the long
    # answer 3/5 for max_words and 1 - 5/19 for lowercase.
    (G,) = RuleOracle().pref([row])
    assert np.all(np.diag(G) == 0.5) and np.all(G + G.T == 1.0) and G[0, 3] == 0.5
    assert G[0, 1] == pytest.approx(1 / (1 + math.exp(-(1 - 0.95) / DEFAULT_TEMPERATURE)))
    long_score = (3 / 5 + 1 - 5 / 19) / 2
    assert G[0, 2] == pytest.approx(1 / (1 + math.exp(-(1 - long_score) / DEFAULT_TEMPERATURE)))
    assert G[1, 2] > 0.5  # near misses are ranked, where binary credit called both 1/2 ... and 0


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


# ------------------------------------------------------------------------------ graded credit
# (constraint, [(response, its graded credit)]): at the boundary (met: 1), just past it, and far from it.
GRADED = [
    ({"type": "max_words", "n": 4}, [("a b c d", 1.0), ("a b c d e", 4 / 5), ("a b c d e f g h", 1 / 2)]),
    ({"type": "min_words", "n": 4}, [("a b c d", 1.0), ("a b c", 3 / 4), ("a", 1 / 4)]),
    ({"type": "include_words", "words": ["sun", "moon", "star"]}, [("Sun, moon and a star.", 1.0),
                                                                  ("The sun and moon.", 2 / 3), ("Nothing.", 0.0)]),
    ({"type": "exclude_words", "words": ["very", "really"]}, [("Fine.", 1.0), ("Very fine.", 1 / 2),
                                                             ("Really very fine.", 0.0)]),
    ({"type": "lowercase"}, [("all lower", 1.0), ("All lower", 7 / 8), ("ALL LOWEr", 1 / 8), ("123", 0.0)]),
    ({"type": "uppercase"}, [("ALL UPPER", 1.0), ("ALL UPPEr", 7 / 8), ("all upper", 0.0)]),
    ({"type": "bullets", "n": 3}, [("- a\n- b\n- c", 1.0), ("- a\n- b", 2 / 3), ("- a\n- b\n- c\n- d", 3 / 4),
                                   ("no list", 0.0)]),
    ({"type": "paragraphs", "n": 2}, [("a\n\nb", 1.0), ("a\n\nb\n\nc", 2 / 3), ("a b", 1 / 2)]),
    ({"type": "start_with", "phrase": "Once upon"}, [("once upon a time", 1.0), ("Once a time", 5 / 9),
                                                    ("So, once upon a time", 1 / 2), ("Hello", 0.0)]),
    ({"type": "end_with", "phrase": "That is all."}, [("Done. That is all.", 1.0), ("Done. this is all.", 8 / 12),
                                                     ("That is all. Bye", 1 / 2), ("Done", 0.0)]),
    ({"type": "json"}, [('{"a": 1}', 1.0), ('Here it is: {"a": 1} enjoy', 1 / 2), ("{'a': 1}", 0.0)]),
    ({"type": "no_commas"}, [("No commas.", 1.0), ("One, two.", 1 / 2), ("a, b, c, d", 1 / 4)]),
]


@pytest.mark.parametrize("constraint, cases", GRADED, ids=[c["type"] for c, _ in GRADED])
def test_graded_credit_at_and_around_its_boundary(constraint, cases):
    for response, expected in cases:
        assert credit(response, constraint) == pytest.approx(expected), response
        assert credit(response, constraint, "binary") == float(meets(response, constraint))
    # farther from meeting it earns less (the cases of a type go from met to far, but for a phrase or a
    # count an overshoot and an undershoot need not be ordered)
    values = [credit(r, constraint) for r, _ in cases]
    assert values[0] == 1.0 and max(values[1:]) < 1.0


def test_every_type_has_a_graded_credit():
    assert set(PARTIAL) == set(CHECKS) == {c["type"] for c, _ in GRADED}


def test_graded_credit_is_one_exactly_when_met():
    """Over many responses built from the pieces checks look at, credit 1 <=> met, and 0 <= credit <= 1."""
    rng = np.random.default_rng(0)
    pieces = ["sun", "Moon", "STAR", "very", ",", "\n", "\n\n", "- ", "* ", "{", "}", '"a": 1', "[1]", "Once upon",
              "That is all.", "x", "A", "é", "É", "ß", "42", " ", "```json\n", "\n```"]
    constraints = [c for c, _ in GRADED] + [{"type": "bullets", "n": 0}, {"type": "max_words", "n": 0},
                                            {"type": "paragraphs", "n": 0}, {"type": "min_words", "n": 1}]
    for _ in range(1000):
        response = "".join(rng.choice(pieces, size=rng.integers(0, 12)))
        for c in constraints:
            value = credit(response, c)
            assert 0.0 <= value <= 1.0, (response, c)
            assert (value == 1.0) == meets(response, c), (response, c, value)


def test_binary_score_unchanged_and_graded_score_is_the_mean_credit():
    constraints = [{"type": "max_words", "n": 3}, {"type": "lowercase"}, {"type": "no_commas"}]
    text = "Far, too long a text"  # 5 words; 1 capital of 15 letters; 1 comma
    assert constraint_score(text, constraints) == constraint_score(text, constraints, "binary") == 0.0
    assert constraint_score(text, constraints, "graded") == pytest.approx((3 / 5 + 14 / 15 + 1 / 2) / 3)
    assert constraint_score("  ", constraints, "graded") == 0.0
    assert CREDITS[0] == "graded" and RuleOracle().credit == "graded"
    with pytest.raises(UserError, match="--rule_credit must be one of graded, binary"):
        RuleOracle(credit="half")


def test_cli_rule_credit_is_recorded_and_checked(tmp_path):
    data, out = tmp_path / "responses.jsonl", tmp_path / "scored.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "p", "constraints": [{"type": "max_words", "n": 2}],
                                "responses": ["one two three", "one two three four"]}) + "\n")
    score = lambda **flags: oracle.main(data=str(data), out=str(out), oracle="rule", **flags)  # noqa: E731
    score(rule_credit="binary")
    row = json.loads(out.read_text())
    assert row["oracle"]["credit"] == "binary" and row["pref"][0][1] == 0.5  # both miss: a tie
    out.unlink()
    score()
    row = json.loads(out.read_text())
    assert row["oracle"]["credit"] == "graded" and row["pref"][0][1] > 0.5  # 2/3 beats 2/4
    with pytest.raises(UserError, match="differs from this run's"):  # resuming with another credit
        score(rule_credit="binary")
    with pytest.raises(UserError, match="--rule_credit must be one of graded, binary, not 'half'"):
        score(rule_credit="half")
    with pytest.raises(UserError, match="--rule_credit is an option of --oracle rule"):
        oracle.main(data=str(data), out=str(tmp_path / "o.jsonl"), oracle="judge", rule_credit="binary")
