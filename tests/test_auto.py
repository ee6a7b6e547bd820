"""sparse.sparsify(model, pattern="auto"): each layer's existing zeros (a pruned checkpoint's, a
torch.nn.utils.prune mask, a parametrization's mask) converted to an exact format, the model's function unchanged;
layers without usable zeros stay dense with the reason; bad input is refused naming the layer."""

import copy

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as tprune
from torch import nn

import sparse
from sparse.formats import BalancedSparseWeight, BlockSparseWeight
from sparse.nn import BalancedSparseLinear, BlockSparseLinear, SparseLinear
from sparse.patch import CONVERTED, SKIPPED


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 96),
                         nn.Linear(96, 64))


def _pruned(seed=0):
    """Layer 0: zeros in 16x16 blocks (75%); 2: balanced 4 of every 32 (87.5%); 4: 99% unstructured zeros kept
    by a torch.nn.utils.prune mask; 5: dense, no zeros."""
    model = _mlp(seed)
    with torch.no_grad():
        w0 = model[0].weight
        w0.copy_(BlockSparseWeight.from_dense(w0, 16, sparsity=0.75).to_dense())
        w2 = model[2].weight
        w2.copy_(BalancedSparseWeight.from_dense(w2, 32, 4).to_dense())
    tprune.l1_unstructured(model[4], "weight", amount=0.99)
    return model


X = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))


def test_auto_converts_existing_zeros_exactly_and_reports_why():
    model, ref = _pruned(), _pruned()  # a pruned module cannot be deep-copied (its weight is computed)
    report = sparse.sparsify(model, "auto", skip_if_slower=False, sample_tokens=0)
    by = {r.name: r for r in report.layers}
    assert isinstance(model[0], BlockSparseLinear) and model[0].block == (16, 16) and by["0"].pattern == "block 16x16"
    assert "75.0% zeros (nonzeros)" in by["0"].reason
    assert isinstance(model[2], BalancedSparseLinear) and by["2"].pattern == "balanced bank 32 keep 4"
    assert by["2"].sparsity == pytest.approx(0.875)
    # the prune mask's layer: 99% zeros, scattered: blocks would store most of it, balanced banks and short
    # vectors little; converted from its mask
    assert by["4"].status == CONVERTED and "torch.nn.utils.prune mask" in by["4"].reason, by["4"]
    assert isinstance(model[4], SparseLinear) and not hasattr(model[4], "weight_orig")
    assert by["5"].status == SKIPPED and "no zero weight" in by["5"].reason and isinstance(model[5], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-6)
        for i in (0, 2, 4):  # each converted layer holds exactly the dense weight and computes its output
            assert torch.equal(model[i].weight.to_dense(), ref[i].weight.detach())
            x = torch.randn(7, model[i].in_features, generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(model[i](x), ref[i](x), rtol=1e-5, atol=1e-6)


def test_auto_timed_never_slower_than_dense():
    model, ref = _pruned(1), _pruned(1)
    report = sparse.sparsify(model, "auto", sample_tokens=32, repeats=3)  # skip_if_slower=True: the default
    for r in report.layers:
        if r.status == CONVERTED:
            assert r.sparse_ms is not None and r.dense_ms is not None and r.sparse_ms <= r.dense_ms
            assert "fastest exact format of" in r.reason
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-6)


class _Masked(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def test_auto_takes_a_parametrization_mask_and_given_masks():
    model = _mlp(2)
    mask = BlockSparseWeight.from_dense(model[2].weight, 32, sparsity=0.5).to_dense() != 0
    parametrize.register_parametrization(model[2], "weight", _Masked(mask))
    ref = copy.deepcopy(model)
    report = sparse.sparsify(model, "auto", include=["2"], skip_if_slower=False, sample_tokens=0)
    (rep,) = [r for r in report.layers if r.name == "2"]
    assert rep.status == CONVERTED and "_Masked parametrization mask" in rep.reason and rep.pattern == "block 32x32"
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-6)
    # masks= for "auto": must cover every nonzero weight
    model = _pruned(3)
    m0 = model[0].weight.detach() != 0
    report = sparse.sparsify(model, "auto", masks={"0": m0}, skip_if_slower=False, sample_tokens=0)
    assert [r.name for r in report.layers if r.status == CONVERTED] == ["0"]
    with pytest.raises(ValueError, match=r"layer '2': the mask drops nonzero weights"):
        sparse.sparsify(_pruned(3), "auto", masks={"2": torch.zeros(64, 128, dtype=torch.bool)},
                        skip_if_slower=False, sample_tokens=0)
    with pytest.raises(ValueError, match=r"layer '2': pattern='auto' needs a bool mask of the weight's shape "
                                         r"\(64, 128\), got torch.bool \(128, 64\)"):
        sparse.sparsify(_pruned(3), "auto", masks={"2": torch.ones(128, 64, dtype=torch.bool)},
                        skip_if_slower=False, sample_tokens=0)


def test_auto_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="pattern='auto' keeps the zeros each layer already has"):
        sparse.sparsify(_pruned(), "auto", sparsity=0.5)
    with pytest.raises(ValueError, match=r"found no zero weight in any selected layer \(0, 2, 4, 5\)"):
        sparse.sparsify(_mlp(), "auto", skip_if_slower=False, sample_tokens=0)
    with pytest.raises(ValueError, match="pattern must be one of .*'unstructured', 'auto'\\), got 'csr'"):
        sparse.sparsify(_mlp(), "csr")
