"""`sphinx-x render SPEC --to kuberay|launcher|serve [-o DIR]`: deployment YAML from the spec alone.

Three targets, all pure functions of the :class:`~cluster.spec.ClusterSpec` (nothing is
started, nothing is imported from higher layers):

Stages reach this module as data (:class:`StagePlan`: a name, an entry point, a
:class:`~cluster.capacity.Demand` and, for a long-running stage, its application's import path),
never by name.

- ``serve``: a Ray Serve config (``serve deploy`` format). The app is named ``spec.name`` and
  built by the service stage's import path with ``args: {"spec": <spec dict>}``;
  one deployment per ``serve.models[]`` entry, named exactly like the model, carries its
  ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests`` and
  ``max_queued_requests``.
- ``kuberay``: ``ray.io/v1`` manifests, every pod running ``cluster.image`` (this project's image,
  ``Dockerfile``) — a RayCluster (head + every worker group, for ``sphinx-x run --address``), a
  RayJob per batch stage that brings up only the groups its demand uses
  (:func:`cluster.capacity.groups_for`) and shuts down after the job
  (``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished: cluster.job_ttl_s``), and a
  RayService per service stage (its groups only) whose ``serveConfigV2`` is the Serve config;
  plus a ConfigMap holding the spec file the RayJob entrypoints read.
- ``launcher``: a Ray cluster-launcher YAML (``ray up``): provider, node types with resources,
  min/max workers, ``cluster.image`` as the docker image, setup commands that install the
  synced sphinx-x source over the image's copy.

Pods: resources and GPU limits (``nvidia.com/gpu``), ``nodeSelector`` (the group's
``node_selector`` + ``instance_type``), ``tolerations`` and labels come from the spec's groups;
a private registry is reached through ``cluster.image_pull_secret`` (a Secret, by name).
KubeRay needs the project in the image: a spec with ``cluster.dependencies: runtime_env`` (a
stock Ray image) cannot be rendered for it.

Placement: every worker group declares its custom resource ``group.placement_resource``
(e.g. ``sphinx_group_gpu``) with ``cluster.placement.GROUP_CAPACITY`` units, plus its own
``resources`` / ``labels``; work placed on a group asks for ``PLACEMENT_FRACTION`` of one, so
placement constrains *where* work runs without limiting *how much* runs there. Every pod and
job gets the one worker environment, ``cluster.connect.worker_env``.

Secrets: credentials appear only as ``secretKeyRef`` to the Secret ``<name>-secrets``, one key
per environment-variable name (``storage.*_env``, ``serve.api_keys_env``); never as values. Each
workload gets only its own: storage keys everywhere, API keys only in the RayService.

Shared-cluster safety (``cluster.kuberay_security``, docs/security.md): token auth
(``authOptions``) on every Ray cluster, the dashboard on ``cluster.dashboard_host`` (loopback by
default), non-root pods, and ``networkpolicy.yaml`` limiting who reaches the pods.

    >>> from cluster.spec import ClusterSpec
    >>> docs = render_kuberay(ClusterSpec(), plans)     # plans: pipelines.stages.plans(spec, SPEC_IN_POD)
    >>> sorted(docs)
    ['configmap-spec.yaml', 'networkpolicy.yaml', 'raycluster.yaml', 'rayjob-preprocess.yaml', 'rayjob-train.yaml', 'rayservice.yaml']
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from cluster import pins
from cluster.capacity import Demand, groups_for
from cluster.connect import worker_env
from cluster.kuberay_security import (auth_options, container_security_context, dashboard_host, network_policy,
                                      pod_security_context, submission_mode, workload_secret_names)
from cluster.placement import GROUP_CAPACITY, node_resources, placement
from cluster.spec import ClusterSpec, NodeGroup, WorkerGroup, dump_spec
from models.errors import UserError

SPEC_MOUNT_DIR = "/etc/sphinx-x"
SPEC_IN_POD = f"{SPEC_MOUNT_DIR}/spec.yaml"
DASHBOARD_PORT = 8265
SERVE_PORT = 8000


@dataclass(frozen=True)
class StagePlan:
    """One stage as the renderers see it. ``entrypoint``: the command that runs it in a pod (with
    the spec at :data:`SPEC_IN_POD`); ``service``: the import path of the application a
    long-running stage deploys (``None`` for a batch stage: a RayJob)."""

    name: str
    entrypoint: str
    demand: Demand
    service: str | None = None


def service_plan(plans: list[StagePlan]) -> StagePlan:
    """The one long-running stage of a plan list (the Serve application)."""
    found = [p for p in plans if p.service]
    if len(found) != 1:
        raise ValueError(f"expected one service stage, got {[p.name for p in found]}")
    return found[0]


# ---------------------------------------------------------------- shared pieces


def secret_name(spec: ClusterSpec) -> str:
    """The Kubernetes Secret holding every credential the spec references by env-var name."""
    return f"{spec.name}-secrets"


def secret_env_names(spec: ClusterSpec) -> list[str]:
    """Environment variables whose values are secrets (never rendered, only referenced)."""
    s = spec.storage
    names = [s.access_key_id_env, s.secret_access_key_env, s.session_token_env, spec.serve.api_keys_env]
    return [n for n in dict.fromkeys(names) if n]


def plain_env(spec: ClusterSpec) -> dict[str, str]:
    """The worker environment a rendered node or job carries (cluster.connect.worker_env: no secrets)."""
    return worker_env(spec.storage)


def _quantity(value: float) -> str:
    """A Kubernetes quantity for a float count: 2 -> "2", 0.5 -> "500m"."""
    return str(int(value)) if float(value).is_integer() else f"{int(round(value * 1000))}m"


# ---------------------------------------------------------------- serve config


def ray_actor_options(spec: ClusterSpec, model) -> dict[str, Any]:
    """A serve model's ``ray_actor_options`` as Ray takes them, placement on its group included."""
    opts = model.ray_actor_options
    actor: dict[str, Any] = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    if opts.memory_gb:
        actor["memory"] = int(opts.memory_gb * 2**30)
    resources = {**opts.resources, **placement(spec, model.group)}
    if resources:
        actor["resources"] = resources
    return actor


def _deployment(spec: ClusterSpec, model) -> dict[str, Any]:
    actor = ray_actor_options(spec, model)
    return {
        "name": model.name,
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        "autoscaling_config": model.autoscaling_config.model_dump(exclude_none=True),
        "ray_actor_options": actor,
    }


def serve_application(spec: ClusterSpec, import_path: str) -> dict[str, Any]:
    """The one Serve application of the spec (an entry of ``applications``), built by ``import_path``."""
    return {
        "name": spec.name,
        "route_prefix": "/",
        "import_path": import_path,
        "args": {"spec": spec.model_dump(mode="json")},
        "runtime_env": {"env_vars": plain_env(spec)},
        "deployments": [_deployment(spec, m) for m in spec.serve.models],
    }


def render_serve_config(spec: ClusterSpec, import_path: str, *, http: bool = True) -> dict[str, Any]:
    """A ``serve deploy`` config; ``http=False`` leaves host/port to the platform (RayService)."""
    config: dict[str, Any] = {"proxy_location": "EveryNode"}
    if http:
        config["http_options"] = {"host": spec.serve.http.host, "port": spec.serve.http.port}
    config["applications"] = [serve_application(spec, import_path)]
    return config


# ---------------------------------------------------------------- kuberay


def _container(spec: ClusterSpec, node: NodeGroup, name: str, *, head: bool, serving: bool) -> dict[str, Any]:
    limits = {"memory": f"{int(node.memory_gb * 1024)}Mi"}
    if node.cpus:
        limits["cpu"] = _quantity(node.cpus)
    if node.gpus:
        limits["nvidia.com/gpu"] = str(node.gpus)
    env = [{"name": k, "value": v} for k, v in plain_env(spec).items()]
    env += [{"name": n, "valueFrom": {"secretKeyRef": {"name": secret_name(spec), "key": n, "optional": True}}}
            for n in workload_secret_names(spec, serving=serving)]
    ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}]
    container: dict[str, Any] = {
        "name": name,
        "image": spec.cluster.image,
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        "env": env,
        "volumeMounts": [{"name": "sphinx-x-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True}],
        "securityContext": container_security_context(),
    }
    if head:
        container["ports"] = ports
    return container


def _toleration(t) -> dict[str, Any]:
    out = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
           "tolerationSeconds": t.toleration_seconds}
    return {k: v for k, v in out.items() if v is not None}


def _pod_template(spec: ClusterSpec, node: NodeGroup, name: str, *, head: bool, serving: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [_container(spec, node, name, head=head, serving=serving)],
        "volumes": [{"name": "sphinx-x-spec", "configMap": {"name": f"{spec.name}-spec"}}],
        "securityContext": pod_security_context(),
    }
    selector = dict(node.node_selector)
    if node.instance_type:
        selector.setdefault("node.kubernetes.io/instance-type", node.instance_type)
    if selector:
        pod["nodeSelector"] = selector
    if node.tolerations:
        pod["tolerations"] = [_toleration(t) for t in node.tolerations]
    if spec.cluster.image_pull_secret:
        pod["imagePullSecrets"] = [{"name": spec.cluster.image_pull_secret}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "sphinx-x", "app.kubernetes.io/instance": spec.name}},
            "spec": pod}


def _str_map(values: dict[str, Any]) -> dict[str, str]:
    return {k: (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)) for k, v in values.items()}


def raycluster_spec(spec: ClusterSpec, groups: Optional[list[WorkerGroup]] = None, *,
                    service: bool = False) -> dict[str, Any]:
    """The ``spec`` of a RayCluster with ``groups`` (default: every group) beside the head.

    Also embedded in each RayJob (its stage's groups) and the RayService (``service``: the serving
    groups; its pods get the API keys and its dashboard listens on the pod network).
    """
    head = spec.cluster.head
    start_params = {"dashboard-host": dashboard_host(spec, service=service)}
    if not head.cpus:
        start_params["num-cpus"] = "0"  # a head that only coordinates: no work lands there
    head_group: dict[str, Any] = {
        "rayStartParams": start_params,
        "template": _pod_template(spec, head, "ray-head", head=True, serving=service),
    }
    if head.resources:
        head_group["resources"] = _str_map(head.resources)
    if head.labels:
        head_group["labels"] = dict(head.labels)
    workers = []
    for g in spec.cluster.worker_groups if groups is None else groups:
        group: dict[str, Any] = {
            "groupName": g.name,
            "replicas": g.min_workers,
            "minReplicas": g.min_workers,
            "maxReplicas": g.max_workers,
            "rayStartParams": {},
            "resources": _str_map(node_resources(g)),
            "template": _pod_template(spec, g, "ray-worker", head=False, serving=service),
        }
        if g.labels:
            group["labels"] = dict(g.labels)
        workers.append(group)
    return {
        "rayVersion": pins.ray_version(),  # the image is built on it (Dockerfile)
        "authOptions": auth_options(spec),
        "enableInTreeAutoscaling": True,
        "headGroupSpec": head_group,
        "workerGroupSpecs": workers,
    }


def _meta(spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.cluster.namespace,
            "labels": {"app.kubernetes.io/name": "sphinx-x", "app.kubernetes.io/instance": spec.name}}


def render_kuberay(spec: ClusterSpec, plans: list[StagePlan]) -> dict[str, dict[str, Any]]:
    """File name -> manifest: ConfigMap, RayCluster, a RayJob per batch stage, a RayService per
    service stage (``plans`` with their entry points for a spec at :data:`SPEC_IN_POD`)."""
    if spec.cluster.dependencies != "image":
        raise UserError(f"render --to kuberay: the pods run cluster.image ({spec.cluster.image}) and need sphinx-x "
                        "and its dependencies in it, but cluster.dependencies is "
                        f"{spec.cluster.dependencies!r}: build this project's image (Dockerfile), push it, "
                        "set cluster.image to it and cluster.dependencies: image")
    docs: dict[str, dict[str, Any]] = {
        "configmap-spec.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{spec.name}-spec"),
                                "data": {"spec.yaml": dump_spec(spec)}},
        "networkpolicy.yaml": network_policy(spec, _meta(spec, f"{spec.name}-ray"), dashboard_port=DASHBOARD_PORT,
                                             serve_port=SERVE_PORT),
        "raycluster.yaml": {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(spec, spec.name),
                            "spec": raycluster_spec(spec)},
    }
    for plan in plans:
        groups = raycluster_spec(spec, groups_for(spec, plan.demand), service=bool(plan.service))
        if plan.service:
            docs["rayservice.yaml"] = {  # one Serve application per spec: one service stage
                "apiVersion": "ray.io/v1",
                "kind": "RayService",
                "metadata": _meta(spec, f"{spec.name}-{plan.name}"),
                "spec": {
                    "serveConfigV2": yaml.safe_dump(render_serve_config(spec, plan.service, http=False),
                                                    sort_keys=False),
                    "rayClusterConfig": groups,
                },
            }
            continue
        docs[f"rayjob-{plan.name}.yaml"] = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _meta(spec, f"{spec.name}-{plan.name}"),
            "spec": {
                "entrypoint": plan.entrypoint,
                "submissionMode": submission_mode(spec),
                "runtimeEnvYAML": yaml.safe_dump({"env_vars": plain_env(spec)}, sort_keys=False),
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": spec.cluster.job_ttl_s,
                "rayClusterSpec": groups,
            },
        }
    return docs


# ---------------------------------------------------------------- cluster launcher


def _node_config(spec: ClusterSpec, node: NodeGroup) -> dict[str, Any]:
    if not node.instance_type:
        return {}
    key = {"aws": "InstanceType", "gcp": "machineType"}.get(spec.cluster.provider.get("type", ""), "InstanceType")
    return {key: node.instance_type}


def _node_type(spec: ClusterSpec, node: NodeGroup, extra: dict[str, float], lo: int, hi: int) -> dict[str, Any]:
    resources = {"CPU": node.cpus, "GPU": node.gpus, "memory": int(node.memory_gb * 2**30)}
    resources.update({k: int(round(v)) for k, v in {**node.resources, **extra}.items()})
    out = {"node_config": _node_config(spec, node), "resources": resources, "min_workers": lo, "max_workers": hi}
    if node.labels:
        out["labels"] = dict(node.labels)
    return out


def render_launcher(spec: ClusterSpec) -> dict[str, Any]:
    """A ``ray up`` cluster config. Run ``ray up`` from the project root: it syncs ``.``.

    The nodes run ``cluster.image``; setup installs the synced source without dependencies
    (editable, over the image's copy): with this project's image they are all there, on a
    stock image (``cluster.dependencies: runtime_env``) each Ray Job brings them.
    """
    types = {"head": _node_type(spec, spec.cluster.head, {}, 0, 0)}
    for g in spec.cluster.worker_groups:
        types[g.name] = _node_type(spec, g, {g.placement_resource: GROUP_CAPACITY},
                                   g.min_workers, g.max_workers)
    exports = [f"echo 'export {k}={v}' >> ~/.bashrc" for k, v in plain_env(spec).items()]
    return {
        "cluster_name": spec.name,
        "max_workers": sum(g.max_workers for g in spec.cluster.worker_groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": dict(spec.cluster.provider),
        "docker": {"image": spec.cluster.image, "container_name": "ray_container", "pull_before_run": True},
        "available_node_types": types,
        "head_node_type": "head",
        "file_mounts": {"~/sphinx-x": "."},
        "cluster_synced_files": [],
        "rsync_exclude": [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".sphinx-x"],
        "setup_commands": ["pip install --no-deps -e ~/sphinx-x", *exports],
    }


# ---------------------------------------------------------------- targets


TARGETS = {  # `render --to X` -> file name -> document (``serve`` and ``launcher`` are one file each)
    "kuberay": lambda spec, plans: render_kuberay(spec, plans),
    "launcher": lambda spec, plans: {"cluster.yaml": render_launcher(spec)},
    "serve": lambda spec, plans: {"serve.yaml": render_serve_config(spec, service_plan(plans).service)},
}


def render(spec: ClusterSpec, to: str, plans: list[StagePlan]) -> dict[str, Any]:
    """File name -> document for a target of :data:`TARGETS`."""
    if to not in TARGETS:
        raise ValueError(f"unknown render target {to!r}; choose {', '.join(TARGETS)}")
    return TARGETS[to](spec, plans)


def write(docs: dict[str, Any], out_dir: Optional[str | Path]) -> list[Path]:
    """Write each document as YAML into ``out_dir`` (or all to stdout, ``---``-separated)."""
    if out_dir is None:
        sys.stdout.write("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs.values()))
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in docs.items():
        (out / name).write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(out / name)
    return paths


def image_warning(spec: ClusterSpec) -> Optional[str]:
    """A warning when ``cluster.image`` names no registry: only nodes it was loaded onto have it."""
    image = spec.cluster.image
    if "/" in image:
        return None
    return (f"cluster.image is {image!r}, a name without a registry: nodes can start it only where it was "
            "built or loaded; push it (docker tag/push, README) and set cluster.image to REGISTRY/NAME:TAG")
