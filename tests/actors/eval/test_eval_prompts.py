"""Prompt builders. Sources: haotian-liu/LLaVA llava/eval/model_vqa_mmbench.py (hint, question, "A. x"
lines, "Answer with the option's letter from the given choices directly."), Alpha-VLLM/LLaMA2-Accessory
accessory/eval_mm/annotations/annotation_config.json ("{}\\nAnswer the question using a single word or
phrase.", the miou0.5 grounding prompt), VLMEvalKit vlmeval/dataset/image_mcq.py (build_prompt)."""

import pytest

from actors.eval.benchmark_file import Question
from actors.eval.prompts import STYLE_FOR_METRIC, build_messages, prompt_text
from actors.eval.scoring import METRICS
from models.conversation import IMAGE, _content_text


def _q(**kw):
    base = dict(id="1", row=0, images=(b"img",), question="What colour is it?", answers=("A",))
    return Question(**{**base, **kw})


def test_mcq_llava_phrasing():
    q = _q(hint="Look at the car.", options={"A": "red", "B": "blue"})
    assert prompt_text(q, "mcq") == ("Look at the car.\nWhat colour is it?\nA. red\nB. blue\n"
                                     "Answer with the option's letter from the given choices directly.")
    assert prompt_text(_q(options={"A": "red"}), "mcq").startswith("What colour is it?\nA. red\n")


def test_short_answer_not_added_twice():
    assert prompt_text(_q(), "short") == "What colour is it?\nAnswer the question using a single word or phrase."
    q = _q(question="What?\nAnswer the question using a single word or phrase.")
    assert prompt_text(q, "short") == q.question


def test_grounding_caption_vlmevalkit():
    assert prompt_text(_q(question="the left dog"), "grounding") == (
        "Please provide the bounding box coordinate of the region this sentence describes: the left dog.")
    assert prompt_text(_q(), "caption") == "Provide a one-sentence caption for the provided image."
    q = _q(hint="H", options={"A": "red"})
    assert prompt_text(q, "vlmevalkit_mcq") == (
        "Hint: H\nQuestion: What colour is it?\nOptions:\nA. red\nPlease select the correct answer from the options above. \n")
    with pytest.raises(ValueError):
        prompt_text(q, "nope")


def test_messages_images_first_through_the_serving_template():
    msgs = build_messages(_q(images=(b"a", b"b")), "short")
    assert msgs == [{"role": "user", "content": [
        {"type": "image", "index": 0}, {"type": "image", "index": 1},
        {"type": "text", "text": "\nWhat colour is it?\nAnswer the question using a single word or phrase."}]}]
    # the serving template's content reader sees LLaVA's "<image>\n{question}"
    assert _content_text(msgs[0]["content"], 0).startswith(IMAGE + IMAGE + "\nWhat colour")
    assert build_messages(_q(), "plain", system="S")[0] == {"role": "system", "content": "S"}


def test_every_metric_has_a_style():
    assert set(STYLE_FOR_METRIC) == set(METRICS)
