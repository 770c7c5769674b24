"""render: every spec renders KubeRay manifests valid against the v1.7.0 CRDs, a launcher YAML
valid against Ray's own schema, a Serve config Ray accepts — and never a credential value. Each
RayJob brings up only its stage's worker groups, the RayService only the serving groups, and
every pod runs cluster.image with the groups' resources, selectors and tolerations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.placement import GROUP_CAPACITY, PLACEMENT_FRACTION
from cluster.capacity import groups_for
from cluster.render import SPEC_IN_POD, image_warning, render_launcher, render_serve_config
from cluster.render import render_kuberay as _render_kuberay
from cluster.spec import EXAMPLES_DIR, PROJECT_VERSION, load_spec, parse_spec
from models.errors import UserError
from pipelines import stages
from pipelines.cli import main
from pipelines.stages.serve import APP_IMPORT_PATH


def render_kuberay(spec):
    """The manifests of the registry's stages (what `sphinx-x render --to kuberay` writes)."""
    return _render_kuberay(spec, stages.plans(spec, SPEC_IN_POD))


def stage_groups(spec, stage: str):
    return groups_for(spec, stages.get(stage).demand(spec))

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"

MULTI_GROUP = {
    "name": "fleet",
    "cluster": {
        "address": "http://head.example:8265",
        "image": "example.com/sphinx-x:2.60.0-py311-gpu",
        "head": {"cpus": 4, "memory_gb": 16},
        "worker_groups": [
            {"name": "cpu", "cpus": 8, "memory_gb": 32, "max_workers": 4, "labels": {"tier": "cpu"}},
            {"name": "gpu-a100", "cpus": 12, "gpus": 4, "memory_gb": 96.5, "instance_type": "p4d.24xlarge",
             "min_workers": 1, "max_workers": 2, "resources": {"a100": 4}},
        ],
    },
    "storage": {"uri": "s3://fleet-bucket/runs/one", "endpoint_url": "https://minio.example:9000",
                "access_key_id_env": "FLEET_KEY_ID", "secret_access_key_env": "FLEET_SECRET"},
    "data": {"group": "cpu"},
    "train": {"group": "gpu-a100", "use_gpu": True, "workers": 4},
    "serve": {"api_keys_env": "FLEET_API_KEYS", "models": [
        {"name": "sphinx-tiny", "flavour": "debug", "group": "gpu-a100",
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4},
         "ray_actor_options": {"num_cpus": 2, "num_gpus": 1, "memory_gb": 8},
         "max_ongoing_requests": 8, "max_queued_requests": 20},
        {"name": "sphinx-cpu", "flavour": "debug"},
    ]},
}
SECRETS = {"FLEET_KEY_ID": "AKIAFLEETFAKE0001", "FLEET_SECRET": "fleet-secret-value-do-not-leak",
           "FLEET_API_KEYS": "sk-fleet-api-key-1,sk-fleet-api-key-2",
           "AWS_ACCESS_KEY_ID": "AKIAAWSFAKE0002", "AWS_SECRET_ACCESS_KEY": "aws-secret-value-do-not-leak",
           "AWS_SESSION_TOKEN": "aws-session-token-do-not-leak"}


def _specs() -> list[tuple[str, dict]]:
    out = [(p.name, yaml.safe_load(p.read_text())) for p in sorted(EXAMPLES_DIR.glob("*.yaml"))]
    return out + [("multi-group", MULTI_GROUP)]


SPECS = _specs()


@pytest.fixture(scope="module")
def crds() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (expected ../shared/kuberay-crds beside the repo)")
    schemas = {}
    for path in CRD_DIR.glob("ray.io_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = version["schema"]["openAPIV3Schema"]
        # one validator per kind: jsonschema.validate() would re-check the huge schema every call
        schemas[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    assert {"RayCluster", "RayJob", "RayService"} <= set(schemas)
    return schemas


@pytest.mark.parametrize("name,data", SPECS, ids=[n for n, _ in SPECS])
def test_kuberay_manifests_validate_against_crds(name, data, crds):
    spec = parse_spec(data, name)
    docs = render_kuberay(spec)
    kinds = sorted(d["kind"] for d in docs.values())
    assert kinds == ["ConfigMap", "NetworkPolicy", "RayCluster", "RayJob", "RayJob", "RayService"]
    for doc in docs.values():
        if doc["kind"] in crds:
            assert doc["apiVersion"] == "ray.io/v1"
            crds[doc["kind"]].validate(doc)
    # the spec the RayJob entrypoints read is the same spec
    assert parse_spec(yaml.safe_load(docs["configmap-spec.yaml"]["data"]["spec.yaml"])) == spec


def test_crd_validation_catches_a_wrong_type(crds):
    doc = render_kuberay(parse_spec(MULTI_GROUP))["raycluster.yaml"]
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        crds["RayCluster"].validate(doc)


def test_raycluster_groups_resources_and_placement():
    spec = parse_spec(MULTI_GROUP)
    cluster = render_kuberay(spec)["raycluster.yaml"]["spec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert "resources" not in head  # nothing is placed on the head
    cpu, gpu = cluster["workerGroupSpecs"]
    assert (cpu["groupName"], cpu["minReplicas"], cpu["maxReplicas"], cpu["replicas"]) == ("cpu", 0, 4, 0)
    assert cpu["resources"] == {"sphinx_group_cpu": str(int(GROUP_CAPACITY))}
    assert cpu["labels"] == {"tier": "cpu"}
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["resources"] == {"sphinx_group_gpu_a100": "1000", "a100": "4"}
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["image"] == "example.com/sphinx-x:2.60.0-py311-gpu"
    assert container["resources"]["limits"] == {"memory": "98816Mi", "cpu": "12", "nvidia.com/gpu": "4"}
    assert gpu["template"]["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.example:9000"
    assert "FLEET_API_KEYS" not in env  # serving API keys only where the ingress runs (the RayService)
    for name in ("FLEET_KEY_ID", "FLEET_SECRET"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "fleet-secrets"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
        assert "value" not in env[name]


def _groups(cluster_spec: dict) -> list[str]:
    return [g["groupName"] for g in cluster_spec["workerGroupSpecs"]]


def test_rayjobs_bring_up_only_their_stages_groups_and_shut_down():
    docs = render_kuberay(parse_spec(MULTI_GROUP))
    assert "rayjob-serve.yaml" not in docs  # serving is the RayService
    expected = {"preprocess": ["cpu"], "train": ["gpu-a100"]}
    for stage, groups in expected.items():
        job = docs[f"rayjob-{stage}.yaml"]["spec"]
        assert job["entrypoint"] == f"python -m pipelines.cli run /etc/sphinx-x/spec.yaml --stages {stage} --address local"
        assert job["shutdownAfterJobFinishes"] is True
        assert job["ttlSecondsAfterFinished"] == 600  # cluster.job_ttl_s
        assert _groups(job["rayClusterSpec"]) == groups
        assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["AWS_REGION"] == "us-east-1"
    # the train job's GPU pods carry their GPU limit; the preprocess job has no GPU anywhere
    (gpu,) = docs["rayjob-train.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in yaml.safe_dump(docs["rayjob-preprocess.yaml"])
    # serving: the GPU group of the placed model + the CPU group the unplaced CPU model needs
    assert _groups(docs["rayservice.yaml"]["spec"]["rayClusterConfig"]) == ["cpu", "gpu-a100"]
    # the long-lived RayCluster (for `sphinx-x run --address`) has every group
    assert _groups(docs["raycluster.yaml"]["spec"]) == ["cpu", "gpu-a100"]


@pytest.mark.parametrize("name,expected", [
    ("aws.yaml", {"preprocess": ["cpu"], "train": ["gpu"], "serve": ["gpu"]}),
    ("kuberay.yaml", {"preprocess": ["cpu"], "train": ["gpu-a100"], "serve": ["gpu-serve"]}),
    ("local.yaml", {"preprocess": [], "train": [], "serve": []}),
])
def test_each_examples_manifests_carry_their_stages_groups(name, expected):
    docs = render_kuberay(load_spec(EXAMPLES_DIR / name))
    carried = {stage: _groups(docs[f"rayjob-{stage}.yaml"]["spec"]["rayClusterSpec"]) for stage in ("preprocess", "train")}
    carried["serve"] = _groups(docs["rayservice.yaml"]["spec"]["rayClusterConfig"])
    assert carried == expected


def test_stage_groups_for_unplaced_work_follow_the_kind_of_work():
    spec = parse_spec({"cluster": {"worker_groups": [{"name": "big-gpu", "gpus": 8}, {"name": "cpu-a"},
                                                     {"name": "cpu-b", "cpus": 16}]},
                       "train": {"use_gpu": True},
                       "serve": {"models": [{"name": "m", "flavour": "debug"}]}})
    names = {stage: [g.name for g in stage_groups(spec, stage)] for stage in ("preprocess", "train", "serve")}
    assert names == {"preprocess": ["cpu-a", "cpu-b"], "train": ["big-gpu"], "serve": ["cpu-a", "cpu-b"]}
    # GPU work on a spec without GPU groups (and CPU work on one with only GPU groups): every group
    only_cpu = parse_spec({"cluster": {"worker_groups": [{"name": "cpu"}]}, "train": {"use_gpu": True}})
    assert [g.name for g in stage_groups(only_cpu, "train")] == ["cpu"]
    only_gpu = parse_spec({"cluster": {"worker_groups": [{"name": "gpu", "gpus": 1}]}})
    assert [g.name for g in stage_groups(only_gpu, "preprocess")] == ["gpu"]


def test_every_pod_runs_the_image_with_the_groups_selectors_tolerations_and_pull_secret(crds):
    data = json.loads(json.dumps(MULTI_GROUP))
    data["cluster"]["image_pull_secret"] = "registry-creds"
    data["cluster"]["head"]["cpus"] = 0
    data["cluster"]["job_ttl_s"] = 120
    data["cluster"]["worker_groups"][1]["node_selector"] = {"pool": "a100"}
    data["cluster"]["worker_groups"][1]["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "value": "true", "effect": "NoExecute", "toleration_seconds": 30}]
    docs = render_kuberay(parse_spec(data))
    for doc in docs.values():
        if doc["kind"] in crds:
            crds[doc["kind"]].validate(doc)
    pods = []
    for doc in docs.values():
        if doc["kind"] not in ("ConfigMap", "NetworkPolicy"):
            cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert cluster["rayVersion"] == "2.60.0"
            pods += [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert len(pods) == 3 + 2 + 2 + 3  # raycluster, two jobs (head + 1 group), service (head + 2 groups)
    for pod in pods:
        assert [c["image"] for c in pod["spec"]["containers"]] == ["example.com/sphinx-x:2.60.0-py311-gpu"]
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]
    train = docs["rayjob-train.yaml"]["spec"]
    assert train["ttlSecondsAfterFinished"] == 120
    assert train["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_pod = train["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"pool": "a100", "node.kubernetes.io/instance-type": "p4d.24xlarge"}
    assert gpu_pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30}]
    cpu_pod = docs["rayjob-preprocess.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "tolerations" not in cpu_pod and "nodeSelector" not in cpu_pod


def test_default_image_is_this_projects_at_its_version():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert PROJECT_VERSION == version
    spec = parse_spec({})
    assert spec.cluster.image == f"sphinx-x:{version}" and spec.cluster.dependencies == "image"
    containers = [g["template"]["spec"]["containers"][0]["image"]
                  for g in [render_kuberay(spec)["raycluster.yaml"]["spec"]["headGroupSpec"]]]
    assert containers == [f"sphinx-x:{version}"]
    assert render_launcher(spec)["docker"]["image"] == f"sphinx-x:{version}"
    assert "without a registry" in image_warning(spec)
    assert image_warning(parse_spec({"cluster": {"image": "ghcr.io/team/sphinx-x:0.1.0"}})) is None


def test_kuberay_needs_the_project_in_the_image():
    spec = parse_spec({"cluster": {"image": "rayproject/ray:2.60.0-py311-gpu", "dependencies": "runtime_env"}})
    with pytest.raises(UserError, match="cluster.dependencies: image"):
        render_kuberay(spec)
    assert render_launcher(spec)["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"


@pytest.mark.parametrize("bad,field", [
    ({"cluster": {"image": "Has Spaces:1"}}, "cluster.image"),
    ({"cluster": {"image_pull_secret": "Bad_Secret"}}, "cluster.image_pull_secret"),
    ({"cluster": {"dependencies": "conda"}}, "cluster.dependencies"),
    ({"cluster": {"head": {"tolerations": [{"operator": "Equal", "value": "x"}]}}}, "cluster.head.tolerations.0.key"),
    ({"cluster": {"head": {"tolerations": [{"key": "k", "operator": "Exists", "value": "x"}]}}},
     "cluster.head.tolerations.0.value"),
])
def test_bad_cluster_fields_name_the_field(bad, field):
    from cluster.spec import SpecError

    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert err.value.field == field


def test_serve_config_is_accepted_by_ray_and_carries_model_options():
    from ray.serve.schema import ServeDeploySchema

    spec = parse_spec(MULTI_GROUP)
    config = render_serve_config(spec, APP_IMPORT_PATH)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["name"], app["import_path"]) == ("fleet", APP_IMPORT_PATH)
    assert parse_spec(app["args"]["spec"]) == spec
    tiny, cpu = app["deployments"]
    assert tiny["name"] == "sphinx-tiny"
    assert tiny["autoscaling_config"]["max_replicas"] == 3
    assert tiny["autoscaling_config"]["target_ongoing_requests"] == 4
    assert (tiny["max_ongoing_requests"], tiny["max_queued_requests"]) == (8, 20)
    assert tiny["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1, "memory": 8 * 2**30,
                                         "resources": {"sphinx_group_gpu_a100": PLACEMENT_FRACTION}}
    assert "resources" not in cpu["ray_actor_options"]  # unplaced: may run anywhere
    # the RayService carries the same application
    service = render_kuberay(spec)["rayservice.yaml"]["spec"]
    assert yaml.safe_load(service["serveConfigV2"])["applications"] == config["applications"]


def test_launcher_validates_against_ray_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = render_launcher(parse_spec(MULTI_GROUP))
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(types) == {"head", "cpu", "gpu-a100"}
    gpu = types["gpu-a100"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (1, 2)
    assert gpu["resources"]["GPU"] == 4 and gpu["resources"]["sphinx_group_gpu_a100"] == 1000
    assert gpu["node_config"] == {"InstanceType": "p4d.24xlarge"}
    assert types["cpu"]["labels"] == {"tier": "cpu"}
    assert any("pip install" in c and "sphinx-x" in c for c in config["setup_commands"])
    assert config["max_workers"] == 6


@pytest.mark.parametrize("name,data", SPECS, ids=[n for n, _ in SPECS])
def test_no_rendered_file_contains_a_credential_value(name, data, tmp_path, monkeypatch, capsys):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    for target in ("kuberay", "launcher", "serve"):
        assert main(["render", str(spec_file), "--to", target, "-o", str(tmp_path / target)]) == 0
    assert main(["render", str(spec_file), "--to", "serve"]) == 0  # stdout too
    texts = [p.read_text() for p in tmp_path.rglob("*.yaml") if p != spec_file] + [capsys.readouterr().out]
    assert len(texts) == 6 + 1 + 1 + 1
    for text in texts:
        for value in SECRETS.values():
            assert value not in text
    kuberay = "".join(p.read_text() for p in (tmp_path / "kuberay").glob("*.yaml"))
    assert "secretKeyRef" in kuberay


def test_render_bad_spec_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {worker_groups: [{name: Bad_Name}]}\n")
    assert main(["render", str(bad), "--to", "kuberay"]) == 2
    assert "cluster.worker_groups.0.name" in capsys.readouterr().err


def test_render_does_not_import_higher_layers():
    code = ("import sys; from cluster.spec import ClusterSpec; from cluster.render import render, StagePlan; "
            "from cluster.capacity import Demand, Work; "
            "plans = [StagePlan('a', 'python -m x', Demand('a', (Work('w', 1, {'CPU': 1.0}),))), "
            "StagePlan('b', 'python -m y', Demand('b'), service='m:app')]; "
            "[render(ClusterSpec(), t, plans) for t in ('kuberay', 'launcher', 'serve')]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pipelines', 'actors')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
