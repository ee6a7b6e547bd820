"""Shared test utilities: the tolerance rule of the whole suite, the random weights and data, the dtype and
activation grids, and ``slow_except`` for grids whose tail is left out of ``make test-fast``. conftest.py exposes
the grids as the ``dtype`` and ``activation`` fixtures and the weight factories as the ``make_bsr`` and
``make_balanced`` fixtures.

The tolerance rule (flash-attention's): ours is compared with the float64 reference, and allowed at most twice
the error that dense torch makes in the same dtype on the same data, plus a small floor (see
``assert_close_to_ref`` for the three floors in use and why)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import pytest
import torch

import sparse
from sparse import BalancedSparseWeight, BlockSparseWeight

# ---- the grids --------------------------------------------------------------------------------------------

# Every dtype the ops take.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The dtypes of the vectorised CPU kernels (AVX2 / AVX-512); the others take the portable code on every ISA.
VECTOR_DTYPES = (torch.float32, torch.bfloat16)
# The dtypes of the Triton kernels (no float64).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Every fused activation, as the package defines them; NONLINEAR: those that are not the identity.
ACTS = tuple(sparse.ops.ACTIVATIONS)
NONLINEAR = tuple(a for a in ACTS if a != "none")

# ---- the fast subset (pyproject.toml registers the markers: slow, gpu) -------------------------------------


def slow_except(values: Sequence, fast: Sequence) -> list:
    """``values`` for pytest.mark.parametrize with every one not in ``fast`` marked slow: ``make test-fast`` runs
    the ``fast`` ones, ``make test`` all of them."""
    missing = [v for v in fast if v not in values]
    assert not missing, f"fast values {missing} are not among the values"
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


# ---- the tolerance rule ------------------------------------------------------------------------------------

_ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# The floor of the kernel tests (CPU ISA paths, Triton): relative to max(1, max |ref|), the same in every dtype.
KERNEL_FLOOR = 1e-6


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor, dense: torch.Tensor, what: str = "", *,
                        k: int = 4096, floor: Optional[float] = None, terms: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> None:
    """err(ours) <= 2 err(dense) + floor * scale, errors being max |. - ref|.

    ours, dense: results in the working dtype (dense: dense torch on the same data); ref: the float64 reference
    of the same computation; k: the length of the reductions (an upper bound is fine).

    The floor only guards against a dense torch that happens to be (almost) exact; three are in use:

    * default: 4 ulp of the dtype, relative to max(1, max |ref|). In float64 dense torch *is* the reference
      (its error is ~0), so the floor alone must cover the reordering of a k-term sum and is sqrt(k) times
      larger. In the other dtypes dense torch's own rounding dominates. For the op, module and model tests.
    * ``floor=KERNEL_FLOOR`` (1e-6 relative to max(1, max |ref|), whatever the dtype): the kernel tests (every
      CPU ISA path, the Triton kernels), which want a kernel that loses accuracy not to hide under a floor of
      several ulps of bf16 / fp16.
    * ``terms=``: the sums of |terms| behind each output (shape of ref, or broadcastable), for tests that
      compute them (the reliability tests). The floor is then relative to max |terms|: one ulp of the dtype
      (the final rounding when dense torch happens to be exact) plus the typical sqrt(k) error of a k-term
      running sum in the accumulation dtype (float32; float64 for float64): a dot product of one output, unlike
      a max over many, can land on an unlucky rounding for either side.

    ``floor`` (relative) and ``scale`` (what it is relative to) override the defaults above; ``scale=1.0`` makes
    the floor absolute."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == dense.dtype, f"{what}: dtype {ours.dtype} != {dense.dtype}"
    dtype = ours.dtype
    ref = ref.double()
    if scale is None:
        if terms is not None:
            scale = terms.double().abs().max().item() if terms.numel() else 0.0
        else:
            scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    if floor is None:
        if terms is not None:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            floor = torch.finfo(dtype).eps + torch.finfo(acc).eps * math.sqrt(max(k, 1))
        else:
            floor = 4 * _ULP[dtype] * (k**0.5 if dtype == torch.float64 else 1.0)
    bound_floor = max(floor * scale, torch.finfo(torch.float64).tiny)
    if not ref.numel():
        return
    non_finite = ~torch.isfinite(ours) & torch.isfinite(ref)
    assert not non_finite.any(), f"{what}: {int(non_finite.sum())} non-finite values where the reference is finite"
    err = (ours.double() - ref).abs().max().item()
    err_dense = (dense.double() - ref).abs().max().item()
    assert err <= 2 * err_dense + bound_floor, (
        f"{what}: max error {err:.3g} > 2 x dense torch error {err_dense:.3g} + floor {bound_floor:.3g}"
    )


# ---- random data and weights, deterministic from a seed ----------------------------------------------------

Seed = Union[int, torch.Generator]


def _generator(seed: Seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def randn(shape: Union[int, Sequence[int]], dtype: torch.dtype = torch.float32, seed: Seed = 0,
          scale: float = 1.0, *, device=None, exact: bool = False) -> torch.Tensor:
    """Normal samples times ``scale``, drawn in float64 and rounded to ``dtype``; ``seed``: an int, or a
    torch.Generator to draw from (a test that draws several tensors from one stream).

    exact: rounded to multiples of 1/256 in [-8, 8] first, so that in float64 every product and partial sum of
    a few hundred of them is exact and any reduction order gives the same bits (the default floor of the rule is
    below float64's reduction-order noise at a few hundred features, while an indexing bug still shows as a
    large error)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    t = torch.randn(*shape, generator=_generator(seed), dtype=torch.float64) * scale
    if exact:
        t = ((t * 256).round() / 256).clamp(-8, 8)
    t = t.to(dtype)
    return t if device is None else t.to(device)


def make_bsr(out: int, inn: int, block, *, sparsity: Optional[float] = None, density: Optional[float] = None,
             mask: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32, seed: Seed = 0,
             scale: float = 1.0, device=None, exact: bool = False) -> BlockSparseWeight:
    """A random BlockSparseWeight [out, in] (``randn`` values in ``dtype``) with ``block`` (int or pair), and
    exactly one of: ``sparsity`` (the fraction of blocks dropped, the largest-norm ones kept), ``density`` (each
    block kept with that probability, drawn from the seed before the values) or ``mask`` (per element or per
    block, as BlockSparseWeight.from_dense takes it). Built on the CPU, then moved to ``device``."""
    if sum(a is not None for a in (sparsity, density, mask)) != 1:
        raise ValueError("give exactly one of sparsity=, density= or mask=")
    g = _generator(seed)
    if density is not None:
        bo, bi = (block, block) if isinstance(block, int) else block
        mask = torch.rand(-(-out // bo), -(-inn // bi), generator=g) < density
    W = randn((out, inn), dtype, g, scale, exact=exact)
    w = BlockSparseWeight.from_dense(W, block, sparsity=sparsity, mask=mask)
    return w if device is None else w.to(device)


def make_balanced(out: int, inn: int, bank: int, keep: int, *, dtype: torch.dtype = torch.float32,
                  seed: Seed = 0, scale: float = 1.0, device=None, exact: bool = False) -> BalancedSparseWeight:
    """A random BalancedSparseWeight [out, in]: the ``keep`` largest of every ``bank`` entries of a ``randn``
    matrix in ``dtype``. Built on the CPU, then moved to ``device``."""
    W = randn((out, inn), dtype, seed, scale, exact=exact)
    w = BalancedSparseWeight.from_dense(W, bank, keep)
    return w if device is None else w.to(device)


# ---- a tiny Hugging Face model directory --------------------------------------------------------------------

# Common English and docstring words, so that the tiny tokenizer does not map most text to [UNK].
WORDS = ("the a an of to and or in is it be for on as by with that this from are not if return returns object "
         "file list value values string name default function method class new when which can will used use set "
         "get data type error none true false number time path module").split()


def tiny_bert_dir(d: str) -> str:
    """Saves a random 2-layer BertModel (hidden 64, intermediate 128, seed 0) and a WordPiece tokenizer into the
    directory ``d`` as a Hugging Face model directory (what ``sparsekern sparsify --model`` takes); returns ``d``.
    Needs transformers."""
    import transformers

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + WORDS
        + letters
        + ["##" + c for c in letters]
        + list(".,;:()'\"-_=")
    )
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=128)
    transformers.BertModel(config).eval().save_pretrained(d)
    return d
