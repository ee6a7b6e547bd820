"""Sparse models across processes (``torch.distributed``).

DDP and FSDP synchronise parameters and gradients, and DDP broadcasts buffers from rank 0 at every forward
(``broadcast_buffers=True``): a sparse layer's pattern lives in buffers, so a rank whose pattern differs would get
rank 0's pattern under its own values, silently wrong. :func:`check_patterns_agree` finds that before training:
every rank must hold the same pattern (prune once and broadcast, or load the same checkpoint, or compute masks
from all-reduced scores as ``GradualPruner`` under DDP does). FSDP2 also needs :func:`sparse.nn.contiguous_parameters`.
"""

from __future__ import annotations

import zlib
from typing import List, Optional

import torch.distributed as dist
from torch import nn

from .nn import SparseLinear

__all__ = ["check_patterns_agree"]


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
