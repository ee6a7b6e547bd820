"""Saving and loading sparsified models: the state dict as safetensors plus a small JSON file that says which
modules are sparse (and how), which activations were fused, and which attention heads were pruned, so that
the same structure can be rebuilt on a fresh dense model before the tensors are loaded.

A saved model is a directory:
    model.safetensors   every tensor of ``model.state_dict()`` (tied tensors once)
    sparse.json         format version, model class, dtype, sparse modules, fusions (activations; query, key and
                        value as one op; residual add and LayerNorm as one op), pruned heads, tied names
    config.json         the Hugging Face config, when the model has one (``load(None, path)`` then rebuilds it)
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from . import prune
from .formats import BalancedSparseWeight, BlockSparseWeight
from .nn import BalancedSparseLinear, BlockSparseLinear, ResidualLayerNorm, SparseLinear
from .patch import FUSED_QKV, FusedActivation, QKVSlice, _install_qkv
from .quant import (
    QuantizedBalancedSparseLinear,
    QuantizedBalancedSparseWeight,
    QuantizedBlockSparseLinear,
    QuantizedBlockSparseWeight,
)

__all__ = ["save", "load"]

FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
META_FILE = "sparse.json"
CONFIG_FILE = "config.json"

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def _main_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype holding most parameter elements."""
    counts: Dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Writes ``model`` (sparsified or not) to the directory ``path`` (created if needed).

    ``load`` restores it exactly onto a freshly built dense model of the same architecture."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    os.makedirs(path, exist_ok=True)
    sparse_modules: Dict[str, Dict[str, Any]] = {}
    fused: Dict[str, Dict[str, str]] = {}
    fused_qkv: Dict[str, list] = {}
    fused_ln: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ResidualLayerNorm):
            fused_ln[name] = {"names": list(m._names), "replaces": m.replaces}
        slices = [m._modules.get(k) for k in ("query", "key", "value")]
        if all(isinstance(s, QKVSlice) for s in slices):
            fused_qkv[name] = [[s.start, s.out_features, s.in_features] for s in slices]
        if isinstance(m, BlockSparseLinear):
            sparse_modules[name] = {"class": "BlockSparseLinear", "block": list(m.block), "activation": m.activation}
        elif isinstance(m, QuantizedBlockSparseLinear):
            sparse_modules[name] = {"class": "QuantizedBlockSparseLinear", "block": list(m.block),
                                    "activation": m.activation}
        elif isinstance(m, QuantizedBalancedSparseLinear):
            sparse_modules[name] = {"class": "QuantizedBalancedSparseLinear", "bank": m.bank, "keep": m.keep,
                                    "activation": m.activation}
        elif isinstance(m, BalancedSparseLinear):
            sparse_modules[name] = {"class": "BalancedSparseLinear", "bank": m.bank, "keep": m.keep,
                                    "activation": m.activation}
        elif isinstance(m, FusedActivation):
            fused[name] = {"fused_into": m.fused_into, "activation": m.activation}

    state = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    storages = set()
    for key, t in state.items():
        # Tied parameters (e.g. GPT-2's lm_head and wte) are one tensor under two names: store it once.
        ident = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if t.numel()
            else None
        )
        if ident is not None and ident in seen:
            tied[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        out = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; other views of an already stored storage are copied.
        if out.numel() and out.untyped_storage().data_ptr() in storages:
            out = out.clone()
        storages.add(out.untyped_storage().data_ptr())
        tensors[key] = out
    save_file(tensors, os.path.join(path, TENSORS_FILE))

    dtype = _main_dtype(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "sparse_modules": sparse_modules,
        "fused_activations": fused,
        "fused_qkv": fused_qkv,
        "fused_layernorm": fused_ln,
        "pruned_heads": prune.recorded_pruned_heads(model),
        "tied": tied,
    }
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    config = getattr(model, "config", None)
    config_path = os.path.join(path, CONFIG_FILE)
    if config is not None and hasattr(config, "to_json_string"):
        with open(config_path, "w") as f:
            f.write(config.to_json_string())
    elif os.path.exists(config_path):
        os.remove(config_path)  # a stale config from an earlier save would describe another model


def _build_model(model_or_config: Any, path: str, meta: Dict[str, Any]) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    config = model_or_config
    if config is None:
        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise ValueError(f"{path} has no {CONFIG_FILE}: pass the dense model (or its config) to load()")
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
    if not hasattr(config, "to_json_string"):
        raise TypeError(
            f"model_or_config must be an nn.Module, a transformers config or None, got {type(config).__name__}"
        )
    module_name, _, cls_name = meta["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(config)


def load(model_or_config: Any, path: Union[str, os.PathLike]) -> nn.Module:
    """Restores a model written by ``save``.

    Args:
        model_or_config: the dense model to load into (built with the same architecture; modified in place), a
            transformers config (the saved model class is built from it), or None (config from ``path``).
        path: the directory ``save`` wrote.
    Returns:
        The model, with the saved sparse modules, fused activations and pruned heads restored, and every tensor
        equal to the saved one (cast to the saved dtype, on the device of the given model's parameters).
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: expected a directory written by sparse.save")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')}, this sparse reads {FORMAT_VERSION}"
        )
    model = _build_model(model_or_config, path, meta)
    tensors = load_file(os.path.join(path, TENSORS_FILE))
    for alias, key in meta["tied"].items():
        tensors[alias] = tensors[key]

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    if meta["dtype"] is not None and _main_dtype(model) not in (None, _DTYPES[meta["dtype"]]):
        model.to(_DTYPES[meta["dtype"]])
    if meta["pruned_heads"]:
        prune.prune_heads(model, {k: list(v) for k, v in meta["pruned_heads"].items()})

    for name, spans in meta.get("fused_qkv", {}).items():  # written since query/key/value fusion (same version)
        attention = model.get_submodule(name)
        if isinstance(attention._modules.get("query"), QKVSlice):
            continue  # already fused (a model loaded into twice)
        inn, total = spans[0][2], sum(out for _, out, _ in spans)
        like = next(attention.parameters())
        # a stand-in for the fused module, replaced by the sparse one below (or loaded into, if it was densified)
        stand_in = nn.Linear(inn, total, bias=f"{name}.{FUSED_QKV}.bias" in tensors, dtype=like.dtype,
                             device=like.device)
        stand_in.train(attention.training)
        _install_qkv(attention, stand_in, name, [tuple(s) for s in spans])
    for name, info in meta["sparse_modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the saved model has a sparse module {name!r} that this model lacks") from exc
        if isinstance(old, (SparseLinear, QuantizedBlockSparseLinear, QuantizedBalancedSparseLinear)):
            continue  # already sparse (e.g. a model loaded into twice): load_state_dict checks it
        bias = tensors.get(f"{name}.bias")
        if info["class"] == "BlockSparseLinear":
            t = {
                k: tensors[f"{name}.{k}"]
                for k in ("values", "row_offsets", "col_indices", "col_offsets", "row_indices", "block_perm")
            }
            out, inn = tensors[f"{name}.pattern_info"][:2].tolist()
            w = BlockSparseWeight(
                t["values"],
                t["row_offsets"],
                t["col_indices"],
                (out, inn),
                col_offsets=t["col_offsets"],
                row_indices=t["row_indices"],
                block_perm=t["block_perm"],
            )
            new = BlockSparseLinear.from_weight(w.to(device), None if bias is None else bias.to(device),
                                                activation=info["activation"])
        elif info["class"] == "BalancedSparseLinear":
            out, inn = tensors[f"{name}.pattern_info"][:2].tolist()
            w = BalancedSparseWeight(tensors[f"{name}.values"], tensors[f"{name}.indices"], info["bank"], inn)
            new = BalancedSparseLinear.from_weight(w.to(device), None if bias is None else bias.to(device),
                                                   activation=info["activation"])
        elif info["class"] == "QuantizedBlockSparseLinear":
            out, inn, bo, bi = tensors[f"{name}.pattern_info"].tolist()
            w = QuantizedBlockSparseWeight(*(tensors[f"{name}.{k}"] for k in
                                             ("qvalues", "w_scale", "w_sum", "row_offsets", "col_indices")),
                                           (out, inn), (bo, bi))
            new = QuantizedBlockSparseLinear(w, bias, activation=info["activation"])
        elif info["class"] == "QuantizedBalancedSparseLinear":
            out, inn, bank, keep, window = tensors[f"{name}.pattern_info"].tolist()
            w = QuantizedBalancedSparseWeight(*(tensors[f"{name}.{k}"] for k in ("qvalues", "indices", "w_scale",
                                                                                 "w_sum")),
                                              (out, inn), window, bank, keep)
            new = QuantizedBalancedSparseLinear(w, bias, activation=info["activation"])
        else:
            raise ValueError(f"{meta_path}: unknown sparse module class {info['class']!r} for {name!r}")
        new.train(old.training)
        _set_submodule(model, name, new)
    for name, info in meta["fused_activations"].items():
        _set_submodule(model, name, FusedActivation(info["fused_into"], info["activation"]))
    for name, info in meta.get("fused_layernorm", {}).items():  # written since the fusion (same format version)
        block = model.get_submodule(name)
        if isinstance(block, ResidualLayerNorm):
            continue
        names = tuple(info["names"])
        fused = ResidualLayerNorm(*(block._modules.get(n) for n in names), names=names, replaces=info["replaces"])
        fused.train(block.training)
        _set_submodule(model, name, fused)

    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}"
        )
    return model

