"""`sphinx-x serve SPEC`: the family behind autoscaled replicas, with an OpenAI-compatible API.

One Serve application named ``spec.name`` (route prefix ``/``):

    SphinxXIngress (FastAPI, actors.ingress)  --DeploymentHandle-->  <serve.models[i].name>
      /v1/chat/completions, /v1/models,                               (actors.replica.ModelReplica,
      /v1/stats, /healthz, / (web page)                                one deployment per member)

Each member deployment is named exactly like its ``serve.models`` entry and carries that
entry's ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests`` and
``max_queued_requests`` (so a rendered Serve config can override them by name).

    sphinx-x serve SPEC            # deploy, print the URL, block until Ctrl-C, then delete the app
    sphinx-x serve SPEC --detach   # deploy and return (needs a persistent cluster: `sphinx-x up`)

``build_app({"spec": <spec dict>})`` is the import path ``sphinx-x render --to serve`` writes,
so ``serve run serve.yaml`` / ``serve deploy serve.yaml`` build the same application.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from typing import Any

from cluster.render import ray_actor_options
from cluster.spec import ClusterSpec, load_spec, parse_spec
from models.errors import UserError

log = logging.getLogger(__name__)

INGRESS_NAME = "SphinxXIngress"


# ---------------------------------------------------------------- the application


def build_application(spec: ClusterSpec, *, batching: bool = True):
    """The Serve application of a spec; ``batching=False`` runs every request alone (benchmarks)."""
    from actors.ingress import Ingress, key_hashes_from_env
    from actors.replica import ModelReplica

    names = [m.name for m in spec.serve.models]
    if INGRESS_NAME in names:
        raise UserError(f"serve.models: the name {INGRESS_NAME!r} is reserved for the ingress")
    storage = spec.storage.model_dump(mode="json")
    handles = {}
    for m in spec.serve.models:
        member = m.model_dump(mode="json")
        if not batching:
            member["max_batch_size"] = 1
        deployment = ModelReplica.options(
            name=m.name,
            autoscaling_config=m.autoscaling_config.model_dump(exclude_none=True),
            ray_actor_options=ray_actor_options(spec, m),
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
        )
        handles[m.name] = deployment.bind(member, storage, spec.train.output, spec.serve.max_image_pixels)
    return Ingress.options(name=INGRESS_NAME).bind(
        spec.serve.model_dump(mode="json"), storage, handles, key_hashes_from_env(spec.serve.api_keys_env))


def build_app(args: dict):
    """Serve's import-path entry: ``args = {"spec": <ClusterSpec as a JSON-able dict>}``."""
    if not isinstance(args, dict) or "spec" not in args:
        raise UserError("build_app needs args: {spec: <the cluster spec as a mapping>}")
    return build_application(parse_spec(args["spec"], "serve args.spec"))


# ---------------------------------------------------------------- deploying


def check_members(spec: ClusterSpec) -> None:
    """Fail early, on the driver, for checkpoints that cannot be found."""
    from actors.model_loader import TRAIN_EXPORT, resolve_checkpoint

    needs_storage = []
    for m in spec.serve.models:
        if m.checkpoint is None:
            continue
        if os.path.isabs(m.checkpoint):
            if not os.path.isdir(m.checkpoint):
                raise UserError(f"serve model {m.name!r}: checkpoint directory {m.checkpoint} does not exist")
            continue
        needs_storage.append(m)
    if not needs_storage:
        return
    from cluster.storage import open_storage

    storage = open_storage(spec.storage)
    for m in needs_storage:
        uri = resolve_checkpoint(m.checkpoint, storage.uri_for, spec.train.output).rstrip("/")
        marker = f"{uri}/_SUCCESS" if m.checkpoint == TRAIN_EXPORT else f"{uri}/config.json"
        if not storage.exists(marker):
            what = "no finished train export (run `sphinx-x train SPEC` first)" if m.checkpoint == TRAIN_EXPORT \
                else "no model directory (config.json missing)"
            raise UserError(f"serve model {m.name!r}: {what} at {uri}")


def _connect(spec: ClusterSpec):
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS") or spec.cluster.address != "local":
        ray.init(address=os.environ.get("RAY_ADDRESS") or spec.cluster.address)
        return ray
    from cluster.runtime import ensure_ray

    return ensure_ray(spec)


def url(spec: ClusterSpec) -> str:
    return f"http://{spec.serve.http.host}:{spec.serve.http.port}"


def run_stage(spec: ClusterSpec, *, force: bool = False, batching: bool = True) -> dict:
    """Deploy (or redeploy) the app on the connected / local Ray; returns a summary."""
    from ray import serve

    check_members(spec)
    _connect(spec)
    serve.start(http_options={"host": spec.serve.http.host, "port": spec.serve.http.port})
    app = build_application(spec, batching=batching)
    t0 = time.monotonic()
    try:
        serve.run(app, name=spec.name, route_prefix="/", blocking=False)
    except RuntimeError as err:  # a replica failed to start: say which and why, in one line
        raise UserError(f"serve: the app {spec.name!r} failed to deploy: {str(err).strip().splitlines()[-1]}") from None
    summary = {"app": spec.name, "url": url(spec), "models": [m.name for m in spec.serve.models],
               "deploy_s": round(time.monotonic() - t0, 2)}
    log.info("serving %s at %s (models: %s)", spec.name, summary["url"], ", ".join(summary["models"]))
    return summary


def is_complete(spec: ClusterSpec) -> bool:
    """True when the app is RUNNING on the connected Ray (serving has no output on storage)."""
    import ray

    if not ray.is_initialized():
        return False
    from ray import serve

    try:
        app = serve.status().applications.get(spec.name)
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return False
    return app is not None and str(app.status).endswith("RUNNING")


def shutdown(spec: ClusterSpec) -> None:
    """Delete the app (its replicas and ingress) and stop Serve if nothing else runs on it."""
    from ray import serve

    serve.delete(spec.name)
    if not serve.status().applications:
        serve.shutdown()


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.detach and spec.cluster.address == "local" and not os.environ.get("RAY_ADDRESS"):
        from cluster.runtime import up_state

        if not up_state(alive_only=True):
            raise UserError("--detach needs a Ray that outlives this command: run `sphinx-x up` first "
                            "(or use a cluster address)")
    summary = run_stage(spec, force=args.force)
    print(f"serving {', '.join(summary['models'])} at {summary['url']}/v1 (app {summary['app']})", flush=True)
    if args.detach:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    shutdown(spec)
    import ray

    ray.shutdown()
    return 0
