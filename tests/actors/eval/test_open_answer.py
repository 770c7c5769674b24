"""ANLS, relaxed accuracy, exact match, ScienceQA match, on hand-computed cases.

Sources: EvolvingLMMs-Lab/lmms-eval lmms_eval/api/metrics.py (anls, levenshtein_distance,
exact_match_hf_evaluate), lmms_eval/tasks/chartqa/utils.py (relaxed_correctness),
lmms_eval/tasks/gqa/gqa.yaml (exact_match, ignore_case, ignore_punctuation),
lmms_eval/tasks/scienceqa/utils.py (sqa_process_results); VLMEvalKit
vlmeval/dataset/utils/vqa_eval.py (anls_compute, hit_calculate: threshold 0.5).
"""

import pytest

from actors.eval.open_answer import (anls, exact_match, levenshtein, relaxed_accuracy,
                                     relaxed_correctness, scienceqa_match)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_anls_by_hand():
    # "hallo" vs "hello": distance 1 over max(5, 5) -> 1 - 0.2 = 0.8
    assert anls("Hello", ["hallo"]) == pytest.approx(0.8)
    # best answer counts: min distance over answers
    assert anls("Hello", ["xyz", "hello"]) == 1.0
    # "abcdef" vs "abc": distance 3 / 6 = 0.5 -> 0.5 (not below the threshold)
    assert anls("abcdef", ["abc"]) == pytest.approx(0.5)
    # "abcdefg" vs "abc": 4 / 7 -> 3/7 < 0.5 -> 0
    assert anls("abcdefg", ["abc"]) == 0.0
    # case and inner whitespace are normalised, but the length uses the raw strings
    assert anls("  New   York ", ["new york"]) == 1.0


def test_relaxed_accuracy_by_hand():
    assert relaxed_correctness("104", "100")          # 4 % off
    assert not relaxed_correctness("106", "100")      # 6 % off
    assert relaxed_correctness("12%", "0.125")        # 0.12 vs 0.125: 4 % off
    assert relaxed_correctness("Yes", "yes")          # not numbers: case-insensitive exact
    assert not relaxed_correctness("0.01", "0")       # a zero target needs an exact match
    assert relaxed_correctness("0", "0")
    assert relaxed_accuracy(" 95 ", ["100", "abc"]) == 1.0


def test_exact_match_gqa():
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match(" the table ", ["The table"]) == 1.0
    assert exact_match("table", ["the table"]) == 0.0  # no article removal in GQA


def test_scienceqa_match():
    assert scienceqa_match("B", "B") == 1.0
    assert scienceqa_match("b", "B") == 1.0
    assert scienceqa_match("B. a magnet", "B") == 1.0
    assert scienceqa_match("C. a magnet", "B") == 0.0
    assert scienceqa_match("The answer is B", "B") == 0.0


def test_first_word_the_demo_key():
    # this project's closed-vocabulary match (pipelines.demo): the first word, lowercased,
    # "###" separators and surrounding punctuation stripped
    from actors.eval import open_answer

    assert open_answer.first_word(" Red.\n###") == "red"
    assert open_answer.first_word("3###") == "3" and open_answer.first_word("") == ""
    assert open_answer.first_word("'circle', I think") == "circle"
    assert open_answer.first_word_match("Circle square", ["circle"]) == 1.0
    assert open_answer.first_word_match("a circle", ["circle"]) == 0.0  # not exact match's "contains"
