"""The scorer: per-sample rows, the scores dict with breakdowns, and the summary table.

Breakdowns as VLMEvalKit reports them (vlmeval/dataset/utils/multiple_choice.py report_acc: Overall,
then per l2-category and category; image_vqa.py: per category; yorn.py POPE_rating: F1 as Overall,
"a,b" categories exploded; MME_rating: acc + acc+ per subtask, perception sum).
"""

import json

import pytest

from actors.eval.benchmark_file import Question
from actors.eval.choice import expand_circular
from actors.eval.scoring import METRICS, score_benchmark, summary_table
from models.errors import UserError


def _q(qid, answers, **kw):
    return Question(id=str(qid), row=int(qid) if str(qid).isdigit() else 0, images=(b"i",), question="q",
                    answers=tuple(answers), group=str(qid), **kw)


def test_vqa_scores_and_categories():
    recs = [(_q(1, ["2", "2"] + ["3"] * 8, category="count"), "two"),      # 0.6
            (_q(2, ["red"] * 10, category="colour"), "red"),                # 1.0
            (_q(3, ["red"] * 10, category="colour"), "blue")]               # 0.0
    r = score_benchmark("vqa", recs)
    assert [row.score for row in r.rows] == pytest.approx([0.6, 1.0, 0.0])
    assert [row.right for row in r.rows] == [False, True, False]
    assert r.rows[0].extracted == "2"
    assert r.scores["overall"] == pytest.approx(160 / 3)
    assert r.scores["categories"] == pytest.approx({"colour": 50.0, "count": 60.0})
    assert r.scores["n"] == 3 and r.scores["invalid"] == []
    json.dumps(r.scores)
    json.dumps([row.to_dict() for row in r.rows])


def test_mcq_vanilla_and_unresolved():
    opts = {"A": "cat", "B": "dog"}
    recs = [(_q(1, ["A"], options=opts, l2_category="p"), "A"),
            (_q(2, ["B"], options=opts, l2_category="p"), "I cannot say"),
            (_q(3, ["B"], options=opts, l2_category="r"), "a dog")]
    r = score_benchmark("mcq", recs)
    assert [row.extracted for row in r.rows] == ["A", None, "B"]
    assert r.scores["overall"] == pytest.approx(200 / 3)
    assert r.scores["l2_categories"] == pytest.approx({"p": 50.0, "r": 100.0})
    assert r.scores["details"]["unresolved"] == 1
    judged = score_benchmark("mcq", recs, judge=lambda prompt: "B")
    assert judged.scores["overall"] == pytest.approx(100.0)


def test_mcq_circular_counts_groups():
    opts = {"A": "w", "B": "x", "C": "y", "D": "z"}
    qs = expand_circular([_q(1, ["A"], options=opts, category="c1"), _q(2, ["C"], options=opts, category="c2")])
    answers = {q.id: q.answer for q in qs}
    answers["2000002"] = "B"  # (its answer is A) question 2 wrong in one of four rotations
    r = score_benchmark("mcq_circular", [(q, answers[q.id]) for q in qs])
    assert r.scores["n"] == 2
    assert r.scores["overall"] == pytest.approx(50.0)
    assert r.scores["categories"] == {"c1": 100.0, "c2": 0.0}
    assert r.scores["details"]["single_pass"] == pytest.approx(100.0)
    assert r.scores["details"]["rotations"] == 8
    assert len(r.rows) == 8


def test_pope_and_mme():
    recs = [(_q(1, ["yes"], category="random"), "Yes."), (_q(2, ["yes"], category="random"), "No"),
            (_q(3, ["no"], category="popular"), "Yes"), (_q(4, ["no"], category="popular"), "no")]
    r = score_benchmark("pope", recs)
    d = r.scores["details"]
    assert (d["accuracy"], d["precision"], d["recall"], d["f1"], d["yes_ratio"]) == pytest.approx((0.5, 0.5, 0.5, 0.5, 0.5))
    assert r.scores["overall"] == pytest.approx(50.0)
    assert r.scores["categories"] == pytest.approx({"popular": 0.0, "random": 2 / 3 * 100})

    def mq(i, ans, task, img):
        return Question(id=str(i), row=i, images=(b"i",), question="q", answers=(ans,), category=task, image_key=img)

    mme = [(mq(1, "Yes", "existence", "a"), "Yes"), (mq(2, "No", "existence", "a"), "No"),
           (mq(3, "Yes", "existence", "b"), "No"), (mq(4, "No", "existence", "b"), "No"),
           (mq(5, "Yes", "code_reasoning", "c"), "yes"), (mq(6, "No", "code_reasoning", "c"), "yes")]
    r = score_benchmark("mme", mme)
    # existence: 3/4 -> 75 + 1/2 images -> 50 = 125; code_reasoning: 50 + 0 = 50
    assert r.scores["overall"] == pytest.approx(125.0)
    assert r.scores["details"]["cognition"] == pytest.approx(50.0)
    assert r.scores["categories"] == pytest.approx({"code_reasoning": 50.0, "existence": 125.0})


def test_other_metrics_and_invalid_records():
    r = score_benchmark("anls", [(_q(1, ["hallo"]), "Hello")])
    assert r.scores["overall"] == pytest.approx(80.0)
    assert score_benchmark("relaxed_accuracy", [(_q(1, ["100"]), "104")]).scores["overall"] == 100.0
    assert score_benchmark("exact_match", [(_q(1, ["yes"]), "Yes.")]).scores["overall"] == 100.0
    assert score_benchmark("scienceqa", [(_q(1, ["B"]), "B. magnet")]).scores["overall"] == 100.0
    g = _q(1, ["[50, 0, 150, 100]"], extra={"width": "200", "height": "100"})
    assert score_benchmark("grounding", [(g, "[0.25, 0.25, 0.75, 0.5]")]).scores["overall"] == 100.0
    assert score_benchmark("grounding", [(g, "[0.25, 0.25, 0.75, 0.49]")]).scores["overall"] == 0.0
    c = score_benchmark("cider", [(_q(1, ["a b c d"]), "a b c d"), (_q(2, ["e f g h"]), "e f g h")])
    assert c.scores["overall"] == pytest.approx(1000.0)  # 10.0 per image, x 100
    assert c.rows[0].right is None
    r = score_benchmark("yes_no", [(_q(1, ["maybe"]), "yes"), (_q(2, ["no"]), "No.")])
    assert r.scores["invalid"] == [{"id": "1", "row": 1, "reason": "answer 'maybe' is not yes/no"}]
    assert r.scores["n"] == 1 and r.scores["overall"] == 100.0
    with pytest.raises(UserError, match="metric"):
        score_benchmark("bleu", [(_q(1, ["x"]), "x")])
    with pytest.raises(UserError, match="no record"):
        score_benchmark("yes_no", [(_q(1, ["maybe"]), "yes")])
    assert "pope" in METRICS


def test_summary_table():
    table = summary_table({"mmbench_dev": {"metric": "mcq_circular", "n": 1164, "overall": 68.2154},
                           "textvqa": {"metric": "vqa", "n": 5000, "overall": 58.8}})
    lines = table.splitlines()
    assert lines[0].split() == ["benchmark", "metric", "n", "score"]
    assert lines[2].split() == ["mmbench_dev", "mcq_circular", "1164", "68.22"]
    assert lines[3].split() == ["textvqa", "vqa", "5000", "58.80"]
    assert len({len(x) for x in lines}) == 1  # aligned
