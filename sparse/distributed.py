"""Sparse models across processes (``torch.distributed``).

DDP and FSDP synchronise parameters and gradients, and DDP broadcasts buffers from rank 0 at every forward
(``broadcast_buffers=True``): a sparse layer's pattern lives in buffers, so a rank whose pattern differs would get
rank 0's pattern under its own values, silently wrong. :func:`check_patterns_agree` finds that before training:
every rank must hold the same pattern (prune once and broadcast, or load the same checkpoint, or compute masks
from all-reduced scores as ``GradualPruner`` does across ranks, with :func:`mean_across_ranks_` and
:func:`broadcast_from_first_rank_`). FSDP2 also needs :func:`sparse.nn.contiguous_parameters`.
"""

from __future__ import annotations

import os
import warnings
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .nn import SparseLinear

__all__ = ["check_patterns_agree", "check_tensors_agree", "load_checkpoint", "is_multi_rank", "mean_across_ranks_",
           "broadcast_from_first_rank_"]


def _digest(m: SparseLinear) -> int:
    crc = zlib.crc32(repr((type(m).__name__, m.out_features, m.in_features, m.activation)).encode())
    for name, buf in sorted(m.named_buffers(recurse=False)):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(buf.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


def check_patterns_agree(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Raises ``ValueError`` naming the first sparse layer whose pattern (its metadata buffers, shape, format and
    fused activation) differs between the ranks of ``group`` (default: the world), or whose ranks hold different
    sparse layers; returns the number of sparse layers checked. A collective: every rank must call it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("check_patterns_agree needs an initialised torch.distributed process group")
    names: List[str] = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    digests = [_digest(model.get_submodule(n)) for n in names]
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered: List[Optional[list]] = [None] * world
    dist.all_gather_object(gathered, [names, digests], group=group)
    ref_names, ref_digests = gathered[0]
    for r, (other_names, other_digests) in enumerate(gathered):
        if other_names != ref_names:
            only = sorted(set(ref_names) ^ set(other_names))
            raise ValueError(f"rank {r} holds other sparse layers than rank 0 (differing: {only[:4]}); rank "
                             f"{rank} sees {len(names)} sparse layers. Every rank must sparsify the same layers.")
        for name, a, b in zip(ref_names, ref_digests, other_digests):
            if a != b:
                raise ValueError(f"layer {name!r}: its sparsity pattern on rank {r} differs from rank 0's; every rank "
                                 "must hold the same pattern (prune once and broadcast the masks, or load the same "
                                 "checkpoint), or DDP's buffer broadcast would put rank 0's pattern under rank "
                                 f"{r}'s values")
    return len(names)


def check_tensors_agree(tensors: Dict[str, torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> int:
    """Raises ``ValueError`` naming the first of ``tensors`` (``{name: tensor}``, e.g. a model's trained weights and
    masks) whose dtype, shape or bytes differ between the ranks of ``group`` (default: the world), or naming the
    names that only some ranks hold; returns the number of tensors compared. A collective: every rank must call it.
    Only checksums cross the processes."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("check_tensors_agree needs an initialised torch.distributed process group")
    names = list(tensors)
    digests = []
    for name in names:
        t = tensors[name].detach().cpu().contiguous()
        crc = zlib.crc32(repr((str(t.dtype), tuple(t.shape))).encode())
        digests.append(zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), crc))
    gathered: List[Optional[list]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, [names, digests], group=group)
    ref_names, ref_digests = gathered[0]
    for r, (other_names, other_digests) in enumerate(gathered):
        if other_names != ref_names:
            only = sorted(set(ref_names) ^ set(other_names))
            raise ValueError(f"rank {r} holds other tensors than rank 0 (differing: {only[:4]})")
        for name, a, b in zip(ref_names, ref_digests, other_digests):
            if a != b:
                raise ValueError(f"{name!r} differs between rank 0 and rank {r}")
    return len(names)


def is_multi_rank(group: Optional[dist.ProcessGroup] = None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` (default: the world) has more than one rank:
    then :func:`mean_across_ranks_` and :func:`broadcast_from_first_rank_` are collectives."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _by_device_dtype(tensors: Iterable[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]]:
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets


@torch.no_grad()
def mean_across_ranks_(tensors: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
    """Replaces every floating tensor of ``tensors``, in place, by its mean over the ranks of ``group`` (default:
    the world): one all-reduce per device and dtype. Every rank must call it with tensors of the same shapes, in the
    same order. Nothing happens in a single process."""
    if not is_multi_rank(group):
        return
    world = dist.get_world_size(group)
    for (_, dtype), ts in sorted(_by_device_dtype(tensors).items(), key=lambda kv: str(kv[0])):
        if not dtype.is_floating_point:
            raise TypeError(f"mean_across_ranks_ averages floating tensors, got {dtype}")
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
        flat.div_(world)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def broadcast_from_first_rank_(tensors: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
    """Overwrites ``tensors`` (any dtype, bool included), in place, with the first rank of ``group``'s (rank 0 of
    the world by default): one broadcast per device and dtype. Every rank must call it with tensors of the same
    shapes, in the same order. Nothing happens in a single process."""
    if not is_multi_rank(group):
        return
    for (_, dtype), ts in sorted(_by_device_dtype(tensors).items(), key=lambda kv: str(kv[0])):
        # bool goes as uint8, a dtype every backend (gloo, NCCL, MPI) broadcasts
        flat = torch.cat([(t.to(torch.uint8) if dtype == torch.bool else t).reshape(-1) for t in ts])
        dist.broadcast(flat, group=group, group_src=0)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def load_checkpoint(model: nn.Module, checkpoint_id, *, process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Loads into ``model`` a ``torch.distributed.checkpoint`` (DCP) directory written, at any world size, by
    ``dcp.save(model.state_dict(), checkpoint_id=path)``: sharded under FSDP2's ``fully_shard`` (after
    :func:`sparse.nn.contiguous_parameters`), under DDP, or in one process. ``model`` may itself be sharded (a
    collective then: every rank of ``process_group`` calls it) or a plain model in one process, with or without a
    process group.

    ``model`` must hold the checkpoint's sparse layers, each with the same format and number of kept values (build
    it as the saved one was, e.g. ``sparse.sparsify`` with the same arguments); their patterns are read from the
    checkpoint's metadata buffers. A layer that is dense in one and sparse in the other, or whose tensors have other
    shapes, is a ``ValueError`` naming the layer, before anything is read. The tensors are read into fresh ones and
    then go through ``model.load_state_dict``, which checks each sparse layer's stored pattern before copying into
    it: a layer whose pattern is invalid is left as it was, and the ``RuntimeError`` names it.

    The plain DCP recipe (``sd = model.state_dict(); dcp.load(sd, checkpoint_id=path); model.load_state_dict(sd)``)
    loads the same, but reads straight into the model's tensors, before any check."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.fspath(checkpoint_id)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path}: no torch.distributed.checkpoint there (no .metadata file)")
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = model.state_dict()
    ours = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    theirs = {k[: -len("pattern_info")].rstrip(".") for k in saved if k.split(".")[-1] == "pattern_info"}
    if ours != theirs:
        raise ValueError(
            f"{path}: the checkpoint's sparse layers differ from this model's: sparse only in the checkpoint: "
            f"{sorted(theirs - ours)[:4]}, sparse only in the model: {sorted(ours - theirs)[:4]}; build the model "
            "with the same sparse layers (sparse.sparsify with the arguments the saved model had)")
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        layer = key.rpartition(".")[0]
        where = f"layer {layer!r}" if layer in ours else f"{key!r}"
        if key not in saved:
            raise ValueError(f"{path}: {where}: the checkpoint has no {key!r}")
        md = saved[key]
        if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(t.shape):
            got = tuple(md.size) if isinstance(md, TensorStorageMetadata) else type(md).__name__
            raise ValueError(f"{path}: {where}: the checkpoint's {key!r} is {got}, this model's is {tuple(t.shape)}"
                             + (" (another pattern size: build the layer with the saved sparsity and block or "
                                "bank/keep)" if layer in ours else ""))
    staged = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    with warnings.catch_warnings():  # loading in one process without a group is what this function offers
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(staged, checkpoint_id=path, process_group=process_group)
    model.load_state_dict(staged)
