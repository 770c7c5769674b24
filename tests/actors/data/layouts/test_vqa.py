"""vqa: VQAv2 / OK-VQA question + annotation files, GQA's questions JSON and A-OKVQA, as published;
multiple answers, missing answers and multiple choice."""

from __future__ import annotations

# v2_OpenEnded_mscoco_train2014_questions.json / v2_mscoco_train2014_annotations.json
QUESTIONS = {
    "info": {"description": "This is v2.0 of the VQA dataset."}, "task_type": "Open-Ended", "data_type": "mscoco",
    "license": {}, "data_subtype": "train2014",
    "questions": [
        {"image_id": 458752, "question": "What is this photo taken looking through?", "question_id": 458752000},
        {"image_id": 458752, "question": "What position is this man playing?", "question_id": 458752001},
        {"image_id": 262146, "question": "What is he on top of?", "question_id": 262146000},
        {"image_id": 262146, "question": "", "question_id": 262146001},
    ],
}
ANSWERS = {
    "info": {}, "license": {}, "data_subtype": "train2014",
    "annotations": [
        {"question_type": "what is this", "multiple_choice_answer": "net", "answer_type": "other",
         "image_id": 458752, "question_id": 458752000,
         "answers": [{"answer": "net", "answer_confidence": "maybe", "answer_id": 1},
                     {"answer": "netting", "answer_confidence": "yes", "answer_id": 2}]},
        # OK-VQA's annotations: no multiple_choice_answer, ten answers (five, each twice)
        {"question_type": "other", "answer_type": "other", "image_id": 458752, "question_id": 458752001,
         "answers": [{"answer_id": k, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                     for k, a in enumerate(["pitcher", "catcher", "pitcher", "catcher", "pitcher"] * 2)]},
    ],
}


def test_vqav2_questions_with_their_answers_file(read, conv):
    rows = read("vqa", QUESTIONS, side=ANSWERS, path="v2_OpenEnded_mscoco_train2014_questions.json")
    assert [(r["id"], r["reason"]) for r in rows] == [("458752000", None), ("458752001", None),
                                                      ("262146000", "missing_answer"), ("262146001", "bad_field")]
    assert rows[0]["image_paths"] == ["s3://b/img/COCO_train2014_000000458752.jpg"]
    assert conv(rows[0]) == [
        {"from": "human", "value": "<image>\nWhat is this photo taken looking through?\n"
                                   "Answer the question using a single word or phrase."},
        {"from": "gpt", "value": "net"}]
    assert conv(rows[1])[1]["value"] == "pitcher"  # the most frequent of OK-VQA's answers
    without = read("vqa", QUESTIONS, path="q.json")
    assert [r["reason"] for r in without] == ["missing_answer"] and without[0]["id"] == "s:file"


def test_gqa_questions_json(read, conv):
    """train_balanced_questions.json: one object keyed by question id."""
    gqa = {"02930152": {"semantic": [], "entailed": ["02930160"], "equivalent": ["02930152"], "question":
                        "Is the sky dark?", "imageId": "2354786", "isBalanced": True, "groups": {"global": None},
                        "answer": "yes", "semanticStr": "select: sky ...", "annotations": {}, "types": {},
                        "fullAnswer": "Yes, the sky is dark."},
           "07333408": {"question": "What is on the white wall?", "imageId": "2375429", "answer": "pipe",
                        "fullAnswer": "The pipe is on the wall."}}
    rows = read("vqa", gqa, path="train_balanced_questions.json")
    assert [(r["id"], r["reason"]) for r in rows] == [("02930152", None), ("07333408", None)]
    assert rows[0]["image_paths"] == ["s3://b/img/2354786.jpg"] and conv(rows[1])[1]["value"] == "pipe"


def test_aokvqa_direct_answers_or_multiple_choice(read, conv):
    aok = [{"split": "train", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH",
            "question": "What is the man by the bags awaiting?", "choices": ["skateboarder", "train", "delivery", "cab"],
            "correct_choice_idx": 3, "direct_answers": ["ride", "ride", "bus", "taxi", "travelling", "traffic", "taxi",
                                                        "cab", "cab", "his ride"],
            "difficult_direct_answer": False, "rationales": ["A train would not be on the street."]}]
    short = read("vqa", aok, path="aokvqa_v1p0_train.json")
    assert short[0]["reason"] is None and short[0]["image_paths"] == ["s3://b/img/000000299207.jpg"]
    assert conv(short[0])[1]["value"] == "ride"
    mc = read("vqa", aok, path="aokvqa_v1p0_train.json", prompt="multiple_choice")
    assert conv(mc[0]) == [
        {"from": "human", "value": "<image>\nWhat is the man by the bags awaiting?\nA. skateboarder\nB. train\n"
                                   "C. delivery\nD. cab\nAnswer with the option's letter from the given choices "
                                   "directly."},
        {"from": "gpt", "value": "D"}]
    gqa_mc = read("vqa", {"1": {"question": "q?", "imageId": "1", "answer": "a"}}, prompt="multiple_choice")
    assert gqa_mc[0]["reason"] == "bad_field"  # multiple choice without choices
