"""textvqa, docvqa, ocrvqa: the text-reading QA files as published (multiple answers, the test
split without answers, OCR-VQA's per-image question lists)."""

from __future__ import annotations


def test_textvqa_json(read, conv):
    data = {"dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question": "what is the brand of phone?", "image_id": "0054c91397f2fe05", "image_classes": ["Mobile phone"],
         "flickr_original_url": "https://farm6.staticflickr.com/2891/9134076951_f65b421097_o.jpg",
         "flickr_300k_url": "https://...", "image_width": 1024, "image_height": 730,
         "answers": ["nokia", "nokia", "nokia", "nokia", "toshiba", "nokia", "nokia", "nokia", "nokia", "nokia"],
         "question_tokens": ["what", "is", "the", "brand", "of", "phone"], "question_id": 0, "set_name": "train"},
        {"question": "what does the small white text spell?", "image_id": "00685bc495504d61", "question_id": 34602,
         "set_name": "test"},  # the test split has no answers
    ]}
    rows = read("textvqa", data, path="TextVQA_0.5.1_train.json")
    assert [(r["id"], r["reason"]) for r in rows] == [("0", None), ("34602", "missing_answer")]
    assert rows[0]["image_paths"] == ["s3://b/img/0054c91397f2fe05.jpg"] and conv(rows[0])[1]["value"] == "nokia"
    ocr = read("textvqa", data, prompt="ocr")
    assert "Read the text in the image" in conv(ocr[0])[0]["value"]


def test_docvqa_json(read, conv):
    data = {"dataset_name": "docvqa", "dataset_split": "train", "dataset_version": "1.0", "data": [
        {"questionId": 337, "question": "what is the date mentioned in this letter?",
         "question_types": ["handwritten", "form"], "image": "documents/xnbl0037_1.png", "docId": 279,
         "ucsf_document_id": "xnbl0037", "ucsf_document_page_no": "1", "answers": ["1/8/93"], "data_split": "train"},
        {"questionId": 338, "question": "what is the contact person name mentioned in letter?",
         "image": "documents/xnbl0037_1.png", "answers": ["P. Carter", "p. carter"]},
        {"questionId": 339, "question": "what?", "answers": ["x"]},  # no image
    ]}
    rows = read("docvqa", data, path="train_v1.0_withQT.json")
    assert [(r["id"], r["reason"]) for r in rows] == [("337", None), ("338", None), ("339", "bad_field")]
    assert rows[0]["image_paths"] == ["s3://b/img/documents/xnbl0037_1.png"]
    assert conv(rows[1])[1]["value"] == "P. Carter"
    # InfographicVQA names its image otherwise: a column mapping
    info = {"data": [{"questionId": 65718, "question": "Which social platform has heavy female audience?",
                      "image_local_name": "37313.jpeg", "answers": ["pinterest"]}]}
    rows = read("docvqa", info, columns=(("image", "image_local_name"),))
    assert rows[0]["reason"] is None and rows[0]["image_paths"] == ["s3://b/img/37313.jpeg"]


def test_ocrvqa_dataset_json(read, conv):
    data = {"1439511679": {"imageURL": "http://ecx.images-amazon.com/images/I/51P1p8LIYHL.jpg",
                           "questions": ["Who wrote this book?", "What is the title of this book?"],
                           "answers": ["Kay Hooper", "Tidal Wave"], "title": "Tidal Wave", "authorName": "Kay Hooper",
                           "genre": "Romance", "split": 1},
            "0000000000": {"imageURL": "http://x/y.jpg", "questions": ["Who?"], "answers": []}}
    rows = read("ocrvqa", data, path="dataset.json")
    assert [(r["id"], r["reason"]) for r in rows] == [("1439511679", None), ("0000000000", "bad_field")]
    assert rows[0]["image_paths"] == ["s3://b/img/1439511679.jpg"]
    turns = conv(rows[0])
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"].startswith("<image>\nWho wrote") and not turns[2]["value"].startswith("<image>")
    assert turns[3]["value"] == "Tidal Wave"
