"""The model and its DeepSpeed engine, as every training rank builds them.

    >>> ds_config = deepspeed_config(train, flavour, world_size=world, total_steps=total)
    >>> model, tokenizer = build_model(config, storage, ds_config, device)
    >>> engine = build_engine(train, model, world, total, ds_config)

``build_model``: the shards' tokenizer, the initial weights' settings when ``model.weights`` is
set (``actors.train.initial_weights``), then the model (``construct_model``: same seed on every
rank; ZeRO-3 builds it partitioned from the start under ``deepspeed.zero.Init``; on GPU it is
built on the device), then the weights. ``build_engine``: ``deepspeed.initialize`` over the
trainable parameters (``actors.train.deepspeed_config``: ZeRO-2/3, AutoEP for MoE, AdamW,
warm-up + cosine).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from actors.upstream import (bound_host_allocator, hf_init_deferred, hf_init_gathered, no_cpu_shm_comm_build,
                             share_fp32_master, zero_check_without_muon)
from cluster.spec import TrainSection
from models.errors import UserError
from models.flavours import Flavour


def activation_checkpointing(train: TrainSection, flavour: Flavour) -> bool:
    """``train.activation_checkpointing``; unset (None) means on for the real flavours (an HF
    tokenizer: a real LLM's shapes) and off for the toys (``debug``, ``debug-moe``)."""
    if train.activation_checkpointing is None:
        return flavour.tokenizer is not None
    return bool(train.activation_checkpointing)


def is_zero3(ds_config: Optional[dict]) -> bool:
    return bool(ds_config) and ds_config["zero_optimization"]["stage"] == 3


def build_model(config, storage, ds_config: Optional[dict] = None, device=None):
    """(SphinxX, tokenizer) for ``config`` (an ``actors.train.worker.TrainWorkerConfig``): the
    shards' tokenizer, the initial weights' settings when ``config.weights_uri`` is set
    (``actors.train.initial_weights``: published components or a sphinx-x model dir; the model
    is built AFTER their flavour overrides, with their tokenizer), the model
    (``construct_model``), then the weights.

    The weights are read one tensor at a time (models.weights.stream). ZeRO-3: rank 0 alone opens
    them, hands the flavour to the other ranks (``broadcast_object_list``) and the weights
    parameter by parameter (``actors.train.consolidate.scatter_recipes``): no rank holds more than one
    parameter in full. Otherwise every rank loads them into its own model (ZeRO-1/2 keep full
    parameters anyway)."""
    import torch.distributed as dist

    from actors.train.initial_weights import check_tokenizer, read_initial_weights
    from models.conversation import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="sx-tok-") as tmp:
        tokenizer = load_tokenizer(storage.download_dir(config.tokenizer_uri, tmp))
    if not config.weights_uri:
        return construct_model(config.flavour, tokenizer, config.train, ds_config, device), tokenizer
    zero3 = is_zero3(ds_config)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    init, flavour = None, config.flavour
    with tempfile.TemporaryDirectory(prefix="sx-weights-") as tmp:
        error = None
        if rank0 or not zero3:
            try:
                init = read_initial_weights(Path(storage.download_dir(config.weights_uri, tmp)), config.flavour)
                check_tokenizer(init.tokenizer, tokenizer, config.weights_uri)
                flavour, tokenizer = init.flavour, init.tokenizer or tokenizer
            except UserError as err:
                if not (zero3 and dist.is_initialized()):
                    raise
                error = str(err)  # every rank raises it: none is left waiting below
        if zero3 and dist.is_initialized():
            shared = [flavour, error]
            dist.broadcast_object_list(shared, src=0, device=device)
            flavour, error = shared
            if error:
                raise UserError(error)
        model = construct_model(flavour, tokenizer, config.train, ds_config, device)
        if zero3:
            from actors.train.consolidate import scatter_recipes

            scatter_recipes(model, init.recipes() if rank0 else None, what=f"model.weights {config.weights_uri}",
                            strict_prefixes=init.strict_prefixes() if rank0 else ("",), device=device)
        else:
            init.load_into(model)
            model.set_vision_trainable(config.train.train_encoders)
    return model, tokenizer


def construct_model(flavour: Flavour, tokenizer, train: TrainSection, ds_config: Optional[dict] = None,
                    device=None):
    """The flavour's SphinxX, random-initialised with ``train.seed`` (the same on every rank),
    encoders frozen unless ``train.train_encoders``, activation checkpointing per
    ``activation_checkpointing``.

    ZeRO-3 (``ds_config`` stage 3): built inside ``deepspeed.zero.Init``, so each module's
    parameters are partitioned over the ranks (in the training dtype) as soon as it exists: no
    rank ever holds the whole model; the Hugging Face parts' own init runs afterwards, gathered
    (``actors.upstream.hf_init_deferred``). Otherwise built directly on ``device`` (the GPU: no
    host copy; None: CPU). On CPU the host allocator is bounded first
    (``actors.upstream.bound_host_allocator``)."""
    from models.sphinx import SphinxX

    if not train.use_gpu:
        bound_host_allocator()
    torch.manual_seed(train.seed)
    if is_zero3(ds_config):
        import deepspeed

        no_cpu_shm_comm_build()
        deepspeed.init_distributed()  # adopts the process group Ray Train made (zero.Init reads its size)
        # NOTE: the dtype comes from the config's bf16 flag (actors.train.deepspeed_config.use_bf16), not
        # dtype=: with a config, DeepSpeed 0.19 then picks fp16 / bf16 by what the accelerator
        # supports (on CPU bf16, whatever was asked), so fp32 training got bf16 partitions.
        with hf_init_deferred(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = SphinxX.from_flavour(flavour, tokenizer)
        hf_init_gathered((model.llm, model.vision.convnext, model.vision.dino))
    else:
        with torch.device(device or "cpu"):
            model = SphinxX.from_flavour(flavour, tokenizer)
    model.set_vision_trainable(train.train_encoders)
    _use_flash_attention(model, train)
    if activation_checkpointing(train, flavour):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _use_flash_attention(model, train: TrainSection) -> None:
    """On GPU with ``flash_attn`` installed, the LLM's SDPA becomes flash-attention 2 (packed rows
    then run as varlen sequences split at the position-id restarts). Only the live module's
    config changes: the flavour, and so the export, keep SDPA."""
    if not (train.use_gpu and torch.cuda.is_available()) or model.llm.config._attn_implementation != "sdpa":
        return
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return
    # NOTE: a private attribute of transformers 5.19's config; its public
    # PreTrainedModel.set_attn_implementation is the candidate replacement (needs a GPU with
    # flash_attn to check).
    model.llm.config._attn_implementation = "flash_attention_2"


def build_engine(train: TrainSection, model, world_size: int, total_steps: int, ds_config: Optional[dict] = None):
    """``deepspeed.initialize`` over ``model``'s trainable parameters (frozen ones, the encoders
    by default, go to no optimizer group: no optimizer state, no gradient); an fp32 master that
    would clone an fp32 partition shares it instead (``actors.upstream.share_fp32_master``)."""
    import deepspeed

    from actors.train.deepspeed_config import deepspeed_config

    cfg = ds_config or deepspeed_config(train, model.flavour, world_size=world_size, total_steps=total_steps)
    no_cpu_shm_comm_build()  # deepspeed.initialize starts DeepSpeed's comm backend on its first call
    zero_check_without_muon()
    # No ZeRO-3 special cases: every parameter is used only inside its own module's forward, and
    # the vision module runs (and touches all its parameters) on every batch, images or not.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    share_fp32_master(engine.optimizer)
    return engine
