"""Layer dropping (Fan et al., 2020, "Reducing Transformer Depth on Demand with Structured Dropout"; Sajjad et
al., 2023, "On the Effect of Dropping Layers of Pre-trained Transformer Models"): a Hugging Face model keeps a
subset of its Transformer layers, in order, and its config says so; distillation (``sparse.distill``) then
recovers what the dropped layers did.

:func:`layer_stacks` finds the stacks (``encoder.layer`` of BERT and ViT, ``h`` of GPT-2, ``layers`` of Llama,
``encoder.block`` and ``decoder.block`` of T5, ...); :func:`drop_layers` keeps ``keep`` layers of each;
:func:`teacher_hidden_states` says which of the full model's hidden states the shallower one's should match
(``sparse.distill.distill(..., teacher_hidden=...)``).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Union

from torch import nn

__all__ = ["layer_stacks", "drop_layers", "every_other", "teacher_hidden_states"]

# Names a Transformer's layer list goes by; the list holds layers of one class.
_STACK_NAMES = ("layer", "layers", "h", "block", "blocks")
# Config attributes holding a stack's depth; decoder stacks (names containing "decoder") use the second tuple.
_DEPTH_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers")
_DECODER_DEPTH_ATTRS = ("num_decoder_layers", "decoder_layers")

Keep = Union[int, Sequence[int], Mapping[str, Union[int, Sequence[int]]]]


def layer_stacks(model: nn.Module) -> Dict[str, nn.ModuleList]:
    """``{dotted name: ModuleList}`` of every stack of Transformer layers in ``model``: a ``ModuleList`` named
    one of ``layer``, ``layers``, ``h``, ``block``, ``blocks`` whose entries are all of one class."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and name.rpartition(".")[2] in _STACK_NAMES:
            if len({type(x) for x in m}) == 1:
                out[name] = m
    return out


def every_other(n_layers: int, keep: int) -> List[int]:
    """``keep`` of ``n_layers`` indices spread evenly, the first layer always among them (Fan et al.'s "every
    other" strategy: 6 of 12 -> 0, 2, 4, 6, 8, 10)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n_layers:
        raise ValueError(f"keep must be an int in [1, {n_layers}] (the stack has {n_layers} layers), got {keep!r}")
    return sorted({(i * n_layers) // keep for i in range(keep)})


def _indices(spec, n: int, stack: str) -> List[int]:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return every_other(n, spec)
    try:
        idx = [int(i) for i in spec]
    except TypeError:
        raise TypeError(f"keep for {stack!r} must be an int or a sequence of layer indices, got {spec!r}") from None
    if not idx:
        raise ValueError(f"keep for {stack!r} is empty: a stack keeps at least one layer")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"keep for {stack!r}: indices {bad} are out of range [0, {n})")
    if idx != sorted(set(idx)):
        raise ValueError(f"keep for {stack!r} must be increasing and without repeats, got {idx}")
    return idx


def drop_layers(model: nn.Module, keep: Keep) -> Dict[str, List[int]]:
    """Keeps ``keep`` layers of every layer stack of ``model`` (in place) and returns ``{stack: kept indices}``.

    ``keep``: a count (that many layers spread evenly, :func:`every_other`), a sequence of layer indices (for
    every stack), or ``{stack name: count or indices}`` (stacks not named keep all their layers). The model's
    config gets the new depth (``num_hidden_layers``, ``n_layer``, ``num_layers``, ``num_decoder_layers``, ...
    and ``layer_types`` where it lists one entry per layer), and attention modules their new ``layer_idx`` (the
    KV cache of ``generate()`` is indexed by it). T5 holds its relative position bias in the first block of each
    stack: that block must be kept.
    """
    stacks = layer_stacks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of Transformer layers (a ModuleList named one of "
                         f"{_STACK_NAMES}) to drop layers from")
    if isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(stacks))
        if unknown:
            raise ValueError(f"keep names {unknown}, which are not layer stacks of the model: {sorted(stacks)}")
        plan = {name: _indices(spec, len(stacks[name]), name) for name, spec in keep.items()}
    else:
        plan = {name: _indices(keep, len(s), name) for name, s in stacks.items()}
    for name, idx in plan.items():
        first = stacks[name][0]
        relative = [m for m in first.modules() if getattr(m, "has_relative_attention_bias", False)]
        if relative and idx[0] != 0:
            raise ValueError(f"{name}: layer 0 holds the relative position bias the other layers use (T5); keep "
                             f"it (got {idx})")
    config = getattr(model, "config", None)
    for name, idx in plan.items():
        old = stacks[name]
        n_old = len(old)
        kept = nn.ModuleList([old[i] for i in idx])
        for j, layer in enumerate(kept):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, kept)
        # The model's config, and the stack owner's own copy where it has one (T5's encoder and decoder stacks).
        configs = [(config, _DECODER_DEPTH_ATTRS if "decoder" in name else _DEPTH_ATTRS)]
        own = getattr(parent, "config", None)
        if own is not None and own is not config:
            configs.append((own, _DEPTH_ATTRS + _DECODER_DEPTH_ATTRS))
        for cfg, attrs in configs:
            if cfg is None:
                continue
            for a in attrs:
                if getattr(cfg, a, None) == n_old:
                    setattr(cfg, a, len(idx))
                    break
            types = getattr(cfg, "layer_types", None)
            if isinstance(types, list) and len(types) == n_old:
                cfg.layer_types = [types[i] for i in idx]
    return plan


def teacher_hidden_states(kept: Sequence[int], n_layers: int) -> List[int]:
    """For a stack of ``n_layers`` that kept the layers ``kept`` (:func:`drop_layers`' answer for it): the index
    of the full model's hidden state (``output_hidden_states``: 0 the embeddings, i the output of layer i - 1)
    that each of the shallower model's ``len(kept) + 1`` hidden states stands for. Kept layer j does the work of
    the full layers ``kept[j]`` up to the next kept one, so its output matches the full model's before layer
    ``kept[j + 1]``, the last one the full model's output: keep ``[0, 2, 4]`` of 6 -> ``[0, 2, 4, 6]``."""
    idx = _indices(list(kept), n_layers, "kept")
    return [0] + idx[1:] + [n_layers]
