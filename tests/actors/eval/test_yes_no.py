"""POPE and MME, on hand-computed cases.

Sources: haotian-liu/LLaVA llava/eval/eval_pope.py (POPE's answer rule, TP/FP/TN/FN, yes-ratio of
predictions); lmms-eval lmms_eval/tasks/pope/utils.py (precision/recall/F1, 0 on empty
denominators); lmms-eval lmms_eval/tasks/mme/utils.py (parse_pred_ans, mme_aggregate_results:
acc + acc+ per subtask, x 100); VLMEvalKit vlmeval/dataset/utils/yorn.py (YOrN_Extraction, MME_rating).
"""

import pytest

from actors.eval.yes_no import (extract_mme, extract_pope, extract_yes_no, gt_yes_no, mme_scores,
                                pope_scores)


def test_extractions():
    assert extract_yes_no("Yes, there is.") == "yes"
    assert extract_yes_no("No.") == "no"
    assert extract_yes_no("yes and no") == "unknown"
    assert extract_pope("No, there is not.") == "no"
    assert extract_pope("There is not a dog.") == "no"
    assert extract_pope("Yes. No doubt.") == "yes"  # only the first sentence counts
    assert extract_pope("maybe") == "yes"           # POPE: anything without a no-word is yes
    assert extract_mme("Yes.") == "yes"
    assert extract_mme("n") == "no"
    assert extract_mme("Not sure") == "no"          # "no" in the first 4 chars
    assert extract_mme("maybe") == "other"
    assert gt_yes_no("Yes") == "yes"
    with pytest.raises(ValueError):
        gt_yes_no("maybe")


def test_pope_by_hand():
    # 6 questions: TP 2, FN 1, FP 1, TN 2
    pairs = [("yes", "yes"), ("yes", "yes"), ("no", "yes"), ("yes", "no"), ("no", "no"), ("no", "no")]
    s = pope_scores(pairs)
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (2, 1, 1, 2)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 6)   # 3 predicted yes of 6
    assert pope_scores([("no", "yes")])["precision"] == 0.0


def test_mme_by_hand():
    # existence: image a both right, image b one right -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    # count: image c both wrong -> 0 + 0
    # code_reasoning: image d both right -> 100 + 100 = 200
    recs = [("existence", "a", True), ("existence", "a", True), ("existence", "b", True),
            ("existence", "b", False), ("count", "c", False), ("count", "c", False),
            ("code_reasoning", "d", True), ("code_reasoning", "d", True)]
    s = mme_scores(recs)
    assert s["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4, "images": 2}
    assert s["subtasks"]["count"]["score"] == 0.0
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == pytest.approx(200.0)
    assert s["total"] == pytest.approx(325.0)
    assert s["unpaired_images"] == 0
