"""Rendered KubeRay workloads are safe on a shared cluster (cluster.kuberay_security via
cluster.render; docs/security.md, "KubeRay manifests"): token auth, a loopback dashboard unless the
spec asks, each workload only its own secrets, a NetworkPolicy and non-root pods — and every
manifest still valid against the KubeRay CRDs."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.render import SPEC_IN_POD, render_kuberay
from cluster.spec import EXAMPLES_DIR, parse_spec
from pipelines import stages

CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")

SPEC = {
    "name": "fleet",
    "cluster": {"image": "example.com/sphinx-x:1", "worker_groups": [
        {"name": "cpu", "cpus": 8, "memory_gb": 32, "max_workers": 4},
        {"name": "gpu", "cpus": 12, "gpus": 4, "memory_gb": 96, "max_workers": 2}]},
    "storage": {"uri": "s3://fleet-bucket/runs/one", "endpoint_url": "https://minio.example:9000",
                "access_key_id_env": "FLEET_KEY_ID", "secret_access_key_env": "FLEET_SECRET"},
    "data": {"group": "cpu"},
    "train": {"group": "gpu", "use_gpu": True, "workers": 4},
    "serve": {"api_keys_env": "FLEET_API_KEYS", "models": [{"name": "m", "flavour": "debug", "group": "gpu"}]},
}


@pytest.fixture(scope="module")
def crds() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}")
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])
    return out


def _docs(data: dict) -> dict:
    spec = parse_spec(data)
    return render_kuberay(spec, stages.plans(spec, SPEC_IN_POD))


def _cluster(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]


def _pods(doc: dict) -> list[dict]:
    c = _cluster(doc)
    return [c["headGroupSpec"]["template"]] + [g["template"] for g in c["workerGroupSpecs"]]


def _env_names(pod: dict) -> set[str]:
    return {e["name"] for c in pod["spec"]["containers"] for e in c["env"]}


def _all_specs() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in sorted(EXAMPLES_DIR.glob("*.yaml"))] + [("fleet", SPEC)]


@pytest.mark.parametrize("name,data", _all_specs(), ids=[n for n, _ in _all_specs()])
def test_every_ray_workload_has_token_auth_non_root_pods_and_validates(name, data, crds):
    docs = _docs(data)
    ray_docs = [d for d in docs.values() if d["kind"] in RAY_KINDS]
    assert sorted(d["kind"] for d in ray_docs) == ["RayCluster", "RayJob", "RayJob", "RayService"]
    for doc in ray_docs:
        crds[doc["kind"]].validate(doc)
        assert _cluster(doc)["authOptions"] == {"mode": "token"}, doc["metadata"]["name"]
        for pod in _pods(doc):
            ctx = pod["spec"]["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
            for c in pod["spec"]["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "networkpolicy.yaml" in docs


def test_the_dashboard_is_loopback_unless_the_spec_asks():
    docs = _docs(SPEC)
    head = lambda d: _cluster(d)["headGroupSpec"]["rayStartParams"]["dashboard-host"]  # noqa: E731
    assert head(docs["raycluster.yaml"]) == "127.0.0.1"
    for job in ("rayjob-preprocess.yaml", "rayjob-train.yaml"):
        assert head(docs[job]) == "127.0.0.1"
        assert docs[job]["spec"]["submissionMode"] == "SidecarMode"  # submits from inside the head pod
    assert head(docs["rayservice.yaml"]) == "0.0.0.0"  # the operator deploys Serve through it
    exposed = _docs({**SPEC, "cluster": {**SPEC["cluster"], "dashboard_host": "0.0.0.0"}})
    assert head(exposed["raycluster.yaml"]) == "0.0.0.0"
    assert exposed["rayjob-train.yaml"]["spec"]["submissionMode"] == "K8sJobMode"
    with pytest.raises(Exception, match="dashboard_host"):
        parse_spec({**SPEC, "cluster": {**SPEC["cluster"], "dashboard_host": "10.0.0.1"}})


def test_a_named_token_secret_is_used(crds):
    docs = _docs({**SPEC, "cluster": {**SPEC["cluster"], "auth_token_secret": "fleet-ray-token"}})
    for doc in docs.values():
        if doc["kind"] in RAY_KINDS:
            assert _cluster(doc)["authOptions"] == {"mode": "token", "secretName": "fleet-ray-token"}
            crds[doc["kind"]].validate(doc)
    with pytest.raises(Exception, match="Kubernetes Secret name"):
        parse_spec({**SPEC, "cluster": {**SPEC["cluster"], "auth_token_secret": "Bad Name"}})


def test_each_workload_gets_only_its_own_secrets():
    docs = _docs(SPEC)
    storage = {"FLEET_KEY_ID", "FLEET_SECRET"}
    for name, doc in docs.items():
        if doc["kind"] not in RAY_KINDS:
            continue
        for pod in _pods(doc):
            names = _env_names(pod)
            assert storage <= names, name  # every stage reads or writes storage
            assert ("FLEET_API_KEYS" in names) == (doc["kind"] == "RayService"), name
            refs = [e for c in pod["spec"]["containers"] for e in c["env"] if e["name"] in storage | {"FLEET_API_KEYS"}]
            assert all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "fleet-secrets" for e in refs)


def test_network_policy_covers_every_pod_and_opens_only_what_is_needed():
    docs = _docs(SPEC)
    policy = docs["networkpolicy.yaml"]
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for doc in docs.values():
        if doc["kind"] in RAY_KINDS:
            for pod in _pods(doc):
                assert selector.items() <= pod["metadata"]["labels"].items()
    same, operator, serve = policy["spec"]["ingress"]
    assert same == {"from": [{"podSelector": {"matchLabels": selector}}]}
    assert operator["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}}]
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert serve == {"ports": [{"protocol": "TCP", "port": 8000}]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
