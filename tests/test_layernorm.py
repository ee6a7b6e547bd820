"""Residual add + LayerNorm as one op (sparsekern::residual_layer_norm) and as the output stage of BERT-style
blocks (sparse.nn.ResidualLayerNorm, sparsify(..., fuse_layernorm=True))."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse
from sparse import ops
from sparse.nn import BlockSparseLinear, ResidualLayerNorm

from .helpers import tiny_bert_dir

pytestmark = pytest.mark.skipif(not sparse._ext.available(), reason="sparse._C not built")

OP = torch.ops.sparsekern.residual_layer_norm
# float32: the statistics in float32 like aten's; bfloat16 / float16: a few ulps of the output's 8 / 11 bits.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=3e-3)}


def _ref(x, r, w, b, eps):
    """float64 LayerNorm(x + r), the values rounded to the inputs' dtype first (what both paths read)."""
    s = x.double() + (r.double() if r is not None else 0)
    return F.layer_norm(s, s.shape[-1:], None if w is None else w.double(), None if b is None else b.double(), eps)


def _data(shape, dtype, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    # rows far from zero mean, so that a one-pass E[x^2] - E[x]^2 variance would cancel visibly
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, r, w, b


@pytest.mark.parametrize("n", [1, 7, 64, 768, 1000])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_op_matches_reference_on_every_isa(isa, dt, n):
    for shape in [(1, n), (37, n), (2, 5, n)]:
        x, r, w, b = _data(shape, dt)
        got = OP(x, r, w, b, 1e-12)
        assert got.dtype == dt and got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), _ref(x, r, w, b, 1e-12), **TOL[dt], msg=f"{isa} {dt} {shape}")
        if dt == torch.float32:  # as close as aten's own fp32 LayerNorm is
            aten = F.layer_norm(x + r, (n,), w, b, 1e-12).double()
            err, aten_err = (got.double() - _ref(x, r, w, b, 1e-12)).abs().max(), (aten - _ref(x, r, w, b, 1e-12)
                                                                                    ).abs().max()
            assert err <= 4 * aten_err + 1e-6, (err, aten_err)


@pytest.mark.parametrize("dt", [torch.float64, torch.float16])
def test_other_dtypes_compute_the_same(dt):
    x, r, w, b = _data((9, 48), dt)
    torch.testing.assert_close(OP(x, r, w, b, 1e-5).double(), _ref(x, r, w, b, 1e-5), **TOL[dt])


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_optional_residual_weight_bias_and_eps(isa, dt):
    x, r, w, b = _data((11, 96), dt, seed=1)
    for args in [(None, w, b), (r, None, None), (r, w, None), (r, None, b)]:
        got = OP(x, *args, 0.5)
        torch.testing.assert_close(got.double(), _ref(x, *args, 0.5), **TOL[dt], msg=str([a is None for a in args]))


def test_strided_rows_and_views(isa):
    base, rbase, w, b = _data((20, 130), torch.float32, seed=2)
    x, r = base[::2, 1:129], rbase[1::2, :128]  # rows strided, features contiguous
    torch.testing.assert_close(OP(x, r, w[:128], b[:128], 1e-6).double(), _ref(x, r, w[:128], b[:128], 1e-6),
                               **TOL[torch.float32])
    xt = base[:, :128].t()  # features strided: copied, same result
    rt = rbase[:, :128].t().contiguous()
    torch.testing.assert_close(OP(xt.t().t(), rt, None, None, 1e-6).double(), _ref(xt, rt, None, None, 1e-6),
                               **TOL[torch.float32])


def test_empty_and_non_finite_rows():
    x, r, w, b = _data((4, 32), torch.float32)
    assert OP(x[:0], r[:0], w, b, 1e-5).shape == (0, 32)
    x = x.clone()
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    got = OP(x, r, w, b, 1e-5)
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()  # as aten: the whole row
    torch.testing.assert_close(got[[0, 3]].double(), _ref(x[[0, 3]], r[[0, 3]], w, b, 1e-5), **TOL[torch.float32])


def test_thread_count_does_not_change_the_result():
    x, r, w, b = _data((257, 384), torch.float32, seed=3)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, r, w, b, 1e-12)
        torch.set_num_threads(2)
        two = OP(x, r, w, b, 1e-12)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_bad_input_names_the_value():
    x, r, w, b = _data((4, 32), torch.float32)
    with pytest.raises(RuntimeError, match="residual must have the dtype of x"):
        OP(x, r.double(), w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"residual must have the shape of x"):
        OP(x, r[:, :16], w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[32\]"):
        OP(x, r, w[:8], b, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        OP(x, r, w, b.bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="eps must be finite and >= 0, got -1"):
        OP(x, r, w, b, -1.0)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16, got Int"):
        OP(x.int(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="CPU tensors"):
        ops.residual_layer_norm(x.to("meta"), None)


def test_gradients_match_aten():
    x, r, w, b = (t.double().requires_grad_() for t in _data((5, 12), torch.float32))
    assert torch.autograd.gradcheck(lambda *a: OP(*a, 1e-5), (x, r, w, b))
    x, r, w, b = (t.requires_grad_() for t in _data((6, 40), torch.float32, seed=4))
    g = torch.randn(6, 40)
    got = torch.autograd.grad(ops.residual_layer_norm(x, r, w, b, 1e-5), (x, r, w, b), g)
    want = torch.autograd.grad(F.layer_norm(x + r, (40,), w, b, 1e-5), (x, r, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torch.compile
def test_compiles_without_graph_breaks():
    x, r, w, b = _data((8, 64), torch.float32)
    fn = torch.compile(lambda x, r: ops.residual_layer_norm(x, r, w, b, 1e-12) * 2, fullgraph=True)
    torch.testing.assert_close(fn(x, r), 2 * OP(x, r, w, b, 1e-12))


# ---- the module and the patcher ------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("tiny-bert-ln")))


def _pair(bert_dir, **kw):
    """The tiny BERT sparsified twice from the same weights: without and with the fused residual LayerNorm."""
    base = transformers.BertModel.from_pretrained(bert_dir).eval()
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    args = dict(pattern="block", sparsity=0.5, block=32, skip_if_slower=False, sample_tokens=0, **kw)
    sparse.sparsify(plain, **args)
    report = sparse.sparsify(fused, fuse_layernorm=True, **args)
    return plain, fused, report


def _ids():
    return torch.randint(5, 100, (2, 20), generator=torch.Generator().manual_seed(0))


BLOCKS = [f"encoder.layer.{i}.{b}" for i in range(2) for b in ("attention.output", "output")]


def test_sparsify_fuses_every_output_block_and_computes_the_same(bert_dir, monkeypatch):
    plain, fused, report = _pair(bert_dir)
    assert [(f.block, f.applied, f.reason) for f in report.layernorm_fusions] == [(b, True, "") for b in BLOCKS]
    assert report.settings["fuse_layernorm"] is True
    assert "Residual add and LayerNorm as one op" in report.to_markdown()
    assert [b["block"] for b in report.to_dict()["layernorm_fusions"]] == BLOCKS
    for name in BLOCKS:
        block = fused.get_submodule(name)
        assert isinstance(block, ResidualLayerNorm) and isinstance(block.dense, BlockSparseLinear)
    assert set(plain.state_dict()) == set(fused.state_dict())  # the block's own names
    calls = []
    real = ops.residual_layer_norm
    monkeypatch.setattr(ops, "residual_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=_ids()).last_hidden_state,
                                   plain(input_ids=_ids()).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # the fused op ran in every block


def test_training_and_gradients_take_the_blocks_own_ops(bert_dir):
    plain, fused, _ = _pair(bert_dir)
    outs = []
    for model in (plain, fused):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=_ids()).last_hidden_state  # grad mode, parameters require grad: aten's ops
        out.pow(2).mean().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is None:  # the pooler: not on the path to last_hidden_state
            assert grads[name].grad is None, name
        else:
            assert torch.equal(grads[name].grad, p.grad), name
    fused.train()  # dropout active: the same random stream gives the same result as the block
    plain.train()
    torch.manual_seed(5)
    a = plain(input_ids=_ids()).last_hidden_state
    torch.manual_seed(5)
    assert torch.equal(fused(input_ids=_ids()).last_hidden_state, a)


def test_only_blocks_it_reproduces(bert_dir):
    class OddOutput(nn.Module):  # the right children, another forward: must not be fused
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(8, 8)
            self.LayerNorm = nn.LayerNorm(8)
            self.dropout = nn.Dropout(0.1)

        def forward(self, hidden_states, input_tensor):
            return self.LayerNorm(self.dense(hidden_states) - input_tensor)

    class ExtraOutput(OddOutput):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 8)

    class NoNormOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(8, 8)
            self.LayerNorm = nn.RMSNorm(8)

    model = nn.ModuleDict({"odd": OddOutput(), "extra": ExtraOutput(), "rms": NoNormOutput()})
    found = {f.block: f for f in sparse.fuse_layernorm(model)}
    assert not any(f.applied for f in found.values())
    assert "did not reproduce the block" in found["odd"].reason
    assert "other children (gate)" in found["extra"].reason
    assert "not an nn.LayerNorm" in found["rms"].reason
    assert isinstance(model["odd"], OddOutput)


def test_save_load_and_densify(bert_dir, tmp_path):
    _, fused, _ = _pair(bert_dir)
    sparse.save(fused, tmp_path)
    meta = json.loads((tmp_path / "sparse.json").read_text())
    assert sorted(meta["fused_layernorm"]) == BLOCKS
    loaded = sparse.load(None, tmp_path).eval()
    assert all(isinstance(loaded.get_submodule(b), ResidualLayerNorm) for b in BLOCKS)
    with torch.no_grad():
        want = fused(input_ids=_ids()).last_hidden_state
        assert torch.equal(loaded(input_ids=_ids()).last_hidden_state, want)
        dense = sparse.densify(fused)
        assert not any(m.fused_op for m in dense.modules() if isinstance(m, ResidualLayerNorm))
        torch.testing.assert_close(dense(input_ids=_ids()).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_with_int8_layers_and_bfloat16(bert_dir):
    plain, fused, report = _pair(bert_dir, quantize="int8")
    assert all(f.applied for f in report.layernorm_fusions)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=_ids()).last_hidden_state,
                                   plain(input_ids=_ids()).last_hidden_state, rtol=1e-5, atol=1e-5)
    plain, fused, _ = _pair(bert_dir)
    plain, fused = plain.bfloat16(), fused.bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=_ids()).last_hidden_state.float(),
                                   plain(input_ids=_ids()).last_hidden_state.float(), rtol=3e-2, atol=6e-2)


@pytest.mark.slow  # torch.compile and torch.export
def test_compiles_and_exports_with_the_op_in_the_graph(bert_dir):
    _, fused, _ = _pair(bert_dir)
    ids = _ids()
    with torch.no_grad():
        eager = fused(input_ids=ids).last_hidden_state
        explained = torch._dynamo.explain(fused)(input_ids=ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch.testing.assert_close(sparse.compile(fused, fullgraph=True)(input_ids=ids).last_hidden_state, eager)

    class LastHidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    with torch.no_grad():  # an inference graph: with gradients the block's own ops are exported
        program = sparse.export_program(LastHidden(fused), (ids,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("residual_layer_norm" in t for t in targets) == 4, targets
    torch.testing.assert_close(program.module()(ids), eager)
