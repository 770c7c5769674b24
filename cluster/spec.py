"""The one cluster spec: a YAML file, validated by pydantic, that drives every stage.

Sections (docs/architecture.md "The spec"): ``name``, ``cluster``, ``storage``, ``data``, ``model``,
``train``, ``serve``. Unknown keys are errors everywhere. The defaults give the embedded
local setup (local Ray + an S3 server on 127.0.0.1), so ``ClusterSpec()`` is a valid spec.

Credentials are never stored here: the spec names the environment variables that hold them
(``storage.access_key_id_env``, ``serve.api_keys_env``).

    >>> spec = load_spec("cluster/examples/local.yaml")
    >>> spec.train.global_batch            # micro_batch * grad_accum * data-parallel size
    8
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import UserError

GROUP_RESOURCE_PREFIX = "sphinx_group_"
# The project's version (pyproject.toml's; a test keeps them equal): the default image's tag.
PROJECT_VERSION = "0.1.0"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _FieldError(ValueError):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


def _at(field: str, reason: str) -> _FieldError:
    return _FieldError(field, reason)



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _require_unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} must be unique, repeated: {dupes}")


def _env_name(value: Optional[str]) -> Optional[str]:
    if value is not None and not _ENV_RE.match(value):
        raise ValueError(f"must be an environment variable name, got {value!r}")
    return value


# ---------------------------------------------------------------- cluster


class Toleration(_Strict):
    """A Kubernetes toleration of the group's pods (e.g. GPU nodes tainted ``nvidia.com/gpu``)."""

    key: Optional[str] = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    toleration_seconds: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "Toleration":
        if self.operator == "Exists" and self.value is not None:
            raise _at("value", "operator Exists takes no value")
        if self.key is None and self.operator != "Exists":
            raise _at("key", "a toleration without a key must use operator Exists")
        return self


class NodeGroup(_Strict):
    """Resources of one node type; the head and every worker group use it.

    ``node_selector`` and ``tolerations`` go to the group's Kubernetes pods as written;
    ``instance_type`` also selects ``node.kubernetes.io/instance-type`` there.
    """

    cpus: int = Field(2, ge=0)
    gpus: int = Field(0, ge=0)
    memory_gb: float = Field(8, gt=0)
    instance_type: Optional[str] = None
    resources: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class WorkerGroup(NodeGroup):
    name: str
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(1, ge=0)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"must be a lowercase DNS label (a-z, 0-9, '-'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> "WorkerGroup":
        if self.min_workers > self.max_workers:
            raise _at("min_workers", f"min_workers ({self.min_workers}) > max_workers ({self.max_workers})")
        return self

    @property
    def placement_resource(self) -> str:
        """Custom resource every node of this group declares; stages placed here ask for it."""
        return f"{GROUP_RESOURCE_PREFIX}{self.name.replace('-', '_')}"


class ClusterSection(_Strict):
    """Where stages run and what the nodes run.

    ``image``: the container image of every rendered pod and launcher node — this project's
    (``Dockerfile``: Ray 2.60 GPU base + the pins of ``cluster/requirements.txt`` + sphinx-x),
    built and pushed by the user; the default is the name ``docker build -t`` gives it here.
    ``dependencies``: where a Ray Job's Python packages come from — ``image`` (the nodes run
    that image) or ``runtime_env`` (a stock Ray cluster: each job brings the pins, Ray installs
    them once per node). ``image_pull_secret``: the Kubernetes Secret (by name) for a private
    registry. ``job_ttl_s``: how long a finished RayJob's cluster and record stay.

    Rendered KubeRay manifests (docs/security.md, "KubeRay manifests"): Ray token auth is on
    (``authOptions``); ``auth_token_secret`` names the Secret (key ``auth_token``) holding the
    token, ``null`` lets KubeRay generate one per cluster. ``dashboard_host``: where the head's
    dashboard / Jobs API listens — ``127.0.0.1`` (reach it with ``kubectl port-forward``) unless
    set to ``0.0.0.0``. ``operator_namespace``: the KubeRay operator's namespace, the only one the
    NetworkPolicy lets reach the dashboard.
    """

    address: str = "local"
    image: str = f"sphinx-x:{PROJECT_VERSION}"
    dependencies: Literal["image", "runtime_env"] = "image"
    image_pull_secret: Optional[str] = None
    job_ttl_s: int = Field(600, ge=0)
    namespace: str = "default"
    dashboard_host: Literal["127.0.0.1", "0.0.0.0"] = "127.0.0.1"
    auth_token_secret: Optional[str] = None
    operator_namespace: str = "ray-system"
    provider: dict[str, Any] = Field(
        default_factory=lambda: {"type": "aws", "region": "us-east-1"},
        description="cluster-launcher provider block (rendered by `render --to launcher`)",
    )
    # the local default: 4 logical CPUs, so 2 train workers + their readers + a replica fit a laptop
    head: NodeGroup = Field(default_factory=lambda: NodeGroup(cpus=4))
    worker_groups: list[WorkerGroup] = Field(default_factory=list)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v == "local" or re.match(r"^(https?|ray)://[^/\s]+(:\d+)?/?$", v):
            return v
        raise ValueError(f"must be 'local' or a URL like http://HEAD:8265, got {v!r}")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9._\-/:@]*$", v) or v.endswith((":", "/")):
            raise ValueError(f"must be a container image reference like registry.example.com/sphinx-x:1.0, got {v!r}")
        return v

    @field_validator("image_pull_secret", "auth_token_secret")
    @classmethod
    def _secret_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$", v):
            raise ValueError(f"must be a Kubernetes Secret name (lowercase a-z, 0-9, '-', '.'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _unique_groups(self) -> "ClusterSection":
        _require_unique([g.name for g in self.worker_groups], "worker group names")
        return self

    def group(self, name: Optional[str]) -> Optional[WorkerGroup]:
        return next((g for g in self.worker_groups if g.name == name), None)


# ---------------------------------------------------------------- storage


class StorageSection(_Strict):
    """Where everything lives: an ``s3://bucket/prefix`` or a local directory.

    ``endpoint_url``: ``embedded`` starts moto's S3 server on 127.0.0.1; a URL targets any
    S3-compatible server; ``null`` means AWS itself.
    """

    uri: str = "s3://sphinx-x/runs/local"
    endpoint_url: Optional[str] = "embedded"
    region: str = "us-east-1"
    access_key_id_env: Optional[str] = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: Optional[str] = "AWS_SECRET_ACCESS_KEY"
    session_token_env: Optional[str] = "AWS_SESSION_TOKEN"

    _env = field_validator("access_key_id_env", "secret_access_key_env", "session_token_env")(
        classmethod(lambda cls, v: _env_name(v))
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if v.startswith("s3://"):
            if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", v):
                raise ValueError(f"not a valid s3://bucket/prefix URI: {v!r}")
        elif "://" in v:
            raise ValueError(f"only s3:// URIs or local paths are supported, got {v!r}")
        return v.rstrip("/") or v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        if v in (None, "embedded") or re.match(r"^https?://[^/\s]+", v):
            return v
        raise ValueError(f"must be 'embedded', an http(s) URL, or null for AWS, got {v!r}")

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> Optional[str]:
        from cluster.location import Location

        return Location.parse(self.uri).bucket if self.is_s3 else None

    @model_validator(mode="after")
    def _embedded_needs_s3(self) -> "StorageSection":
        if self.endpoint_url == "embedded" and not self.is_s3:
            # a local path simply ignores the endpoint; keep it quiet but consistent
            object.__setattr__(self, "endpoint_url", None)
        return self


# ---------------------------------------------------------------- data


# actors.data.layouts.LAYOUTS and actors.data.prompts.TEMPLATES (tests keep them equal)
LAYOUTS = ("llava", "sharegpt", "messages", "ultrachat", "coco_captions", "vqa", "textvqa", "ocrvqa", "docvqa",
           "refcoco", "vg_regions")
PROMPT_KINDS = ("short_answer", "multiple_choice", "caption", "referring", "region_caption", "grounded_caption",
                "ocr")


class SourceSpec(_Strict):
    """One dataset source. ``ratio`` < 1 subsamples deterministically, > 1 repeats.

    ``dedup`` (pipelines.stages.preprocess): ``samples`` drops a record whose images (by content) and
    conversation were already seen, in this or an earlier source; ``images`` also drops a record
    whose images were already seen with any conversation (caption data: one caption per image);
    ``off`` keeps every record. Dropped records are counted per source in the manifest.
    """

    name: str
    path: str
    image_root: Optional[str] = None
    ratio: float = Field(1.0, gt=0)
    format: Literal["auto", "json", "jsonl", "webdataset", "parquet"] = "auto"
    dedup: Literal["samples", "images", "off"] = "samples"
    # where a record's image may be read from (actors.data.rows.resolve_image); None: image_root only
    allowed_image_prefixes: Optional[list[str]] = None
    # how a record is laid out (actors.data.layouts; docs/interfaces.md "Source layouts"), beside the
    # container ``format``: llava (today's rows), chat sets, and the annotation files of public datasets
    layout: Literal[LAYOUTS] = "llava"
    # the layout's second file: VQA answers, RefCOCO instances.json, Visual Genome image_data.json
    annotations: Optional[str] = None
    # the layout's names -> this dataset's own (LLaMA-Factory's dataset_info columns / tags)
    columns: dict[str, str] = Field(default_factory=dict)
    # the prompt templates the layout asks its questions with (actors.data.prompts); None: the layout's
    prompt: Optional[Literal[PROMPT_KINDS]] = None
    # sampling weight on top of ``ratio`` (and data.mixture_temperature): records are written
    # ratio x weight x the temperature factor times on average (the manifest's ``epochs``)
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _layout_fits_format(self) -> "SourceSpec":
        if self.layout != "llava" and self.format == "webdataset":
            raise ValueError(f"layout {self.layout!r} is read from JSON, JSONL or Parquet files; WebDataset "
                             "sources have the llava layout")
        return self


class DataSection(_Strict):
    sources: list[SourceSpec] = Field(default_factory=list)
    output: str = "shards"
    max_seq_len: int = Field(2048, ge=16)
    overflow: Literal["truncate", "quarantine"] = "truncate"
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="an image over this many bytes is quarantined "
                                 "(too_large) without being read whole")
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    rows_per_shard: int = Field(1024, ge=1)
    num_cpus_per_worker: float = Field(1, gt=0)
    concurrency: int = Field(2, ge=1, description="actor-pool size of the tiling stage")
    image_codec: Literal["webp", "png"] = Field(
        "webp", description="lossless codec of the scaled images in the shards (models.stored_image)")
    group: Optional[str] = None
    # p_i ~ n_i^(1/T) over the sources' record counts n_i (on top of ratio x weight); None: off
    mixture_temperature: Optional[float] = Field(None, gt=0)
    prompt_seed: int = Field(0, description="seeds the per-row choice of prompt template (actors.data.prompts)")

    @model_validator(mode="after")
    def _unique_sources(self) -> "DataSection":
        _require_unique([s.name for s in self.sources], "source names")
        return self


# ---------------------------------------------------------------- model


class ModelSection(_Strict):
    flavour: str = "debug"
    overrides: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[str] = None
    tokenizer: Optional[str] = None

    @field_validator("flavour")
    @classmethod
    def _known(cls, v: str) -> str:
        return _known_flavour(v)


def _known_flavour(name: str) -> str:
    from models.flavours import FLAVOURS, unknown_flavour

    if name not in FLAVOURS:
        raise ValueError(unknown_flavour(name))
    return name


def _is_moe(name: str) -> bool:
    from models.flavours import FLAVOURS

    return FLAVOURS[name].is_moe


# ---------------------------------------------------------------- train


class TrainSection(_Strict):
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    group: Optional[str] = None
    zero_stage: Literal[0, 1, 2, 3] = 2
    expert_parallel: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    micro_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.01, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    aux_loss_weight: float = Field(0.01, ge=0)
    activation_checkpointing: Optional[bool] = None  # None: on for the real flavours, off for toys
    packing: bool = True  # several samples per row up to data.max_seq_len (actors.train.batching.pack_rows)
    train_encoders: bool = False
    steps: Optional[int] = Field(100, ge=1)
    epochs: Optional[int] = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    seed: int = 0
    output: str = "train"

    @model_validator(mode="after")
    def _parallel(self) -> "TrainSection":
        if self.workers % self.expert_parallel:
            raise _at("expert_parallel",
                      f"expert_parallel ({self.expert_parallel}) must divide workers ({self.workers})")
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs")
        return self

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.workers


# ---------------------------------------------------------------- serve


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0)
    target_ongoing_requests: float = Field(2, gt=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    metrics_interval_s: float = Field(1, gt=0)
    look_back_period_s: float = Field(5, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise _at("min_replicas", f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise _at(
                "initial_replicas", f"initial_replicas ({self.initial_replicas}) outside "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ActorOptions(_Strict):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory_gb: Optional[float] = Field(None, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)


class ServeModel(_Strict):
    """One family member behind the endpoint.

    ``checkpoint``: a model directory (local or s3://), or ``"@train"`` for the directory
    this spec's train stage exports; ``null`` builds ``flavour`` with random weights.
    """

    name: str
    flavour: Optional[str] = None
    checkpoint: Optional[str] = None
    autoscaling_config: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    # the member's vLLM engine (actors.serve.vllm.engine): requests decoded at once, context, parallelism
    max_num_seqs: int = Field(32, ge=1)
    max_model_len: Optional[int] = Field(None, ge=16)  # None: the model's context
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs (or CPU worker processes) per replica
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # GPU replicas: the fraction of each GPU
    cpu_kv_cache_gb: float = Field(1.0, gt=0)  # CPU replicas: the KV cache size
    enforce_eager: Optional[bool] = None  # None: eager on CPU, CUDA graphs on GPU
    group: Optional[str] = None

    _flavour = field_validator("flavour")(classmethod(lambda cls, v: v and _known_flavour(v)))

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 is not accepted by Ray Serve; use -1 (no limit) or a positive number")
        return v

    @model_validator(mode="after")
    def _source(self) -> "ServeModel":
        if self.flavour is None and self.checkpoint is None:
            raise _at("checkpoint", "names no flavour and no checkpoint: set one of them")
        return self


class HttpOptions(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class ServeSection(_Strict):
    models: list[ServeModel] = Field(default_factory=lambda: [ServeModel(name="sphinx-x-debug", flavour="debug")])
    http: HttpOptions = Field(default_factory=HttpOptions)
    api_keys_env: Optional[str] = None
    allowed_image_hosts: list[str] = Field(default_factory=list)
    max_request_bytes: int = Field(20 * 2**20, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(4, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    # chat s3:// image URLs: only under these prefixes of the storage bucket (none by default)
    allowed_image_s3_prefixes: list[str] = Field(default_factory=list)
    max_request_pixels: int = Field(50_000_000, ge=1)  # sum of W*H over a request's images (headers)
    # the ingress's own bound (actors.serve.request_gate): requests in work, then waiting; past both: 429
    ingress_max_ongoing_requests: int = Field(32, ge=1)
    ingress_max_queued_requests: int = Field(128, ge=0)

    _env = field_validator("api_keys_env")(classmethod(lambda cls, v: _env_name(v)))

    @field_validator("allowed_image_s3_prefixes")
    @classmethod
    def _s3_prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            parts = p[len("s3://"):].split("/") if p.startswith("s3://") else []
            if not parts or not parts[0] or ".." in parts or "." in parts:
                raise ValueError(f"{p!r} must be an s3://BUCKET/PREFIX URL without '.' or '..' parts")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "ServeSection":
        _require_unique([m.name for m in self.models], "serve model names")
        return self


# ---------------------------------------------------------------- eval


class EvalBenchmark(_Strict):
    """One benchmark file the user already has (nothing is downloaded; docs/interfaces.md "Eval")."""

    name: str
    path: str  # local or s3://, by the layout rule (relative: under storage.uri)
    format: Literal["vlmevalkit_tsv", "vqa_tsv", "jsonl"]
    metric: Optional[str] = None  # None: the format's usual metric (the eval stage names them)
    circular: bool = False  # MMBench CircularEval: every rotation of the options asked
    prompt: Optional[str] = None  # prompt kind; None: by metric
    max_tokens: int = Field(32, ge=1)
    image_root: Optional[str] = None  # where `image_path` / JSONL `image` names resolve (default: beside the file)
    text_only: bool = False  # rows without an image are text-only questions (else malformed, as VLMEvalKit reads them)
    # grounding: the square a predicted [x1,y1,x2,y2] is a fraction of (actors.eval.grounding); None:
    # the evaluated model directory's own padding (its flavour's pad), "center" for an endpoint (the releases')
    box_frame: Optional[Literal["center", "topleft", "image"]] = None

    _name = field_validator("name")(classmethod(lambda cls, v: _benchmark_name(v)))


class EvalEndpoint(_Strict):
    url: str
    model: str
    api_key_env: Optional[str] = None
    concurrency: int = Field(8, ge=1)
    logprobs: bool = False  # record each answer's tokens in predictions.jsonl (parity checks)

    _env = field_validator("api_key_env")(classmethod(lambda cls, v: _env_name(v)))


class EvalSection(_Strict):
    """``benchmarks`` answered by ``model`` (``@train``: the run's train export, or a model
    directory) or by ``endpoint``; ``gate`` {benchmark: min score} stops a run that misses one."""

    benchmarks: list[EvalBenchmark] = Field(default_factory=list)
    model: str = "@train"
    endpoint: Optional[EvalEndpoint] = None
    gate: dict[str, float] = Field(default_factory=dict)
    output: str = "eval"
    actors: int = Field(1, ge=1)  # vLLM engine actors of the batch engine
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)  # > 0: GPU engines
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_num_seqs: int = Field(64, ge=1)
    max_model_len: Optional[int] = Field(None, ge=16)
    cpu_kv_cache_gb: float = Field(1.0, gt=0)
    block_size: int = Field(256, ge=1)  # requests per resumable block
    write_scores_to_model: bool = True  # a local model directory's config.json gets sphinx_x.scores
    group: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> "EvalSection":
        _require_unique([b.name for b in self.benchmarks], "eval benchmark names")
        unknown = sorted(set(self.gate) - {b.name for b in self.benchmarks})
        if unknown:
            raise _at("gate", f"names no benchmark of eval.benchmarks: {unknown}")
        return self


def _benchmark_name(value: str) -> str:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", value):
        raise ValueError(f"must be letters, digits, '_', '.', '-' (it names a folder), got {value!r}")
    return value


# ---------------------------------------------------------------- curate


class TeacherSection(_Strict):
    """An OpenAI-compatible chat endpoint that writes free-form descriptions of marked images
    (``actors.curate.teacher``): ``url`` is the API base (``http://host:8000/v1``), ``model`` the
    name sent and recorded per sample."""

    url: str
    model: str
    api_key_env: Optional[str] = None
    prompt: str = ("Describe every numbered mark in this image: for each mark, say its number and what it "
                   "shows, one line per mark.")
    max_tokens: int = Field(256, ge=1)
    timeout_s: float = Field(60, gt=0)

    _env = field_validator("api_key_env")(classmethod(lambda cls, v: _env_name(v)))

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http(s) URL like http://host:8000/v1, got {v!r}")
        return v.rstrip("/")


class SomCurate(_Strict):
    """Set-of-Mark curation (``sphinx-x curate som``): COCO instances ``annotations`` (a JSON file)
    over the images under ``images``; paths by the layout rule."""

    annotations: str
    images: str
    output: str = "curated/som"
    contours: bool = True  # draw each region's mask outline too
    max_marks: int = Field(20, ge=1)  # regions per image beyond this (the smallest) are left unmarked
    min_area: float = Field(16, ge=0)  # pixels; a smaller region is left unmarked (counted)
    teacher: Optional[TeacherSection] = None


class OcrCurate(_Strict):
    """OCR-intensive curation (``sphinx-x curate ocr``): PDFs and page images under ``input``.

    ``engine``: pages without a usable text layer (and page images) are read by ``tesseract``
    (Debian's ``tesseract-ocr``; an error naming it when absent) or, with ``none``, quarantined
    ``no_text``. ``languages``: ISO 639-1 codes kept (langdetect); empty keeps every language."""

    input: str
    output: str = "curated/ocr"
    dpi: float = Field(96, ge=24, le=600)
    engine: Literal["none", "tesseract"] = "none"
    engine_languages: str = "eng"  # tesseract's -l
    min_chars: int = Field(16, ge=0)  # near_empty below this many non-space characters
    min_text_fraction: float = Field(0.5, ge=0, le=1)  # non_text: fewer letters/digits among the characters
    languages: list[str] = Field(default_factory=list)
    max_pages_per_file: int = Field(64, ge=1)


class CurateSection(_Strict):
    """The curate stage (pipelines.stages.curate): ``som`` and/or ``ocr``, each writing a LLaVA JSONL
    source (``<output>/data.jsonl`` + ``images/``) that ``data.sources`` reads directly."""

    som: Optional[SomCurate] = None
    ocr: Optional[OcrCurate] = None
    block_size: int = Field(8, ge=1)  # items per resumable block (one call of a curate actor)
    concurrency: int = Field(2, ge=1)  # curate actors (one block at a time each)
    num_cpus_per_worker: float = Field(1, gt=0)
    previews: int = Field(4, ge=0)  # pictures next to the manifest
    group: Optional[str] = None


# ---------------------------------------------------------------- the spec


class ClusterSpec(_Strict):
    name: str = "sphinx-x"
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    curate: CurateSection = Field(default_factory=CurateSection)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"must be a lowercase DNS label (a-z, 0-9, '-'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "ClusterSpec":
        if self.train.expert_parallel > 1 and not _is_moe(self.model.flavour):
            raise _at("train.expert_parallel", f"expert parallel {self.train.expert_parallel} > 1 "
                      f"needs an MoE flavour, but model.flavour is dense ({self.model.flavour!r})")
        groups = {g.name for g in self.cluster.worker_groups}
        for path, group in [("data.group", self.data.group), ("train.group", self.train.group),
                            ("curate.group", self.curate.group)] + [
            (f"serve.models.{i}.group", m.group) for i, m in enumerate(self.serve.models)
        ]:
            if group is not None and group not in groups:
                raise _at(path, f"names no worker group {group!r}; groups: {sorted(groups)}")
        return self


class SpecError(UserError, ValueError):
    """A spec problem with the file, the dotted field path and the reason."""

    def __init__(self, file: str, field: str, reason: str):
        self.file, self.field, self.reason = file, field, reason
        super().__init__(f"{file}: {field}: {reason}")


def _first_error(err: ValidationError) -> tuple[str, str]:
    e = err.errors()[0]
    ctx_err = (e.get("ctx") or {}).get("error")
    field = ".".join(str(p) for p in e["loc"])
    if isinstance(ctx_err, _FieldError):
        return ".".join(p for p in (field, ctx_err.field) if p), ctx_err.reason
    field = field or "(root)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required field is missing"
    elif e.get("input") is not None and e["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {e['input']!r})"
    return field, msg


def parse_spec(data: Any, file: str = "<spec>") -> ClusterSpec:
    """Validate a mapping; raise :class:`SpecError` naming the dotted field on failure."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(file, "(root)", f"the spec must be a mapping, got {type(data).__name__}")
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(file, *_first_error(err)) from None


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a spec YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(str(path), "(file)", err.strerror or str(err)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(str(path), "(yaml)", str(err).replace("\n", " ")) from None
    return parse_spec(data, str(path))


def dump_spec(spec: ClusterSpec) -> str:
    """YAML of a spec, round-trippable through :func:`load_spec`."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


EXAMPLES_DIR = Path(__file__).parent / "examples"


def example_path(name: str = "local") -> Path:
    return EXAMPLES_DIR / f"{name}.yaml"
