"""Walking a model's Linear layers: the one way ``sparse.patch`` (the patcher) and ``sparse.prune`` (the gradual
pruner) find, name, filter and replace them.

- :func:`linear_layers`: every Linear-like layer (``nn.Linear`` and its subclasses, transformers' ``Conv1D``, the
  sparse layers of this package) with its dotted name, each module once, in module order.
- :func:`name_filter` / :func:`pattern_matches`: the ``include`` / ``exclude`` arguments (globs on the dotted name,
  or a predicate) of ``sparsify`` and ``GradualPruner``; :func:`filter_reason` applies them.
- :func:`parameter_names`, :func:`tied_elsewhere`, :func:`weight_read_directly`: layers that must not change,
  because their weight is shared with another module or read by their parent without calling them.
- :func:`module_name`, :func:`replace_modules`: names of other modules and how a child is swapped, at every
  place a (shared) module is registered.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from torch import nn

from .nn import SparseLinear, _is_conv1d

__all__ = [
    "Filter", "is_linear_like", "linear_layers", "pattern_matches", "name_filter", "filter_reason",
    "parameter_names", "tied_elsewhere", "weight_read_directly", "module_name", "replace_modules",
]

# A filter: a glob or a list of globs on the dotted module name, or a predicate (name, module) -> bool.
Filter = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]
Predicate = Callable[[str, nn.Module], bool]


def is_linear_like(m: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass), transformers' ``Conv1D`` (weight stored ``[in, out]``) or a sparse layer."""
    return isinstance(m, (nn.Linear, SparseLinear)) or _is_conv1d(m)


def linear_layers(model: nn.Module, *, dense_only: bool = False) -> List[Tuple[str, nn.Module]]:
    """``(dotted name, module)`` of every Linear-like layer of ``model`` in module order. A module registered at
    several places is listed once, under its first name. ``dense_only`` leaves out the sparse layers."""
    seen: Set[int] = set()
    out = []
    for name, m in model.named_modules():
        if id(m) in seen or not is_linear_like(m):
            continue
        seen.add(id(m))
        if dense_only and isinstance(m, SparseLinear):
            continue
        out.append((name, m))
    return out


def pattern_matches(pattern: str, name: str) -> bool:
    """A glob on the full dotted name, or on any trailing part of it: ``"pooler.dense"``, ``"*attention*"``,
    ``"c_fc"`` (every ``...c_fc``), ``"encoder.layer.0.*"``."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def name_filter(spec: Optional[Filter], what: str, names: List[str]) -> Optional[Predicate]:
    """The predicate ``(name, module) -> bool`` of a filter argument (None for None). ``what`` names the argument
    in errors; every glob must match one of ``names`` (the candidate layers), so that a typo is an error, not a
    filter that silently selects nothing."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be a glob string, a non-empty list of glob strings or a callable, got {spec!r}")
    for p in patterns:
        if not any(pattern_matches(p, n) for n in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{what} pattern {p!r} matches no Linear layer of the model; the layers are: {shown}")
    return lambda name, module: any(pattern_matches(p, name) for p in patterns)


def filter_reason(
    name: str, module: nn.Module, include: Optional[Predicate], exclude: Optional[Predicate]
) -> Optional[str]:
    """Why the ``include`` / ``exclude`` predicates (from :func:`name_filter`) leave a layer out, or None if they
    select it."""
    if include is not None and not include(name, module):
        return "not matched by include"
    if exclude is not None and exclude(name, module):
        return "matched by exclude"
    return None


def parameter_names(model: nn.Module) -> Dict[int, List[str]]:
    """``{id(parameter): every dotted name it is registered under}``, shared parameters included."""
    names: Dict[int, List[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    return names


def tied_elsewhere(model: nn.Module, m: nn.Module, param_names: Dict[int, List[str]]) -> List[str]:
    """Names of parameters outside ``m`` that are ``m.weight`` itself (tied weights, e.g. GPT-2's lm_head);
    ``param_names`` from :func:`parameter_names`. Pruning such a weight would change those modules too."""
    return [n for n in param_names.get(id(m.weight), ()) if model.get_submodule(n.rpartition(".")[0]) is not m]


def weight_read_directly(model: nn.Module) -> Set[int]:
    """ids of the Linear layers whose parent reads their weight instead of calling them (``out_proj`` of
    ``nn.MultiheadAttention``): a sparse layer in their place would not be used."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model`` (its first, if registered twice; ``""`` for the model)."""
    return next(n for n, m in model.named_modules() if m is module)


def replace_modules(model: nn.Module, replacements: Dict[int, nn.Module]) -> None:
    """Swaps modules in place: every parent that holds a module whose id is a key of ``replacements`` is pointed
    at the replacement, at every place the module is registered (a module may be shared)."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]
