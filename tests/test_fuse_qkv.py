"""Query, key and value of a BERT-style self-attention as one sparse op (sparsify(..., fuse_qkv=True))."""

import copy
import importlib.util
import json

import pytest
import torch

import sparse
from sparse import timing
from sparse.nn import BalancedSparseLinear, BlockSparseLinear, SparseLinear
from sparse.patch import FUSED_QKV, QKVSlice

from .helpers import tiny_bert_dir

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not sparse._ext.available(), reason="sparse._C not built")

PATTERNS = {"block": dict(pattern="block", sparsity=0.5, block=32), "balanced": dict(pattern="balanced", bank=32,
                                                                                      keep=8)}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("tiny-bert")))


def _inputs():
    ids = torch.randint(5, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    return ids, mask


def _pair(bert_dir, pattern):
    """The tiny BERT sparsified twice from the same weights: the three projections separate, and fused."""
    base = transformers.BertModel.from_pretrained(bert_dir).eval()
    separate, fused = copy.deepcopy(base), copy.deepcopy(base)
    sparse.sparsify(separate, skip_if_slower=False, sample_tokens=0, **PATTERNS[pattern])
    report = sparse.sparsify(fused, skip_if_slower=False, sample_tokens=0, fuse_qkv=True, **PATTERNS[pattern])
    return separate, fused, report


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_fused_qkv_outputs_and_gradients_equal_the_unfused_sparse_model(bert_dir, pattern):
    separate, fused, report = _pair(bert_dir, pattern)
    assert [(f.attention, f.applied) for f in report.qkv_fusions] == [
        (f"encoder.layer.{i}.attention.self", True) for i in range(2)]
    assert report.settings["fuse_qkv"] is True
    key = report.layer("encoder.layer.0.attention.self.key")
    assert "runs in encoder.layer.0.attention.self.fused_qkv" in key.reason
    cls = BlockSparseLinear if pattern == "block" else BalancedSparseLinear
    for i in range(2):
        a, b = separate.encoder.layer[i].attention.self, fused.encoder.layer[i].attention.self
        assert isinstance(b.fused_qkv, cls)
        assert all(isinstance(b._modules[k], QKVSlice) for k in ("query", "key", "value"))
        # exactly the kept weights of the three, stacked
        torch.testing.assert_close(b.fused_qkv.weight.to_dense(), torch.cat([a.query.weight.to_dense(),
                                   a.key.weight.to_dense(), a.value.weight.to_dense()]), rtol=0, atol=0)
    ids, mask = _inputs()
    outs = []
    for model in (separate, fused):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.pow(2).mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    grads = dict(fused.named_parameters())
    for name, p in separate.named_parameters():
        parent, _, leaf = name.rpartition(".")
        if parent.endswith(("query", "key", "value")):
            continue
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for i in range(2):  # the fused values' gradient is the three gradients stacked, in the kernels' own layout
        a, b = separate.encoder.layer[i].attention.self, fused.encoder.layer[i].attention.self
        for leaf in ("values", "bias"):
            want = torch.cat([getattr(a._modules[k], leaf).grad for k in ("query", "key", "value")])
            torch.testing.assert_close(getattr(b.fused_qkv, leaf).grad, want, rtol=1e-5, atol=1e-6)


def test_fused_qkv_save_load_round_trip(bert_dir, tmp_path):
    _, fused, _ = _pair(bert_dir, "block")
    sparse.save(fused, tmp_path)
    meta = json.loads((tmp_path / "sparse.json").read_text())
    assert meta["fused_qkv"] == {f"encoder.layer.{i}.attention.self": [[0, 64, 64], [64, 64, 64], [128, 64, 64]]
                                 for i in range(2)}
    assert f"encoder.layer.0.attention.self.{FUSED_QKV}" in meta["sparse_modules"]
    loaded = sparse.load(None, tmp_path).eval()
    attn = loaded.encoder.layer[1].attention.self
    assert isinstance(attn.fused_qkv, BlockSparseLinear) and isinstance(attn.value, QKVSlice)
    ref, got = fused.state_dict(), loaded.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   fused(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)
    # a densified copy (what the ONNX export runs) computes the same
    with torch.no_grad():
        torch.testing.assert_close(sparse.densify(fused)(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   fused(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_fused_qkv_only_where_faster_and_only_where_it_fits(bert_dir, monkeypatch):
    base = transformers.BertModel.from_pretrained(bert_dir).eval()
    # the fused op made to measure slower: with skip_if_slower the three stay separate, saying why
    real = timing.interleaved

    def slow_fused(fns, **kw):  # and every sparse layer faster than its dense one, so all are converted
        out = real(fns, **kw)
        if set(fns) == {"separate", "fused"}:
            out["fused"] = timing.Samples(tuple(2 * s + 1.0 for s in out["separate"].seconds))
        if set(fns) == {"dense", "sparse"}:
            out["sparse"] = timing.Samples(tuple(0.5 * s for s in out["dense"].seconds))
        return out

    monkeypatch.setattr(timing, "interleaved", slow_fused)
    m = copy.deepcopy(base)
    report = sparse.sparsify(m, skip_if_slower=False, fuse_qkv=True, sample_tokens=8, repeats=1,
                             **PATTERNS["block"])
    assert all(f.applied for f in report.qkv_fusions)  # skip_if_slower=False: fused regardless
    m = copy.deepcopy(base)
    report = sparse.sparsify(m, "block", 0.5, block=32, fuse_qkv=True, sample_tokens=8, repeats=1,
                             include="*attention.self*")  # skip_if_slower: each layer and the fusion timed
    converted = {r.name for r in report.converted}
    assert len(report.qkv_fusions) == 2
    for f in report.qkv_fusions:
        assert {f"{f.attention}.{k}" for k in ("query", "key", "value")} <= converted
        assert not f.applied and f.fused_ms > f.separate_ms and "no faster" in f.reason
        assert isinstance(m.get_submodule(f.attention).query, SparseLinear)
    assert "not fused (fused" in report.to_markdown()
    monkeypatch.setattr(timing, "interleaved", real)

    # query and key in one format, value in another: not fused, the reason given
    m = copy.deepcopy(base)
    sparse.sparsify(m, "block", 0.5, block=32, include=["*.query", "*.key"], skip_if_slower=False, sample_tokens=0)
    sparse.sparsify(m, "balanced", bank=32, keep=8, include="*.value", skip_if_slower=False, sample_tokens=0)
    found = sparse.fuse_qkv(m, sample_tokens=0, only_if_faster=False)
    assert [f.reason for f in found] == ["query, key and value have different sparse formats"] * 2
    # only the attentions whose three projections the call converted are considered
    m = copy.deepcopy(base)
    report = sparse.sparsify(m, "block", 0.5, block=32, exclude="*.value", skip_if_slower=False, sample_tokens=0,
                             fuse_qkv=True)
    assert report.qkv_fusions == []
    with pytest.raises(ValueError, match="only_if_faster=True needs a timing input"):
        sparse.fuse_qkv(m, sample_tokens=0)


def test_a_fused_projection_called_directly_says_what_to_call(bert_dir):
    _, fused, _ = _pair(bert_dir, "block")
    attn = fused.encoder.layer[0].attention.self
    with pytest.raises(ValueError, match="call the attention module"):
        attn.query(torch.randn(2, 5, 64))
    assert attn.key(torch.randn(2, 5, 192)).shape == (2, 5, 64)


@pytest.mark.slow  # torch.compile and torch.export
def test_fused_qkv_compiles_and_exports(bert_dir):
    _, fused, _ = _pair(bert_dir, "block")
    ids, mask = _inputs()
    with torch.no_grad():
        eager = fused(input_ids=ids, attention_mask=mask).last_hidden_state
        explained = torch._dynamo.explain(fused)(input_ids=ids, attention_mask=mask)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        compiled = sparse.compile(fused, fullgraph=True)
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).last_hidden_state, eager)

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    program = sparse.export_program(LastHidden(fused), (ids, mask))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    # one op for query, key and value, three more per layer, and the pooler
    assert sum("sparsekern" in t and "linear" in t for t in targets) == 2 * 4 + 1, targets
    torch.testing.assert_close(program.module()(ids, mask), eager)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnx and onnxruntime are optional")
def test_fused_qkv_exports_to_onnx(bert_dir, tmp_path):
    import onnxruntime as ort

    _, fused, _ = _pair(bert_dir, "balanced")

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    ids, _ = _inputs()
    path = sparse.export_onnx(LastHidden(fused), str(tmp_path / "m.onnx"), ids, input_names=["ids"])
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), fused(input_ids=ids).last_hidden_state, rtol=1e-4,
                                   atol=1e-5)
