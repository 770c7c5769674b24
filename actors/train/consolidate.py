"""Gather a DeepSpeed-trained SphinxX back into the plain model's tensors (the inverse of ZeRO and AutoEP).

Runs on every rank of the training group (the gathers are collectives). ``consolidated_tensors``
yields the plain single-device model's state one tensor at a time, on rank 0 only;
``write_model_dir`` streams it into a model directory (``models.weights.model_dir``).
Memory: one parameter at a time is gathered, on the engine's device (NCCL takes device
tensors only; gloo the CPU ones: the same code path), and only rank 0 copies it to host memory,
in the export dtype, keeping it only until its shard is written. So no rank but 0 holds any of
the model in host memory, and rank 0 at most one shard (5 GB) and one layer, never the model.

``scatter_recipes`` is the way in: a model built partitioned (``deepspeed.zero.Init``) receives
rank 0's weights (models.weights.stream recipes: read from the files one tensor at a time)
parameter by parameter, so no rank ever holds more than one parameter in full.

- ZeRO-3 partitions each parameter over its process group: ``GatheredParameters`` rebuilds it.
  ZeRO-1/2 keep full parameters on every rank.
- AutoEP replaced each HF Mixtral sparse block ``P = llm.model.layers.N.mlp`` by an
  expert-parallel layer that holds only this EP rank's experts [E_local, ...]. The experts of
  all EP ranks are all-gathered (EP rank order = expert order) and renamed back by
  models.weights.autoep's table (``P.router.gate.weight`` → ``P.gate.weight``, ``w1``/``w3`` →
  ``P.experts.gate_up_proj [E, 2f, d]``, ``w2`` → ``P.experts.down_proj``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from models.errors import UserError
from models.weights.autoep import AUTOEP_KEYS, plain_moe
from models.weights.stream import Recipe, report, shape_errors, stream


def _autoep_layers(module: nn.Module) -> dict[str, nn.Module]:
    try:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    except ImportError:  # pragma: no cover - DeepSpeed without AutoEP
        return {}
    return {name: m for name, m in module.named_modules() if isinstance(m, AutoEPMoELayer)}


def _full(param: torch.Tensor, zero3: bool, *, keep: bool, dtype: Optional[torch.dtype],
          expert_group=None, device=None) -> Optional[torch.Tensor]:
    """The whole parameter on the host (``keep``: rank 0) or None; every rank must call it.

    ``expert_group``: an AutoEP expert tensor, all-gathered over its EP group on ``device``."""
    if zero3 and hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return _host(param.detach(), keep=keep, dtype=dtype, expert_group=expert_group, device=device)
    return _host(param.detach(), keep=keep, dtype=dtype, expert_group=expert_group, device=device)


def _host(tensor: torch.Tensor, *, keep: bool, dtype, expert_group, device) -> Optional[torch.Tensor]:
    if expert_group is not None:
        tensor = gather_experts(tensor, expert_group, device)
    if not keep:
        return None
    return tensor.to("cpu", dtype=dtype or tensor.dtype, copy=True)


def gather_experts(local: torch.Tensor, ep_group, device) -> torch.Tensor:
    """[E_local, ...] on each EP rank → [E, ...] (EP rank order), gathered on ``device``."""
    import torch.distributed as dist

    local = local.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group=ep_group))]
    dist.all_gather(parts, local, group=ep_group)
    return torch.cat(parts)


def scatter_recipes(model: nn.Module, recipes: Optional[Mapping[str, Recipe]], *, what: str,
                    strict_prefixes: tuple[str, ...] = ("",), device=None) -> int:
    """Rank 0's ``recipes`` (SphinxX names; None on the other ranks) into ``model``'s ZeRO-3
    partitioned parameters, one parameter at a time; call on every rank. Returns how many
    parameters were loaded.

    Rank 0 checks first, from the file headers: every parameter under ``strict_prefixes`` has a
    recipe of its full shape (``ds_shape``) and no recipe names what the model lacks; a mismatch
    is the same UserError on every rank (no rank is left waiting in a collective). Each parameter
    is then gathered (``GatheredParameters(modifier_rank=0)``), rank 0 builds its tensor from the
    files and copies it in, and DeepSpeed re-partitions it on exit."""
    import deepspeed
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    params = dict(model.named_parameters())
    plan: list = [[], None]  # [names to load, error]
    if rank0:
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
        ours = {k: r for k, r in recipes.items() if k.startswith(strict_prefixes)}
        errors = shape_errors({n: s for n, s in shapes.items() if n.startswith(strict_prefixes)}, ours)
        extra = sorted(set(recipes) - set(shapes))
        if extra:
            errors.setdefault("unexpected keys", []).extend(k for k in extra if k not in ours)
        if errors:
            plan[1] = f"{what} does not fit the model: {report(errors)}"
        plan[0] = [n for n in params if n in recipes]
    dist.broadcast_object_list(plan, src=0, device=device)
    names, error = plan
    if error:
        raise UserError(error)
    tensors = stream(recipes, names) if rank0 else None
    for name in names:
        param = params[name]
        with torch.no_grad(), deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank0:
                got, tensor = next(tensors)
                assert got == name
                param.data.copy_(tensor)
                del tensor
    return len(names)


def consolidated_tensors(engine, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """The plain model's state, one ``(name, tensor)`` at a time: the tensor on rank 0 (on the
    host, parameters in ``dtype``; None: as trained), None on every other rank. Every rank must
    run the iterator to its end (each parameter's gather is a collective).

    Rank 0 holds one parameter at a time, one AutoEP layer's experts at most (its ``w1`` and
    ``w3`` are fused into ``gate_up_proj``); what the consumer keeps is up to it
    (``models.weights.model_dir`` writes it to a shard)."""
    import torch.distributed as dist

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    layers = _autoep_layers(module)
    ep_group = None
    if layers:
        from deepspeed.utils import groups

        ep_size = next(iter(layers.values())).ep_size
        ep_group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    rank0 = dist.get_rank() == 0
    pending: dict[str, dict[str, torch.Tensor]] = {}  # AutoEP layer → its gathered tensors so far
    for name, param in module.named_parameters():
        owner = next((p for p in layers if name.startswith(p + ".")), None)
        experts = owner is not None and name.startswith(owner + ".experts.")
        full = _full(param, zero3, keep=rank0, dtype=dtype, expert_group=ep_group if experts else None,
                     device=engine.device)
        if owner is None:
            yield name, full
            continue
        mine = pending.setdefault(owner, {})
        mine[name[len(owner) + 1:]] = full
        if set(AUTOEP_KEYS) <= set(mine):
            yield from plain_moe(owner, pending.pop(owner), rank0)
    if pending:
        raise RuntimeError(f"AutoEP layers the export could not complete: {sorted(pending)}")
    persistent = set(module.state_dict(keep_vars=True))
    for name, buf in module.named_buffers():
        owner = next((p for p in layers if name.startswith(p + ".")), None)
        if owner is None and name in persistent:
            yield name, buf.detach().to("cpu", copy=True) if rank0 else None


def consolidated_state_dict(engine, dtype: Optional[torch.dtype] = None) -> Optional[dict[str, torch.Tensor]]:
    """``consolidated_tensors`` collected: the whole plain state dict on rank 0 (``None``
    elsewhere). For small models and tests; the export streams instead."""
    import torch.distributed as dist

    state = dict(consolidated_tensors(engine, dtype))
    return state if dist.get_rank() == 0 else None


def write_model_dir(engine, tokenizer, directory, *, dtype: Optional[torch.dtype] = None,
                    max_shard_bytes: Optional[int] = None) -> Optional[Path]:
    """Stream the trained model into a model directory written by rank 0 (``directory`` is
    rank 0's; the other ranks only take part in the gathers and get None). Call on every rank.

    Parameters are gathered one at a time (``consolidated_tensors``) and handed to
    ``models.weights.model_dir``, which writes each shard as it fills: rank 0 holds at most one
    shard plus one layer, never the model. An error on rank 0 is raised after the last gather,
    so no rank is left waiting in a collective."""
    import torch.distributed as dist

    from models.weights.model_dir import DEFAULT_MAX_SHARD_BYTES, ModelDirWriter, skeleton

    module = engine.module
    writer, error = None, None
    if dist.get_rank() == 0:
        writer = ModelDirWriter(directory, skeleton(module.flavour, module.token_ids()), tokenizer,
                                dtype=dtype or next(module.parameters()).dtype,
                                max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    for name, tensor in consolidated_tensors(engine, dtype):
        if writer is not None and error is None:
            try:
                writer.add(name, tensor)
            except Exception as err:  # keep gathering: the other ranks are in the collectives
                error = err
        del tensor  # not alive during the next parameter's gather
    if writer is None:
        return None
    if error is not None:
        raise error
    return writer.close()
