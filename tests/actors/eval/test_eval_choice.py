"""Multiple-choice extraction and CircularEval.

Sources: open-compass/VLMEvalKit vlmeval/utils/matching_util.py (can_infer_option, can_infer_text,
can_infer), vlmeval/tools.py CIRCULAR (rotations: deque.rotate(1), index + i * 1e6, g_index), and
vlmeval/dataset/utils/multiple_choice.py (mcq_circular_eval, prefetch_circular_group,
eval_circular_group: a group is right only if every rotation is).
"""

from actors.eval.benchmark_file import Question
from actors.eval.choice import (can_infer, can_infer_option, can_infer_text, circular_groups,
                                expand_circular, extract_choice, has_rotations, judge_prompt, rotations)

OPTS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def _q(qid="5", answer="B", options=OPTS, **kw):
    return Question(id=qid, row=0, images=(b"x",), question="What animal?", options=dict(options),
                    answers=(answer,), group=qid, **kw)


def test_option_letter_found():
    assert can_infer_option("B", OPTS) == "B"
    assert can_infer_option("(C)", OPTS) == "C"
    assert can_infer_option("The answer is D.", OPTS) == "D"
    assert can_infer_option("**A**", OPTS) == "A"


def test_letter_must_be_near_the_end():
    # one letter, but 6 words after it: not among the last four -> falls to the "answer is" regex
    assert can_infer_option("B is what I would say in general terms", OPTS) is None
    assert can_infer_option("I think the correct answer is B because it barks a lot", OPTS) == "B"


def test_two_letters_is_ambiguous_and_refusals_are_z():
    assert can_infer_option("A or B", OPTS) is None
    assert can_infer_option("Cannot determine the answer from this picture", OPTS) == "Z"
    assert can_infer_option("Z", OPTS) == "Z"


def test_option_text_then():
    assert can_infer_text("It is a dog", OPTS) == "B"
    assert can_infer_text("a dog or a cat", OPTS) is None  # two texts
    # longer than twice all option texts together (2 * 14 = 28 chars): not read
    assert can_infer_text("it is certainly a dog, look at the tail", OPTS) is None
    assert can_infer("a fish", OPTS) == "D"
    assert can_infer("nothing here", OPTS) is None


def test_judge_used_only_when_rules_fail():
    calls = []

    def judge(prompt):
        calls.append(prompt)
        return "C"

    q = _q(answer="C")
    assert extract_choice(q, "B", judge) == ("B", "rule")
    assert calls == []
    letter, how = extract_choice(q, "some feathered thing", judge)
    assert letter == "C" and how.startswith("judge")
    assert "Options: There are several options: \nA. cat\n" in calls[0]
    assert extract_choice(q, "some feathered thing", None) == (None, "no match")
    assert extract_choice(q, "zzz", lambda p: "no idea")[0] is None  # three tries, then cannot tell
    assert judge_prompt("Q", {"A": "x"}, "p").endswith("Question: Q?\nOptions: There are several options: \nA. x\n\nAnswer: p\nYour output: ")


def test_rotations_as_circular_tool():
    rots = rotations(_q(qid="5", answer="B"))
    assert [r.id for r in rots] == ["5", "1000005", "2000005", "3000005"]
    assert {r.group for r in rots} == {"5"}
    # rotation 1 of ABCD is deque.rotate(1) -> DABC: old A -> D, old B -> A, old C -> B, old D -> C
    assert rots[1].options == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    assert [r.answer for r in rots] == ["B", "A", "D", "C"]
    for r in rots:  # the right text always stays the right answer
        assert r.options[r.answer] == "dog"


def test_abnormal_entries_not_rotated():
    assert len(rotations(_q(options={"A": "yes"}, answer="A"))) == 1
    assert len(rotations(_q(options={"A": "A and B", "B": "C"}, answer="A"))) == 1
    assert len(rotations(_q(options={"A": "x", "C": "y"}, answer="A"))) == 1  # not A.. in a row


def test_expand_circular_offset_grows_with_large_indices():
    qs = expand_circular([_q(qid="1", options={"A": "x", "B": "y"}, answer="A"),
                          _q(qid="2000000", options={"A": "x", "B": "y"}, answer="B")])
    assert [q.id for q in qs] == ["1", "2000000", "10000001", "12000000"]
    assert has_rotations(qs) and not has_rotations(qs[:2])


def test_three_of_four_rotations_right_counts_zero():
    rots = rotations(_q(answer="B"))
    preds = [r.answer for r in rots]
    preds[2] = "A"  # one rotation wrong
    (res,) = circular_groups(list(zip(rots, preds)))
    assert res.hit is False
    (res,) = circular_groups(list(zip(rots, [r.answer for r in rots])))
    assert res.hit is True


def test_undecided_rotation_without_judge_is_wrong_with_judge_resolved():
    rots = rotations(_q(answer="B"))
    preds = [r.answer for r in rots]
    preds[3] = "hmm, hard to say"
    assert circular_groups(list(zip(rots, preds)))[0].hit is False
    assert circular_groups(list(zip(rots, preds)), judge=lambda p: rots[3].answer)[0].hit is True
