"""What makes a rendered KubeRay workload safe on a shared cluster (docs/security.md, "KubeRay
manifests"); ``cluster.render`` puts these pieces into every RayCluster / RayJob / RayService.

- **Token auth**: ``authOptions: {mode: token}`` on every Ray cluster spec (KubeRay >= 1.5.1
  then sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from a Secret in every Ray container;
  Ray 2.60's ``ray start`` would otherwise turn auth on only where a token already exists, and
  none does in a fresh pod). ``cluster.auth_token_secret`` names the Secret (key ``auth_token``);
  unset, KubeRay generates one per cluster.
- **Dashboard bind**: ``dashboard-host`` is ``cluster.dashboard_host`` (``127.0.0.1`` unless the
  spec says ``0.0.0.0``; KubeRay itself would default to ``0.0.0.0``). A RayJob with a loopback
  dashboard submits from a sidecar in the head pod (``submissionMode: SidecarMode``). A
  RayService always listens on the pod network: the operator deploys and watches Serve through
  the dashboard; the NetworkPolicy and the token guard it.
- **Secrets per workload**: storage credentials go to every workload (every stage reads or
  writes storage); the serving API keys only to the RayService, where the ingress runs.
- **NetworkPolicy**: pods of this spec accept Ray traffic only from each other, the dashboard
  also from the KubeRay operator's namespace, and the Serve port (8000) from anywhere.
- **Non-root**: every pod runs as the image's ``ray`` user (uid 1000, gid 100: the
  rayproject/ray base of ``Dockerfile``), no privilege escalation, all capabilities dropped,
  the runtime's default seccomp profile.

    >>> auth_options(ClusterSpec())
    {'mode': 'token'}
"""

from __future__ import annotations

from typing import Any

from cluster.spec import ClusterSpec

TOKEN_KEY = "auth_token"  # the key KubeRay reads in cluster.auth_token_secret
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of the rayproject/ray images
LOOPBACK = "127.0.0.1"
INSTANCE_LABEL = "app.kubernetes.io/instance"


def auth_options(spec: ClusterSpec) -> dict[str, Any]:
    """A RayClusterSpec's ``authOptions``: token auth, from the spec's Secret when it names one."""
    out: dict[str, Any] = {"mode": "token"}
    if spec.cluster.auth_token_secret:
        out["secretName"] = spec.cluster.auth_token_secret
    return out


def dashboard_host(spec: ClusterSpec, *, service: bool) -> str:
    """The head's ``dashboard-host``: the spec's, except a RayService's (the operator must reach it)."""
    return "0.0.0.0" if service else spec.cluster.dashboard_host


def submission_mode(spec: ClusterSpec) -> str:
    """How KubeRay submits a RayJob: from a sidecar in the head pod when the dashboard is loopback."""
    return "SidecarMode" if spec.cluster.dashboard_host == LOOPBACK else "K8sJobMode"


def workload_secret_names(spec: ClusterSpec, *, serving: bool) -> list[str]:
    """Environment variables (secret values, rendered as ``secretKeyRef`` only) a workload gets:
    the storage credentials everywhere, ``serve.api_keys_env`` only where the ingress runs."""
    s = spec.storage
    names = [s.access_key_id_env, s.secret_access_key_env, s.session_token_env]
    if serving:
        names.append(spec.serve.api_keys_env)
    return [n for n in dict.fromkeys(names) if n]


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def network_policy(spec: ClusterSpec, meta: dict[str, Any], *, dashboard_port: int, serve_port: int) -> dict[str, Any]:
    """A ``networking.k8s.io/v1`` NetworkPolicy over every pod this spec renders (by its instance
    label): ingress from the same pods on any port (GCS, raylets, object transfer), from the
    KubeRay operator's namespace to the dashboard, and from anywhere to the Serve port."""
    same = {"podSelector": {"matchLabels": {INSTANCE_LABEL: spec.name}}}
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": spec.cluster.operator_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": {INSTANCE_LABEL: spec.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [same]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": dashboard_port}]},
                {"ports": [{"protocol": "TCP", "port": serve_port}]},
            ],
        },
    }
