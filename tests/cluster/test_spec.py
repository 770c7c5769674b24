"""cluster.spec: round trips, every validation error names its dotted field, `sphinx-x spec validate`."""

from __future__ import annotations

import pytest
import yaml

from cluster.spec import (
    EXAMPLES_DIR,
    ClusterSpec,
    SpecError,
    dump_spec,
    example_path,
    load_spec,
    parse_spec,
)
from pipelines.cli import main

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def test_the_three_examples_ship():
    assert {p.stem for p in EXAMPLES} >= {"local", "aws", "kuberay"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_round_trip(path, tmp_path):
    spec = load_spec(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_spec(spec))
    assert load_spec(again) == spec
    assert dump_spec(load_spec(again)) == dump_spec(spec)


def test_defaults_are_a_valid_embedded_spec_and_round_trip():
    spec = ClusterSpec()
    assert spec.cluster.address == "local" and spec.storage.endpoint_url == "embedded"
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec
    assert parse_spec(None) == spec  # an empty file is the default spec


def test_local_example_is_the_embedded_default():
    spec = load_spec(example_path("local"))
    assert spec.cluster.address == "local"
    assert spec.storage.uri == "s3://sphinx-x/runs/local" and spec.storage.endpoint_url == "embedded"
    assert spec.model.flavour == "debug" and spec.train.workers == 2 and spec.train.global_batch == 8
    assert spec.data.sources and {m.flavour for m in spec.serve.models} == {"debug", "debug-moe"}


def test_aws_and_kuberay_examples_say_what_the_issue_asks():
    aws = load_spec(example_path("aws"))
    assert aws.storage.endpoint_url is None and aws.model.flavour == "plus"
    assert aws.train.use_gpu and aws.train.zero_stage == 3 and aws.train.precision == "bf16"
    gpu = aws.cluster.group(aws.train.group)
    assert gpu.gpus > 0 and aws.cluster.group(aws.data.group).gpus == 0
    assert aws.serve.api_keys_env and aws.serve.models[0].ray_actor_options.num_gpus > 0
    assert aws.serve.models[0].autoscaling_config.max_replicas > 1

    kuberay = load_spec(example_path("kuberay"))
    assert kuberay.cluster.address.startswith("http://") and kuberay.cluster.address.endswith(":8265")
    assert kuberay.storage.endpoint_url.startswith("http://")
    assert kuberay.model.flavour == "moe" and kuberay.train.expert_parallel == 8 == kuberay.train.workers
    assert all(g.resources for g in kuberay.cluster.worker_groups if g.gpus)


# (case, spec data, the dotted field path in the message, a fragment of the reason)
BAD = [
    ("unknown key", {"train": {"wokers": 2}}, "train.wokers", "unknown key"),
    ("unknown top-level key", {"trian": {}}, "trian", "unknown key"),
    ("unknown nested key", {"serve": {"models": [{"name": "a", "flavour": "debug", "replicas": 2}]}},
     "serve.models.0.replicas", "unknown key"),
    ("wrong type", {"train": {"workers": "two"}}, "train.workers", "valid integer"),
    ("wrong type in a list", {"serve": {"models": [{"name": "a", "flavour": "debug", "max_ongoing_requests": [1]}]}},
     "serve.models.0.max_ongoing_requests", "valid integer"),
    ("bad value (enum)", {"train": {"zero_stage": 4}}, "train.zero_stage", "got 4"),
    ("bad value (range)", {"data": {"max_seq_len": 3}}, "data.max_seq_len", "greater than or equal to 16"),
    ("bad value (uri)", {"storage": {"uri": "gs://bucket/x"}}, "storage.uri", "only s3://"),
    ("bad value (address)", {"cluster": {"address": "foo"}}, "cluster.address", "http://HEAD:8265"),
    ("credentials only by env var name", {"storage": {"secret_access_key_env": "wJalrXUtn/K7MDENG"}},
     "storage.secret_access_key_env", "environment variable name"),
    ("expert_parallel must divide workers",
     {"model": {"flavour": "debug-moe"}, "train": {"workers": 3, "expert_parallel": 2}},
     "train.expert_parallel", "must divide workers (3)"),
    ("expert parallel on a dense flavour", {"model": {"flavour": "debug"}, "train": {"workers": 2, "expert_parallel": 2}},
     "train.expert_parallel", "needs an MoE flavour"),
    ("min_replicas > max_replicas",
     {"serve": {"models": [{"name": "a", "flavour": "debug",
                            "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}]}},
     "serve.models.0.autoscaling_config.min_replicas", "min_replicas (3) > max_replicas (2)"),
    ("serve model with no flavour and no checkpoint", {"serve": {"models": [{"name": "a"}]}},
     "serve.models.0.checkpoint", "names no flavour and no checkpoint"),
    ("serve model naming an unknown flavour", {"serve": {"models": [{"name": "a", "flavour": "gpt5"}]}},
     "serve.models.0.flavour", "unknown flavour 'gpt5'"),
    ("unknown model flavour", {"model": {"flavour": "gpt5"}}, "model.flavour", "unknown flavour"),
    ("group naming no worker group", {"train": {"group": "nope"}}, "train.group", "names no worker group"),
    ("worker group min > max", {"cluster": {"worker_groups": [{"name": "g", "min_workers": 3, "max_workers": 1}]}},
     "cluster.worker_groups.0.min_workers", "min_workers (3) > max_workers (1)"),
]


@pytest.mark.parametrize("case,data,field,reason", BAD, ids=[c[0] for c in BAD])
def test_validation_errors_name_the_dotted_field(case, data, field, reason):
    with pytest.raises(SpecError) as err:
        parse_spec(data, "my.yaml")
    assert err.value.field == field
    assert reason in err.value.reason
    assert str(err.value).startswith(f"my.yaml: {field}: ")


def test_cli_validate_ok_on_every_shipped_example(capsys):
    assert main(["spec", "validate", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert all(f"{p}: OK" in out for p in EXAMPLES)


def test_cli_validate_exits_2_with_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"workers": 3, "expert_parallel": 2}, "model": {"flavour": "debug-moe"}}))
    assert main(["spec", "validate", str(example_path("local")), str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{bad}: train.expert_parallel: " in captured.err
    assert "local.yaml: OK" in captured.out and "Traceback" not in captured.err


@pytest.mark.parametrize("text,field", [("train: [unclosed", "(yaml)"), ("- a list\n", "(root)")])
def test_cli_validate_broken_files(tmp_path, capsys, text, field):
    bad = tmp_path / "broken.yaml"
    bad.write_text(text)
    assert main(["spec", "validate", str(bad)]) == 2
    assert f"{bad}: {field}: " in capsys.readouterr().err


def test_cli_validate_missing_file(tmp_path, capsys):
    assert main(["spec", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: (file): " in capsys.readouterr().err


def test_cli_show_prints_the_full_spec(capsys):
    assert main(["spec", "show", str(example_path("local"))]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert parse_spec(shown) == load_spec(example_path("local"))
    assert shown["train"]["betas"] == [0.9, 0.95]  # defaults filled in


def test_curate_section_checks_its_keys_urls_and_group():
    spec = parse_spec({"curate": {"som": {"annotations": "a.json", "images": "img", "teacher": {"url": "http://t:8000/v1/",
                                                                                             "model": "m"}},
                                  "ocr": {"input": "s3://b/docs", "engine": "tesseract", "languages": ["en"]}}})
    assert spec.curate.som.teacher.url == "http://t:8000/v1" and spec.curate.som.output == "curated/som"
    assert spec.curate.ocr.output == "curated/ocr" and spec.curate.block_size >= 1
    for bad, where in ((({"som": {"annotations": "a", "images": "b", "bogus": 1}}), "curate.som.bogus"),
                       (({"som": {"annotations": "a", "images": "b", "teacher": {"url": "ftp://x", "model": "m"}}}),
                        "curate.som.teacher.url"),
                       (({"ocr": {"input": "d", "engine": "paddle"}}), "curate.ocr.engine"),
                       (({"group": "nope"}), "curate.group")):
        with pytest.raises(SpecError, match=where.replace(".", r"\.")):
            parse_spec({"curate": bad})
