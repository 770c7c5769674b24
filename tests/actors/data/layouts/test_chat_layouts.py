"""actors.data.layouts: sharegpt, messages, ultrachat read their published rows; system turns,
column mappings, images and every bad row (unknown role, bad parts) are quarantined by reason."""

from __future__ import annotations

import json

from actors.data import rows as raw
from actors.data.layouts import Reading


def test_sharegpt_as_published_with_system_turns_and_quirks(read, conv):
    records = [
        # ShareGPT_V3_unfiltered_cleaned_split.json: opens with the assistant (a crawl quirk)
        {"id": "QWJhYvA_0", "conversations": [{"from": "gpt", "value": "Hi, how can I help?"},
                                              {"from": "human", "value": "Summarize this."},
                                              {"from": "gpt", "value": "Sure."}]},
        # a system turn first, LLaMA-Factory's images list
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "<image>What?"},
                           {"from": "gpt", "value": "A cat."}], "images": ["cats/1.jpg"]},
        # the system column instead
        {"id": 7, "system": "You are SPHINX.", "conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "late"}]},
        {"conversations": [{"from": "human", "value": 5}]},
        {"conversations": [{"from": "human", "value": "<image><image>two?"}, {"from": "gpt", "value": "no"}],
         "images": ["a.jpg"]},
    ]
    rows = read("sharegpt", records)
    assert [r["reason"] for r in rows] == [None, None, None, "unknown_role", "unknown_role", "bad_field",
                                           "image_mismatch"]
    assert rows[0]["id"] == "QWJhYvA_0" and [t["from"] for t in conv(rows[0])] == ["human", "gpt"]
    assert conv(rows[1])[0] == {"from": "system", "value": "Be terse."}
    assert rows[1]["image_paths"] == ["s3://b/img/cats/1.jpg"] and rows[1]["id"] == "s:1"
    assert conv(rows[2])[0] == {"from": "system", "value": "You are SPHINX."} and rows[2]["id"] == "7"
    assert "observation" in rows[3]["detail"] and rows[3]["stage"] == "parse"


def test_sharegpt_column_mapping_as_llama_factory_declares_it(read, conv):
    """dataset_info.json: {"columns": {"messages": "messages", "system": "sys"}, "tags": {"role_tag":
    "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}"""
    record = {"sys": "Be kind.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    columns = (("assistant_tag", "assistant"), ("content_tag", "content"), ("messages", "messages"),
               ("role_tag", "role"), ("system", "sys"), ("user_tag", "user"))
    rows = read("sharegpt", [record], columns=columns)
    assert rows[0]["reason"] is None
    assert conv(rows[0]) == [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hey"}]
    assert read("sharegpt", [record])[0]["reason"] == "bad_field"  # without the mapping: no 'conversations'


def test_messages_hf_chat_shape_with_image_parts(read, conv):
    records = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
         "images": ["cat.jpg"]},
        # LLaMA-Factory's mllm_demo.json: string content with <image>, two images
        {"messages": [{"content": "<image><image>Which is bigger?", "role": "user"},
                      {"content": "The left one.", "role": "assistant"}], "images": ["l.jpg", "r.jpg"]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]},
        {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "x"}]},  # an image part, no image
    ]
    rows = read("messages", records)
    assert [r["reason"] for r in rows] == [None, None, "unknown_role", "bad_field", "image_mismatch"]
    assert conv(rows[0]) == [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>What is it?"},
                             {"from": "gpt", "value": "A cat."}]
    assert rows[1]["image_paths"] == ["s3://b/img/l.jpg", "s3://b/img/r.jpg"]


def test_messages_parquet_rows_with_image_structs():
    """A Hugging Face Parquet row: images as {bytes, path} structs, no id (a content hash)."""
    rec = {"messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}],
           "images": [{"bytes": b"PNG", "path": None}]}
    rows = raw.parquet_rows(rec, 0, source="p", ratio=1.0, reading=Reading(layout="messages"),
                            image_root="s3://b/p")
    assert rows[0]["reason"] is None and rows[0]["image_bytes"] == [b"PNG"] and rows[0]["id"].startswith("p:")
    again = raw.parquet_rows(rec, 5, source="p", ratio=1.0, reading=Reading(layout="messages"), image_root="s3://b/p")
    assert again[0]["id"] == rows[0]["id"]  # the id does not depend on the row's place in its batch


def test_ultrachat_published_rows(read, conv):
    lines = [{"id": "0", "data": ["How can cross training benefit groups?", "Cross training helps ...",
                                  "Thanks!"]},
             {"id": "1", "data": []}, {"id": "2", "data": ["q", 3]}, {"data": "not a list"}]
    rows = read("ultrachat", b"\n".join(json.dumps(x).encode() for x in lines), path="u/train_0.jsonl")
    assert [r["reason"] for r in rows] == [None, "bad_field", "bad_field", "bad_field"]
    assert [t["from"] for t in conv(rows[0])] == ["human", "gpt", "human"] and rows[0]["image_paths"] == []
    assert rows[3]["id"] == "s:3"
    # today's default layout quarantines the same rows (the aws.yaml bug of #25)
    assert raw.parse_json_file(json.dumps(lines[0]).encode(), "u.jsonl", source="s", ratio=1.0,
                               image_root=None)[0]["reason"] == "bad_field"


def test_the_spec_lists_the_registered_layouts_and_prompt_kinds():
    from actors.data import prompts
    from actors.data.layouts import NAMES
    from cluster.spec import LAYOUTS, PROMPT_KINDS

    assert LAYOUTS == NAMES and PROMPT_KINDS == prompts.KINDS
