"""Pruning: which weights to keep. One module per concern, every name importable from ``sparse.prune``:

- :mod:`sparse.prune.masks`: the masks (bool, True = keep, shaped like the logical weight ``[out, in]``):
  unstructured magnitude, per layer or global across layers; block magnitude (L1 or L2 norm per block); balanced /
  N:M (top-k per bank); any of them from movement scores (Sanh et al., 2020, "Movement Pruning") instead of
  magnitudes.
- :mod:`sparse.prune.schedules`: gradual pruning during fine-tuning (Zhu & Gupta, 2017, "To prune, or not to
  prune"): ``GradualPruner`` raises the sparsity of dense weights along a cubic schedule (``cubic_sparsity``),
  re-masking every ``frequency`` steps, and ``compact`` finally swaps the pruned layers for the sparse modules.
- :mod:`sparse.prune.layers`: which layers of a model ``GradualPruner`` takes (found by :mod:`sparse.walk`, as
  ``sparse.sparsify`` finds them).
- :mod:`sparse.prune.heads`: attention-head pruning for BERT-style Hugging Face models (Michel et al., 2019, "Are
  Sixteen Heads Really Better than One?"): ``head_importance`` scores heads by the gradient of the loss with
  respect to a per-head gate; ``prune_heads`` removes heads and shrinks the Q/K/V and output projections. (Voita
  et al., 2019 learn the gates with an L0 penalty instead; the shrinking step is the same.)
- :mod:`sparse.prune.depth`: layer dropping (Fan et al., 2020): ``drop_layers`` keeps some of the Transformer
  layers of a Hugging Face encoder, decoder or encoder-decoder and updates its config and cache indices;
  ``teacher_hidden_states`` maps the shallower model's hidden states to the full one's for distillation.

Ties between equal scores are broken by position (the earlier entry is kept), as in ``sparse.formats``.
"""

from __future__ import annotations

from .depth import drop_layers, every_other, layer_stacks, teacher_hidden_states
from .heads import head_importance, prune_heads, recorded_pruned_heads
from .masks import balanced_mask, block_mask, global_magnitude_masks, magnitude_mask, movement_scores, topk_mask
from .schedules import PRUNE_PATTERNS, GradualPruner, cubic_sparsity  # noqa: F401  (PRUNE_PATTERNS: as before the split)

__all__ = [
    "topk_mask", "magnitude_mask", "global_magnitude_masks", "block_mask", "balanced_mask", "movement_scores",
    "cubic_sparsity", "GradualPruner", "head_importance", "prune_heads", "recorded_pruned_heads", "drop_layers",
    "every_other", "layer_stacks", "teacher_hidden_states",
]
