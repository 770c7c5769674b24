"""Reading VLMEvalKit TSVs and LLaVA / lmms-eval JSONL files.

Sources: open-compass/VLMEvalKit vlmeval/dataset/image_base.py (ImageBaseDataset.__init__: an image
cell of <= 64 chars is another row's index; toliststr; image_path), vlmeval/smp/file.py (load_tsv =
pandas.read_csv(sep='\\t'), so pandas' NA strings are empty), vlmeval/dataset/utils/vqa_eval.py
(process_line: a list-literal answer is the human answers), multiple_choice.py (g_index =
index % 1e6); haotian-liu/LLaVA llava/eval/model_vqa_loader.py (question_id, image, text).
"""

import base64
import io
import json

import pytest
from PIL import Image

from actors.eval.benchmark_file import load_images, read_benchmark, tsv_text
from models.errors import UserError


def png(colour=(255, 0, 0), size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def mcq_rows():
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    return [
        {"index": 0, "image": b64(red), "question": "Colour?", "hint": "nan", "A": "red", "B": "blue",
         "C": "green", "D": "", "answer": "A", "category": "colour", "l2-category": "perception",
         "split": "dev"},
        {"index": 1, "image": b64(blue), "question": "Colour?", "hint": "Look closely.", "A": "red",
         "B": "blue", "C": "", "D": "", "answer": "B", "category": "colour", "l2-category": "perception",
         "split": "dev"},
        {"index": 1000001, "image": "1", "question": "Colour?", "hint": "", "A": "blue", "B": "red",
         "C": "", "D": "", "answer": "A", "category": "colour", "l2-category": "perception", "split": "dev"},
        {"index": 3, "image": "77", "question": "Dangling?", "hint": "", "A": "x", "B": "y", "C": "", "D": "",
         "answer": "A", "category": "c", "l2-category": "", "split": "dev"},
        {"index": 4, "image": b64(red), "question": "Bad answer?", "hint": "", "A": "x", "B": "y", "C": "",
         "D": "", "answer": "E", "category": "c", "l2-category": "", "split": "dev"},
        {"index": 5, "image": "!!!!" * 40, "question": "Bad image?", "hint": "", "A": "x", "B": "y",
         "C": "", "D": "", "answer": "A", "category": "c", "l2-category": "", "split": "dev"},
        {"index": 1, "image": b64(red), "question": "Duplicate?", "hint": "", "A": "x", "B": "y", "C": "",
         "D": "", "answer": "A", "category": "c", "l2-category": "", "split": "dev"},
    ]


def test_mcq_tsv(tmp_path):
    path = write(tmp_path, "mmb.tsv", tsv_text(mcq_rows()))
    f = read_benchmark(path)
    assert f.format == "tsv"
    assert [q.id for q in f.questions] == ["0", "1", "1000001"]
    q0, q1, q2 = f.questions
    assert q0.options == {"A": "red", "B": "blue", "C": "green"}  # empty D is absent
    assert q0.hint is None                                          # "nan" is NA, as pandas reads it
    assert q1.hint == "Look closely."
    assert q0.answer == "A" and q0.category == "colour" and q0.l2_category == "perception" and q0.split == "dev"
    assert q0.images == (png((255, 0, 0)),)
    # the reference "1" resolves to row 1's image; the circular copy groups with index 1
    assert q2.images == q1.images and q2.image_key == "1"
    assert (q1.group, q2.group) == ("1", "1")
    bad = {b.index: b.reason for b in f.bad_rows}
    assert set(bad) == {"3", "4", "5", "1"}
    assert "not in the file" in bad["3"]
    assert "not one of the options" in bad["4"]
    assert "base64" in bad["5"] or "image" in bad["5"]
    assert "duplicate" in bad["1"]
    assert [b.row for b in f.bad_rows] == [3, 4, 5, 6]


def test_tsv_matches_pandas_na_rules(tmp_path):
    import pandas as pd

    path = write(tmp_path, "mmb.tsv", tsv_text(mcq_rows()[:3]))
    df = pd.read_csv(path, sep="\t")
    f = read_benchmark(path)
    for q, (_, row) in zip(f.questions, df.iterrows()):
        assert set(q.options) == {c for c in "ABCD" if not pd.isna(row[c])}
        assert (q.hint is None) == bool(pd.isna(row["hint"]))


def test_vqa_tsv_answer_list(tmp_path):
    rows = [{"index": 7, "image": b64(png()), "question": "What is written?",
             "answer": ["stop", "stop", "stop sign"] + ["stop"] * 7, "category": "text"},
            {"index": 8, "image": b64(png()), "question": "Single?", "answer": "yes", "category": "text"}]
    text = tsv_text(rows)
    assert "['stop', 'stop', 'stop sign'," in text  # the list literal VLMEvalKit writes
    f = read_benchmark(write(tmp_path, "textvqa.tsv", text))
    assert f.questions[0].answers == ("stop", "stop", "stop sign") + ("stop",) * 7
    assert f.questions[1].answers == ("yes",)
    assert f.questions[0].options == {}


def test_image_path_tsv_relative_to_file_and_multi_image(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    rows = [{"index": 1, "image_path": "imgs/a.png", "question": "Q?", "answer": "yes"},
            {"index": 2, "image_path": "['imgs/a.png', '/abs/b.png']", "question": "Q2?", "answer": "no"}]
    f = read_benchmark(write(tmp_path, "x.tsv", tsv_text(rows)))
    assert f.questions[0].images == (f"{tmp_path}/imgs/a.png",)
    assert f.questions[1].images == (f"{tmp_path}/imgs/a.png", "/abs/b.png")
    assert f.questions[0].image_key == "imgs/a.png"
    assert load_images(f.questions[0]) == [png()]


def test_jsonl_and_s3_reader():
    lines = [{"question_id": 3, "image": "a.jpg", "text": "What colour?", "answers": ["red", "red", "dark red"]},
             {"question_id": 4, "image": "b.jpg", "question": "Is it?", "answer": "yes", "category": "adversarial"},
             "not an object", {"question_id": 5, "text": "no image"}]
    body = "\n".join(json.dumps(x) for x in lines) + "\n{broken\n"
    store = {"s3://bucket/bench/q.jsonl": body.encode()}
    f = read_benchmark("s3://bucket/bench/q.jsonl", reader=store.__getitem__)
    assert [q.id for q in f.questions] == ["3", "4"]
    assert f.questions[0].images == ("s3://bucket/bench/a.jpg",)
    assert f.questions[0].answers == ("red", "red", "dark red")
    assert f.questions[1].answers == ("yes",) and f.questions[1].category == "adversarial"
    assert [b.row for b in f.bad_rows] == [2, 3, 4]
    assert "not JSON" in f.bad_rows[2].reason


def test_text_only_rows_are_questions_only_when_asked():
    # a language benchmark / the demo's chat turns: no image cell; the field's files refuse such a row
    lines = [{"question_id": 1, "text": "Say cat.", "answer": "cat"},
             {"question_id": 2, "image": "a.jpg", "text": "What colour?", "answer": "red"},
             {"question_id": 3, "image": "", "text": "Say dog.", "answer": "dog"}]
    body = "\n".join(json.dumps(x) for x in lines).encode()
    f = read_benchmark("q.jsonl", reader=lambda _: body, text_only=True)
    assert [(q.id, q.images) for q in f.questions] == [("1", ()), ("2", ("./a.jpg",)), ("3", ())]
    assert not f.bad_rows
    f = read_benchmark("q.jsonl", reader=lambda _: body)
    assert [q.id for q in f.questions] == ["2"] and [b.reason for b in f.bad_rows] == ["no 'image' path"] * 2
    tsv = "index\timage\tquestion\tanswer\n1\t\tSay cat.\tcat\n".encode()
    (q,) = read_benchmark("t.tsv", reader=lambda _: tsv, text_only=True).questions
    assert q.images == () and q.answers == ("cat",)
    with pytest.raises(UserError, match="no image"):
        read_benchmark("t.tsv", reader=lambda _: tsv)


def test_accessory_json_array(tmp_path):
    # LLaMA2-Accessory accessory/eval_mm/annotations/*.json: a JSON array, image_path + gt_answers
    items = [{"image_path": "data/x.png", "question": "Q?", "question_id": "x.png-1", "gt_answers": "decrease"}]
    f = read_benchmark(write(tmp_path, "ai2d.json", json.dumps(items)), image_root="/data/root")
    (q,) = f.questions
    assert (q.id, q.images, q.answers) == ("x.png-1", ("/data/root/data/x.png",), ("decrease",))


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="bad.tsv: no usable question"):
        read_benchmark(write(tmp_path, "bad.tsv", tsv_text(mcq_rows()[3:6])))
    with pytest.raises(UserError, match="needs columns"):
        read_benchmark(write(tmp_path, "nocol.tsv", "image\tanswer\nxx\tA\n"))
    with pytest.raises(UserError, match="image"):
        read_benchmark(write(tmp_path, "noimg.tsv", "index\tquestion\tanswer\n1\tq\tA\n"))
    with pytest.raises(UserError, match="format"):
        read_benchmark(write(tmp_path, "x.csv", "a"))
    with pytest.raises(UserError, match="no reader"):
        read_benchmark("s3://b/x.tsv")
    with pytest.raises(UserError, match="cannot read"):
        read_benchmark(str(tmp_path / "missing.tsv"))
