"""`sphinx-x render SPEC --to kuberay|launcher|serve [-o DIR]`: deployment YAML from the spec alone.

Three targets, all pure functions of the :class:`~cluster.spec.ClusterSpec` (nothing is
started, nothing is imported from higher layers):

- ``serve``: a Ray Serve config (``serve deploy`` format). The app is named ``spec.name`` and
  built by the import path ``pipelines.serve:build_app`` with ``args: {"spec": <spec dict>}``;
  one deployment per ``serve.models[]`` entry, named exactly like the model, carries its
  ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests`` and
  ``max_queued_requests``.
- ``kuberay``: ``ray.io/v1`` manifests — a RayCluster (head + one worker group per spec
  group), one RayJob per stage (entrypoint ``sphinx-x run /etc/sphinx-x/spec.yaml --stages X
  --address local``) and a RayService whose ``serveConfigV2`` is the Serve config; plus a
  ConfigMap holding the spec file the entrypoints read.
- ``launcher``: a Ray cluster-launcher YAML (``ray up``): provider, node types with resources,
  min/max workers, setup commands that install sphinx-x.

Placement: every worker group declares its custom resource ``group.placement_resource``
(e.g. ``sphinx_group_gpu``) with ``cluster.placement.GROUP_CAPACITY`` units, plus its own
``resources`` / ``labels``; work placed on a group asks for ``PLACEMENT_FRACTION`` of one, so
placement constrains *where* work runs without limiting *how much* runs there. Every pod and
job gets the one worker environment, ``cluster.connect.worker_env``.

Secrets: credentials appear only as ``secretKeyRef`` to the Secret ``<name>-secrets``, one key
per environment-variable name (``storage.*_env``, ``serve.api_keys_env``); never as values.

    >>> from cluster.spec import ClusterSpec
    >>> docs = render_kuberay(ClusterSpec())
    >>> sorted(docs)[:3]
    ['configmap-spec.yaml', 'raycluster.yaml', 'rayjob-preprocess.yaml']
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from cluster.connect import worker_env
from cluster.layout import STAGES, stage_entrypoint
from cluster.placement import GROUP_CAPACITY, node_resources, placement
from cluster.spec import ClusterSpec, NodeGroup, dump_spec, load_spec

SERVE_IMPORT_PATH = "pipelines.serve:build_app"
SPEC_MOUNT_DIR = "/etc/sphinx-x"
SPEC_IN_POD = f"{SPEC_MOUNT_DIR}/spec.yaml"
DASHBOARD_PORT = 8265
SERVE_PORT = 8000


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


def serve_application(spec: ClusterSpec) -> dict[str, Any]:
    """The one Serve application of the spec (an entry of ``applications``)."""
    return {
        "name": spec.name,
        "route_prefix": "/",
        "import_path": SERVE_IMPORT_PATH,
        "args": {"spec": spec.model_dump(mode="json")},
        "runtime_env": {"env_vars": plain_env(spec)},
        "deployments": [_deployment(spec, m) for m in spec.serve.models],
    }


def render_serve_config(spec: ClusterSpec, *, http: bool = True) -> dict[str, Any]:
    """A ``serve deploy`` config; ``http=False`` leaves host/port to the platform (RayService)."""
    config: dict[str, Any] = {"proxy_location": "EveryNode"}
    if http:
        config["http_options"] = {"host": spec.serve.http.host, "port": spec.serve.http.port}
    config["applications"] = [serve_application(spec)]
    return config


# ---------------------------------------------------------------- kuberay


def _container(spec: ClusterSpec, node: NodeGroup, name: str, *, head: bool) -> dict[str, Any]:
    limits = {"memory": f"{int(node.memory_gb * 1024)}Mi"}
    if node.cpus:
        limits["cpu"] = _quantity(node.cpus)
    if node.gpus:
        limits["nvidia.com/gpu"] = str(node.gpus)
    env = [{"name": k, "value": v} for k, v in plain_env(spec).items()]
    env += [{"name": n, "valueFrom": {"secretKeyRef": {"name": secret_name(spec), "key": n, "optional": True}}}
            for n in secret_env_names(spec)]
    ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}]
    container: dict[str, Any] = {
        "name": name,
        "image": spec.cluster.image,
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        "env": env,
        "volumeMounts": [{"name": "sphinx-x-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True}],
    }
    if head:
        container["ports"] = ports
    return container


def _pod_template(spec: ClusterSpec, node: NodeGroup, name: str, *, head: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [_container(spec, node, name, head=head)],
        "volumes": [{"name": "sphinx-x-spec", "configMap": {"name": f"{spec.name}-spec"}}],
    }
    if node.instance_type:
        pod["nodeSelector"] = {"node.kubernetes.io/instance-type": node.instance_type}
    return {"metadata": {"labels": {"app.kubernetes.io/name": "sphinx-x", "app.kubernetes.io/instance": spec.name}},
            "spec": pod}


def _str_map(values: dict[str, Any]) -> dict[str, str]:
    return {k: (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)) for k, v in values.items()}


def raycluster_spec(spec: ClusterSpec) -> dict[str, Any]:
    """The ``spec`` of a RayCluster (also embedded in every RayJob and the RayService)."""
    head = spec.cluster.head
    head_group: dict[str, Any] = {
        "rayStartParams": {"dashboard-host": "0.0.0.0"},
        "template": _pod_template(spec, head, "ray-head", head=True),
    }
    if head.resources:
        head_group["resources"] = _str_map(head.resources)
    if head.labels:
        head_group["labels"] = dict(head.labels)
    workers = []
    for g in spec.cluster.worker_groups:
        group: dict[str, Any] = {
            "groupName": g.name,
            "replicas": g.min_workers,
            "minReplicas": g.min_workers,
            "maxReplicas": g.max_workers,
            "rayStartParams": {},
            "resources": _str_map(node_resources(g)),
            "template": _pod_template(spec, g, "ray-worker", head=False),
        }
        if g.labels:
            group["labels"] = dict(g.labels)
        workers.append(group)
    return {
        "rayVersion": _ray_version(spec.cluster.image),
        "enableInTreeAutoscaling": True,
        "headGroupSpec": head_group,
        "workerGroupSpecs": workers,
    }


def _ray_version(image: str) -> str:
    """`rayproject/ray:2.60.0-py311-cpu` -> `2.60.0`; any other tag -> the installed Ray's."""
    tag = image.rsplit(":", 1)[-1] if ":" in image else ""
    head = tag.split("-", 1)[0]
    if head.count(".") == 2 and head.replace(".", "").isdigit():
        return head
    import ray

    return ray.__version__


def _meta(spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.cluster.namespace,
            "labels": {"app.kubernetes.io/name": "sphinx-x", "app.kubernetes.io/instance": spec.name}}


def render_kuberay(spec: ClusterSpec) -> dict[str, dict[str, Any]]:
    """File name -> manifest: ConfigMap, RayCluster, one RayJob per stage, RayService."""
    cluster = raycluster_spec(spec)
    docs: dict[str, dict[str, Any]] = {
        "configmap-spec.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{spec.name}-spec"),
                                "data": {"spec.yaml": dump_spec(spec)}},
        "raycluster.yaml": {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(spec, spec.name),
                            "spec": cluster},
    }
    for stage in STAGES:
        docs[f"rayjob-{stage}.yaml"] = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _meta(spec, f"{spec.name}-{stage}"),
            "spec": {
                "entrypoint": stage_entrypoint(stage, SPEC_IN_POD),
                "runtimeEnvYAML": yaml.safe_dump({"env_vars": plain_env(spec)}, sort_keys=False),
                "shutdownAfterJobFinishes": stage != "serve",
                "ttlSecondsAfterFinished": 600,
                "rayClusterSpec": cluster,
            },
        }
    docs["rayservice.yaml"] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(spec, f"{spec.name}-serve"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(render_serve_config(spec, http=False), sort_keys=False),
            "rayClusterConfig": cluster,
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
    """A ``ray up`` cluster config. Run ``ray up`` from the project root: it syncs ``.``."""
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
        "setup_commands": ["pip install -e ~/sphinx-x", *exports],
    }


# ---------------------------------------------------------------- CLI


def render(spec: ClusterSpec, to: str) -> dict[str, Any]:
    """File name -> document for a target (``serve`` and ``launcher`` are one file each)."""
    if to == "kuberay":
        return render_kuberay(spec)
    if to == "launcher":
        return {"cluster.yaml": render_launcher(spec)}
    if to == "serve":
        return {"serve.yaml": render_serve_config(spec)}
    raise ValueError(f"unknown render target {to!r}; choose kuberay, launcher or serve")


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


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if spec.storage.endpoint_url == "embedded" and args.to != "serve":
        print("warning: storage.endpoint_url is 'embedded' (a server on 127.0.0.1 of one machine); "
              "a real cluster needs an S3 endpoint every node can reach", file=sys.stderr)
    paths = write(render(spec, args.to), args.output)
    for path in paths:
        print(path)
    return 0
