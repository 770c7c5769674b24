"""pipelines.stages.preprocess_sources: a source's layout settings are checked when it is resolved
(no Ray): column names of its layout only, its annotations file, a prompt that fits it."""

from __future__ import annotations

import pytest

from cluster.layout import Layout
from cluster.spec import parse_spec
from cluster.storage import Storage
from models.errors import UserError
from pipelines.stages.preprocess_sources import resolve_source


@pytest.fixture
def source(tmp_path):
    (tmp_path / "q.json").write_text("{}")
    (tmp_path / "instances.json").write_text("{}")

    def _source(**kw):
        spec = parse_spec({"name": "t", "storage": {"uri": str(tmp_path)},
                           "data": {"sources": [{"name": "s", "path": "q.json", **kw}]}}, "t")
        return resolve_source(Storage(str(tmp_path), endpoint_url=None, region="us-east-1"), Layout.from_spec(spec), 0,
                              spec.data.sources[0], seed=7)
    return _source


def test_layout_settings_become_the_sources_reading(source, tmp_path):
    got = source(layout="refcoco", annotations="instances.json", prompt="region_caption",
                 columns={"sentence": "raw"})
    r = got.reading
    assert (r.layout, r.prompt, r.seed, r.columns) == ("refcoco", "region_caption", 7, (("sentence", "raw"),))
    assert r.annotations == str(tmp_path / "instances.json") and got.side_filesystem is not None
    assert got.image_root == str(tmp_path)  # default: beside the file
    assert source().reading.layout == "llava"


@pytest.mark.parametrize("kw, message", [
    ({"layout": "sharegpt", "columns": {"nope": "x"}}, r"columns \['nope'\] are not names of layout 'sharegpt'"),
    ({"layout": "refcoco"}, "layout 'refcoco' needs annotations"),
    ({"layout": "vqa", "annotations": "missing.json"}, "annotations .*missing.json: no such file"),
    ({"layout": "ultrachat", "annotations": "instances.json"}, "layout 'ultrachat' reads no annotations file"),
    ({"layout": "coco_captions", "prompt": "referring"}, "prompt 'referring' does not fit layout 'coco_captions'"),
    ({"layout": "messages", "prompt": "caption"}, "its records hold their questions"),
    ({"columns": {"messages": "m"}}, "layout llava reads LLaVA records as they are"),
    ({"prompt": "caption"}, "columns, annotations and prompt belong to the other layouts"),
])
def test_bad_layout_settings_name_the_source(source, kw, message):
    with pytest.raises(UserError, match=r"data.sources\[0\] \(s\)"):
        source(**kw)
    with pytest.raises(UserError, match=message):
        source(**kw)


def test_webdataset_sources_keep_the_llava_layout():
    from cluster.spec import SpecError

    with pytest.raises((SpecError, ValueError), match="WebDataset sources have the llava layout"):
        parse_spec({"name": "t", "data": {"sources": [{"name": "s", "path": "x", "format": "webdataset",
                                                       "layout": "sharegpt"}]}}, "t")
