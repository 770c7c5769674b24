"""End to end without a model: a generated benchmark file whose right answers are known -> read ->
prompts -> a fake model's answers -> scores equal to values computed by hand.

The fake model looks at the image (a one-colour PNG) and the prompt, as a perfect or a biased
model would; the scores are then fixed by the file alone.
"""

import base64
import io
import json

import pytest
from PIL import Image

from actors.eval.benchmark_file import load_images, read_benchmark, tsv_text
from actors.eval.choice import expand_circular
from actors.eval.prompts import STYLE_FOR_METRIC, build_messages
from actors.eval.scoring import score_benchmark, summary_table

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def png(name: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[name]).save(buf, format="PNG")
    return buf.getvalue()


def colour_of(data: bytes) -> str:
    pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
    return next(k for k, v in COLOURS.items() if v == pixel)


def text_of(messages) -> str:
    return "".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")


def seeing_model(messages, images) -> str:
    """Answers from the image: the option letter whose text is the colour, else the colour word."""
    colour = colour_of(images[0])
    prompt = text_of(messages)
    for line in prompt.splitlines():
        if len(line) > 3 and line[1:3] == ". " and line[3:] == colour:
            return line[0]
    if prompt.startswith("\nIs the image"):
        return "Yes" if colour in prompt else "No, it is not."
    return colour.capitalize() + "."


def run(path, metric, model, expand=False):
    bench = read_benchmark(str(path))
    questions = expand_circular(bench.questions) if expand else list(bench.questions)
    records = []
    for q in questions:
        messages = build_messages(q, STYLE_FOR_METRIC[metric])
        assert len([p for p in messages[0]["content"] if p["type"] == "image"]) == len(q.images)
        records.append((q, model(messages, load_images(q))))
    return bench, score_benchmark(metric, records)


def mcq_file(tmp_path):
    rows = []
    for i, (colour, answer) in enumerate([("red", "A"), ("green", "B"), ("blue", "C"), ("yellow", "D")]):
        options = ["red", "green", "blue", "yellow"]
        rows.append({"index": i, "image": base64.b64encode(png(colour)).decode(), "question": "What colour is the image?",
                     "hint": "" if i else "A plain square.", "A": options[0], "B": options[1], "C": options[2],
                     "D": options[3], "answer": answer, "category": "colour" if i < 2 else "tint",
                     "l2-category": "perception", "split": "dev"})
    rows.append(dict(rows[0], index=9, image="0", answer="Q"))  # malformed: answer not an option
    path = tmp_path / "colours_mcq.tsv"
    path.write_text(tsv_text(rows))
    return path


def test_mcq_circular_perfect_and_biased(tmp_path):
    path = mcq_file(tmp_path)
    bench, perfect = run(path, "mcq_circular", seeing_model, expand=True)
    assert [(b.index, b.reason) for b in bench.bad_rows] == [("9", "answer 'Q' is not one of the options ABCD")]
    assert perfect.scores["overall"] == 100.0 and perfect.scores["n"] == 4
    assert len(perfect.rows) == 16  # 4 questions x 4 rotations

    # Always "A": right exactly once per question (the rotation that puts the answer at A), so
    # CircularEval gives 0 while the single pass on the originals is 1/4 (only question 0's answer is A).
    _, biased = run(path, "mcq_circular", lambda m, i: "A", expand=True)
    assert biased.scores["overall"] == 0.0
    assert biased.scores["details"]["single_pass"] == pytest.approx(25.0)
    assert sum(r.right for r in biased.rows) == 4
    _, vanilla = run(path, "mcq", lambda m, i: "A")
    assert vanilla.scores["overall"] == pytest.approx(25.0)
    assert vanilla.scores["categories"] == pytest.approx({"colour": 50.0, "tint": 0.0})


def test_vqa_tsv_and_pope_jsonl(tmp_path):
    # humans: image 0 (red) 10 x "red" -> 1.0; image 1 (blue): 2 x "blue", 8 x "navy" -> 0.6;
    # image 2 (green): 10 x "lime" -> 0.0. Mean 1.6 / 3 -> 53.33
    rows = [{"index": 0, "image": base64.b64encode(png("red")).decode(), "question": "What colour?", "answer": ["red"] * 10},
            {"index": 1, "image": base64.b64encode(png("blue")).decode(), "question": "What colour?",
             "answer": ["blue"] * 2 + ["navy"] * 8},
            {"index": 2, "image": base64.b64encode(png("green")).decode(), "question": "What colour?", "answer": ["lime"] * 10}]
    (tmp_path / "colours_vqa.tsv").write_text(tsv_text(rows))
    _, vqa = run(tmp_path / "colours_vqa.tsv", "vqa", seeing_model)
    # "Red." vs unanimous "red": not normalised, so no match -> 0 (the official rule); "Blue." -> "blue"
    assert [r.score for r in vqa.rows] == pytest.approx([0.0, 0.6, 0.0])
    assert vqa.scores["overall"] == pytest.approx(20.0)

    for name in ("red", "blue"):
        (tmp_path / f"{name}.png").write_bytes(png(name))
    lines = [{"question_id": 1, "image": "red.png", "text": "Is the image red?", "answer": "yes", "category": "random"},
             {"question_id": 2, "image": "red.png", "text": "Is the image blue?", "answer": "no", "category": "random"},
             {"question_id": 3, "image": "blue.png", "text": "Is the image blue?", "answer": "yes", "category": "random"},
             {"question_id": 4, "image": "blue.png", "text": "Is the image green?", "answer": "yes", "category": "random"}]
    (tmp_path / "pope.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    _, pope = run(tmp_path / "pope.jsonl", "pope", seeing_model)
    # predictions yes, no, yes, no vs truth yes, no, yes, yes: TP 2, TN 1, FN 1, FP 0
    d = pope.scores["details"]
    assert (d["tp"], d["tn"], d["fn"], d["fp"]) == (2, 1, 1, 0)
    assert d["accuracy"] == pytest.approx(0.75) and d["precision"] == 1.0
    assert d["recall"] == pytest.approx(2 / 3) and d["f1"] == pytest.approx(0.8)
    assert d["yes_ratio"] == pytest.approx(0.5)
    table = summary_table({"vqa": vqa.scores, "pope": pope.scores})
    assert "20.00" in table and "80.00" in table
