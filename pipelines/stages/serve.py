"""`sphinx-x serve SPEC`: the family behind autoscaled replicas, with an OpenAI-compatible API.

One Serve application named ``spec.name`` (route prefix ``/``):

    SphinxXIngress (FastAPI, actors.serve.ingress)  --DeploymentHandle-->  <serve.models[i].name>
      /v1/chat/completions, /v1/models,                               (actors.serve.replica.ModelReplica,
      /v1/stats, /healthz, / (web page)                                one deployment per member)

Each member deployment is named exactly like its ``serve.models`` entry and carries that
entry's ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests`` and
``max_queued_requests`` (so a rendered Serve config can override them by name). Every replica
runs one vLLM engine (actors.serve.vllm.engine) configured by :func:`engine_options` from the entry:
on GPU when ``ray_actor_options.num_gpus`` > 0 (bf16, ``tensor_parallel_size`` GPUs), else on
CPU (fp32, eager, a ``cpu_kv_cache_gb`` KV cache).

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
from typing import Optional

from cluster import layout as run_layout
from cluster.capacity import Demand, Work, check_capacity
from cluster.connect import connect
from cluster.layout import Layout
from cluster.location import Location
from cluster.placement import placement
from cluster.render import ray_actor_options
from cluster.run_context import RunContext
from cluster.spec import ClusterSpec, ServeModel, parse_spec
from models.errors import UserError
from pipelines.stage import Stage, StageBase

log = logging.getLogger(__name__)

INGRESS_NAME = "SphinxXIngress"
INGRESS_CPUS = 0.25  # the HTTP ingress deployment (actors.serve.ingress), one replica
INGRESS_HEADROOM = 32  # requests Serve lets past the ingress's own bound (health checks, model lists)
APP_IMPORT_PATH = "pipelines.stages.serve:build_app"  # what `serve deploy` / a RayService builds


# ---------------------------------------------------------------- the application


def member_weights(spec: ClusterSpec, m: ServeModel, storage_uri: str | None = None):
    """Where member ``m``'s weights come from, resolved by the run layout."""
    from actors.serve.model_loader import MemberWeights

    if m.checkpoint is None:
        return MemberWeights(name=m.name, flavour=m.flavour)
    lay = Layout.from_spec(spec, storage_uri)
    return MemberWeights(name=m.name, flavour=m.flavour, checkpoint_uri=lay.checkpoint(m.checkpoint),
                         require_success=m.checkpoint == run_layout.TRAIN_EXPORT)


def engine_options(m: ServeModel):
    """Member ``m``'s vLLM engine settings: a GPU engine when its replicas reserve GPUs."""
    from actors.serve.vllm.engine import EngineOptions

    gpus = m.ray_actor_options.num_gpus
    device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus < m.tensor_parallel_size:
        raise UserError(f"serve model {m.name!r}: tensor_parallel_size {m.tensor_parallel_size} needs "
                        f"ray_actor_options.num_gpus >= {m.tensor_parallel_size} (it is {gpus})")
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    eager = m.enforce_eager if m.enforce_eager is not None else device == "cpu"
    threads = max(1, int(m.ray_actor_options.num_cpus) // m.tensor_parallel_size)
    return EngineOptions(device=device, dtype=dtype, max_model_len=m.max_model_len, max_num_seqs=m.max_num_seqs,
                         tensor_parallel_size=m.tensor_parallel_size, gpu_memory_utilization=m.gpu_memory_utilization,
                         cpu_kv_cache_gb=m.cpu_kv_cache_gb, enforce_eager=eager, threads=threads)


def build_application(spec: ClusterSpec):
    """The Serve application of a spec."""
    from actors.serve.ingress import Ingress, key_hashes_from_env
    from actors.serve.replica import ModelReplica, ReplicaConfig

    names = [m.name for m in spec.serve.models]
    if INGRESS_NAME in names:
        raise UserError(f"serve.models: the name {INGRESS_NAME!r} is reserved for the ingress")
    handles = {}
    for m in spec.serve.models:
        config = ReplicaConfig(weights=member_weights(spec, m), storage=spec.storage,
                               max_image_pixels=spec.serve.max_image_pixels, engine=engine_options(m))
        deployment = ModelReplica.options(
            name=m.name,
            autoscaling_config=m.autoscaling_config.model_dump(exclude_none=True),
            ray_actor_options=ray_actor_options(spec, m),
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
        )
        handles[m.name] = deployment.bind(config)
    key_hashes = key_hashes_from_env(spec.serve.api_keys_env)
    warn_if_open(spec, key_hashes)
    # the ingress bounds itself (actors.serve.request_gate: 429 past it); Serve's own bound, which
    # answers a plain-text 503, sits above it with room for /healthz and /v1/models
    bound = spec.serve.ingress_max_ongoing_requests + spec.serve.ingress_max_queued_requests + INGRESS_HEADROOM
    return Ingress.options(name=INGRESS_NAME, ray_actor_options={"num_cpus": INGRESS_CPUS},
                           max_ongoing_requests=bound, max_queued_requests=bound).bind(
        spec.serve, spec.storage, handles, key_hashes)


def warn_if_open(spec: ClusterSpec, key_hashes: list[str]) -> bool:
    """Warn (log and terminal) when the endpoint has no API keys and listens beyond loopback."""
    import sys

    from actors.serve.ingress import is_loopback, open_endpoint_warning

    if key_hashes or is_loopback(spec.serve.http.host):
        return False
    message = open_endpoint_warning(spec.serve.http.host)
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
    return True


def build_app(args: dict):
    """Serve's import-path entry: ``args = {"spec": <ClusterSpec as a JSON-able dict>}``."""
    if not isinstance(args, dict) or "spec" not in args:
        raise UserError("build_app needs args: {spec: <the cluster spec as a mapping>}")
    return build_application(parse_spec(args["spec"], "serve args.spec"))


# ---------------------------------------------------------------- deploying


def check_members(ctx: RunContext) -> None:
    """Fail early, on the driver, for checkpoints that cannot be found."""
    spec = ctx.spec
    for m in spec.serve.models:
        weights = member_weights(spec, m)
        uri = weights.checkpoint_uri
        if uri is None:
            continue
        if not Location.parse(uri).is_s3 and not weights.require_success:
            if not os.path.isdir(uri):
                raise UserError(f"serve model {m.name!r}: checkpoint directory {uri} does not exist")
            continue
        marker = f"{uri}/_SUCCESS" if weights.require_success else f"{uri}/config.json"
        if not ctx.storage.exists(marker):
            what = "no finished train export (run `sphinx-x train SPEC` first)" if weights.require_success \
                else "no model directory (config.json missing)"
            raise UserError(f"serve model {m.name!r}: {what} at {uri}")


def url(spec: ClusterSpec) -> str:
    return f"http://{spec.serve.http.host}:{spec.serve.http.port}"


def _start_serve(spec: ClusterSpec) -> None:
    """Start Serve with the spec's HTTP settings, or refuse a running Serve that listens elsewhere.

    A Serve already running on this Ray (e.g. the `sphinx-x up` head after an earlier `serve`)
    keeps its proxy: Ray ignores new http_options. If it listens elsewhere and runs no app but
    ours, it is restarted on the spec's port; if other apps use it, the mismatch is an error.
    """
    from ray import serve

    want = (spec.serve.http.host, spec.serve.http.port)
    running = _running_http()
    if running is not None and running != want:
        others = [a for a in serve.status().applications if a != spec.name]
        if others:
            raise UserError(f"serve: Ray Serve on this cluster already listens on {running[0]}:{running[1]} "
                            f"(apps {others}); serve.http asks for {want[0]}:{want[1]}. Use that port in the "
                            "spec, or stop the other apps first")
        log.info("serve: restarting Ray Serve on %s:%d (it listened on %s:%d)", *want, *running)
        serve.shutdown()
    serve.start(http_options={"host": want[0], "port": want[1]})


def _running_http():
    """(host, port) of the Serve running on the connected Ray, or None."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        config = client.http_config
        return (config.host, int(config.port))
    except Exception:  # noqa: BLE001 - no Serve here
        return None


class ServeStage(StageBase):
    """`sphinx-x serve SPEC [--detach]`: deploy the app; without --detach hold it until Ctrl-C."""

    name = "serve"
    help = "host serve.models behind an OpenAI-compatible endpoint"
    service = APP_IMPORT_PATH

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--detach", action="store_true", help="deploy and return; the app stays up "
                            "(without it, Ctrl-C deletes the app this command deployed)")

    def demand(self, spec: ClusterSpec) -> Demand:
        work = []
        for m in spec.serve.models:
            a = m.autoscaling_config
            n = max(1, a.min_replicas if a.initial_replicas is None else a.initial_replicas)
            o = m.ray_actor_options
            work.append(Work(f"replicas of {m.name}", n,
                             {"CPU": o.num_cpus, "GPU": o.num_gpus, **o.resources, **placement(spec, m.group)},
                             group=m.group, uses_gpu=o.num_gpus > 0))
        work.append(Work("ingress", 1, {"CPU": INGRESS_CPUS}, reserve_only=True))
        return Demand(self.name, tuple(work))

    def outputs(self, layout) -> dict[str, str]:
        return {}  # an endpoint, not files

    def is_complete(self, ctx: RunContext) -> bool:
        """True when the app is RUNNING on the connected Ray (serving has no output on storage)."""
        import ray

        if not ray.is_initialized():
            return False
        from ray import serve

        try:
            app = serve.status().applications.get(ctx.spec.name)
        except Exception:  # noqa: BLE001 - Serve not started on this cluster
            return False
        return app is not None and str(app.status).endswith("RUNNING")

    def run(self, ctx: RunContext) -> dict:
        """Deploy (or redeploy) the app on the connected / local Ray; returns a summary.

        ``ctx.force`` changes nothing: a deploy always replaces the app.
        """
        from ray import serve

        spec = ctx.spec
        if ctx.option("detach") and spec.cluster.address == "local" and not os.environ.get("RAY_ADDRESS"):
            from cluster.runtime import up_state

            if not up_state(alive_only=True):
                raise UserError("--detach needs a Ray that outlives this command: run `sphinx-x up` first "
                                "(or use a cluster address)")
        check_members(ctx)
        connect(spec)
        check_capacity(spec, self.demand(spec))
        _start_serve(spec)
        app = build_application(spec)
        t0 = time.monotonic()
        try:
            serve.run(app, name=spec.name, route_prefix="/", blocking=False)
        except RuntimeError as err:  # a replica failed to start: say which and why, in one line
            raise UserError(f"serve: the app {spec.name!r} failed to deploy: "
                            f"{str(err).strip().splitlines()[-1]}") from None
        host, port = _running_http() or (spec.serve.http.host, spec.serve.http.port)
        summary = {"app": spec.name, "url": f"http://{host}:{port}", "models": [m.name for m in spec.serve.models],
                   "deploy_s": round(time.monotonic() - t0, 2)}
        log.info("serving %s at %s (models: %s)", spec.name, summary["url"], ", ".join(summary["models"]))
        return summary

    def report(self, ctx: RunContext, summary: dict) -> None:
        """Print where it serves; without ``--detach`` hold the app until Ctrl-C, then delete it."""
        if "url" not in summary:  # skipped by `run`: the app was already running
            summary = {"app": ctx.spec.name, "url": url(ctx.spec), "models": [m.name for m in ctx.spec.serve.models]}
        if ctx.option("detach"):
            print(f"serving {', '.join(summary['models'])} at {summary['url']}/v1 (app {summary['app']})",
                  flush=True)
            return
        serve_until_interrupted(ctx.spec, summary)
        import ray

        ray.shutdown()


STAGE: Stage = ServeStage()


def run_stage(spec: ClusterSpec, *, force: bool = False) -> dict:
    """``STAGE.run`` on a context built here (tests, benchmarks and the demo call this)."""
    return STAGE.run(RunContext.build(spec, force=force))


SHUTDOWN_WAIT_S = 10.0  # a healthy Serve deletes a CPU app in a few seconds


def shutdown(spec: ClusterSpec, *, timeout_s: Optional[float] = None) -> bool:
    """Delete the app (its replicas and ingress) and stop Serve if nothing else runs on it.

    With ``timeout_s``, give up after that long and return False: a SIGTERM sent to the whole
    process group stops Ray's own processes too, and Serve's calls then wait on a dead head
    (``cluster.reaper`` stops what is left when the command exits)."""
    from ray import serve

    def stop() -> None:
        serve.delete(spec.name)
        if not serve.status().applications:
            serve.shutdown()

    if timeout_s is None:
        stop()
        return True
    from cluster.reaper import bounded

    if not bounded(stop, timeout_s):
        log.warning("Serve did not delete app %s within %.0f s (Ray is stopping too?); leaving it to exit",
                    spec.name, timeout_s)
        return False
    return True


def serve_until_interrupted(spec: ClusterSpec, summary: dict) -> None:
    """Block until Ctrl-C (or SIGTERM), then delete the app this command deployed."""
    print(f"serving {', '.join(summary['models'])} at {summary['url']}/v1 (app {summary['app']}) — "
          "Ctrl-C to stop", flush=True)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever a stage left installed
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    shutdown(spec, timeout_s=SHUTDOWN_WAIT_S)


def _raise_interrupt(*_):
    raise KeyboardInterrupt()
