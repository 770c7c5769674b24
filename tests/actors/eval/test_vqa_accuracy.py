"""The official VQA accuracy, on hand-computed cases.

Source: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00):
VQAEval.evaluate (normalise only when the humans disagree; per human answer min(1, matches among the
other 9 / 3), averaged), processPunctuation, processDigitArticle.
"""

import pytest

from actors.eval.vqa_accuracy import (CONTRACTIONS, normalize_answer, process_digit_article,
                                      process_punctuation, vqa_accuracy)


def test_two_matches_leave_one_out_by_hand():
    # 10 humans: "2" twice, "3" eight times; prediction "Two" -> "2".
    # leave out a "2": the other 9 hold one "2" -> min(1, 1/3) = 1/3   (2 subsets)
    # leave out a "3": the other 9 hold two "2" -> min(1, 2/3) = 2/3   (8 subsets)
    # mean = (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6
    acc, pred = vqa_accuracy("Two", ["2", "2"] + ["3"] * 8)
    assert pred == "2"
    assert acc == pytest.approx(0.6)


def test_three_and_four_matches():
    # 3 matches: leaving out a match -> 2/3 (3 times), else 3/3 -> 1 (7 times): (2 + 7) / 10 = 0.9
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7)[0] == pytest.approx(0.9)
    # 4 matches: every subset still has >= 3 -> 1.0
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6)[0] == pytest.approx(1.0)
    # 1 match: leaving it out -> 0; otherwise 1/3 (9 times): 9/30 = 0.3
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9)[0] == pytest.approx(0.3)


def test_number_words_map_to_digits():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("none") == "0"
    assert normalize_answer("ten") == "10"
    assert normalize_answer("eleven") == "eleven"  # the map stops at ten


def test_article_and_period():
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("A dog") == "dog"
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays


def test_contractions_restored_and_apostrophe_kept():
    assert process_digit_article("dont") == "don't"
    assert process_digit_article("whats up") == "what's up"
    # the official list has no apostrophe, so "it's" survives punctuation processing unchanged
    assert process_punctuation("it's") == "it's"
    assert normalize_answer("It's") == "it's"
    assert len(CONTRACTIONS) == 120


def test_punctuation_space_vs_removal():
    # "-" with no space around it becomes a space; next to a space it is removed
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("yes - no") == "yes  no"
    # a comma between digits anywhere switches every punctuation mark to removal
    assert process_punctuation("1,000 t-shirt") == "1000 tshirt"


def test_unanimous_humans_are_not_normalised():
    # all 10 humans say "2": no normalisation at all, so "two" does not match
    assert vqa_accuracy("two", ["2"] * 10)[0] == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10)[0] == 1.0  # only strip / newline handling
    # one disagreeing human switches normalisation on for everyone
    assert vqa_accuracy("two", ["2"] * 9 + ["3"])[0] == pytest.approx(1.0)


def test_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
