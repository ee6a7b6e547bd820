"""sparse.sparsify(model, pattern="unstructured"): magnitude pruning per layer into BlockSparseLinear with 1x1
blocks (CSR). On an nn.Sequential MLP and a tiny random BERT: the kept weights (count and choice, ties
included), outputs and gradients against the dense model with the same mask, masks=, the report, save/load,
torch.compile, pattern="auto" choosing it, and bad input."""

import copy
import json

import pytest
import torch
from torch import nn

import sparse
from sparse.nn import BlockSparseLinear, SparseLinear
from sparse.patch import CONVERTED, SKIPPED, FusedActivation
from tests.helpers import assert_close_to_ref

transformers = pytest.importorskip("transformers")

COMMON = dict(skip_if_slower=False, sample_tokens=0)
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny_bert(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))


def kept_positions(m: BlockSparseLinear):
    """(rows, cols) of the stored weights of a 1x1-block layer, in the order of ``values``."""
    counts = (m.row_offsets[1:] - m.row_offsets[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(m.out_features), counts)
    return rows, m.col_indices.long()


def kept_mask(m: BlockSparseLinear) -> torch.Tensor:
    mask = torch.zeros(m.out_features, m.in_features, dtype=torch.bool)
    mask[kept_positions(m)] = True
    return mask


def expected_mask(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference choice: the n - floor(sparsity * n) largest |w| (a full stable sort, so ties keep the earlier
    position), written independently of sparse.prune.topk_mask."""
    n = W.numel()
    n_keep = n - int(sparsity * n + 1e-9)
    order = torch.sort(W.detach().abs().flatten().double(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.reshape(W.shape)


def masked_dense(dense: nn.Module, sparsified: nn.Module) -> nn.Module:
    """A copy of the dense model whose weights are the sparsified model's (pruned entries zero)."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in sparsified.named_modules():
            if isinstance(m, SparseLinear):
                ref.get_submodule(name).weight.copy_(m.weight.to_dense())
    return ref


def hidden(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_mlp_keeps_the_largest_weights_and_matches_the_masked_dense_model():
    dense = mlp()
    with torch.no_grad():  # ties: many equal magnitudes, the earlier position must win
        dense[2].weight.copy_((dense[2].weight * 256).round() / 256)
    model = copy.deepcopy(dense)
    report = sparse.sparsify(model, "unstructured", 0.8, fuse_activations=True, **COMMON)
    assert [r.pattern for r in report.layers] == ["unstructured"] * 3
    assert all(r.status == CONVERTED for r in report.layers)
    assert report.settings["pattern_args"] == {"sparsity": 0.8}
    assert isinstance(model[1], FusedActivation) and model[0].activation == "gelu"
    for i in (0, 2, 4):
        m, W = model[i], dense[i].weight
        assert isinstance(m, BlockSparseLinear) and m.block == (1, 1)
        assert torch.equal(kept_mask(m), expected_mask(W, 0.8)), i
        assert m.values.shape[0] == W.numel() - int(0.8 * W.numel())  # e.g. 8192 - 6553 = 1639
        assert torch.equal(m.weight.to_dense(), W.detach() * expected_mask(W, 0.8))
        rep = report.layer(str(i))
        assert rep.sparsity == pytest.approx(1 - m.values.shape[0] / W.numel())
        # bytes: per kept weight its value, column, row and column-order position (int32); the two offset
        # arrays; the bias
        offsets = 4 * (m.out_features + 1 + m.in_features + 1)
        assert rep.bytes_after == 16 * m.values.shape[0] + offsets + 4 * m.out_features
    a, keep = dense[2].weight.detach().abs(), expected_mask(dense[2].weight, 0.8)
    assert a[keep].min() == a[~keep].max()  # the ties were real: equal magnitudes on both sides of the cut
    ref = masked_dense(dense, model)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_to_ref(model(x), copy.deepcopy(ref).double()(x.double()), ref(x))
    # the report: the same table as for the other patterns, with "unstructured" as the layer's pattern
    md = report.to_markdown()
    assert "(unstructured, {'sparsity': 0.8})" in md and "| unstructured | 0.800 |" in md and "block 1x1" not in md


def test_masks_choose_the_weights_per_element():
    dense = mlp(1)
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(128, 96, generator=g).t() < 0.1  # [out, in] = [96, 128], non-contiguous
    mask[5] = False  # an empty row
    report = sparse.sparsify(model, "unstructured", masks={"2": mask}, **COMMON)
    assert [r.name for r in report.converted] == ["2"] and report.layer("2").pattern == "unstructured"
    assert report.layer("0").reason == "no mask given" and type(model[0]) is nn.Linear
    assert torch.equal(kept_mask(model[2]), mask)  # exactly the mask, whatever the magnitudes
    assert torch.equal(model[2].weight.to_dense(), dense[2].weight.detach() * mask)
    x = torch.randn(4, 64, generator=g)
    ref = masked_dense(dense, model)
    with torch.no_grad():
        assert_close_to_ref(model(x), copy.deepcopy(ref).double()(x.double()), ref(x))


def test_tiny_bert_outputs_and_gradients_equal_the_masked_dense_model():
    dense = tiny_bert()
    model = copy.deepcopy(dense)
    report = sparse.sparsify(model, "unstructured", 0.75, fuse_activations=True, **COMMON)
    assert len(report.converted) == len(report.layers) == 13  # 2 x (q, k, v, o, ffn in, ffn out) + pooler
    assert {r.pattern for r in report.layers} == {"unstructured"} and len(report.fusions) == 2
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 13 and all(isinstance(m, BlockSparseLinear) and m.block == (1, 1) for m in layers.values())
    for n, m in layers.items():
        assert torch.equal(kept_mask(m), expected_mask(dense.get_submodule(n).weight, 0.75)), n

    ref = masked_dense(dense, model)
    ref64 = copy.deepcopy(ref).double()
    assert_close_to_ref(hidden(model), hidden(ref64), hidden(ref), "hidden states")

    def backward(m):
        m.zero_grad()
        out = m(input_ids=IDS)
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(3).sum()).backward()

    for m in (model, ref, ref64):
        backward(m)
    dense_params = dict(ref.named_parameters())
    dense64_params = dict(ref64.named_parameters())
    for n, m in layers.items():  # the kept entries' gradients, in the order of values; the bias
        pos = kept_positions(m)
        assert_close_to_ref(m.values.grad.reshape(-1), dense64_params[f"{n}.weight"].grad[pos],
                            dense_params[f"{n}.weight"].grad[pos], f"{n} values")
        assert_close_to_ref(m.bias.grad, dense64_params[f"{n}.bias"].grad, dense_params[f"{n}.bias"].grad, n)
    in_sparse = {f"{n}.{p}" for n in layers for p in ("values", "bias")}
    others = [(n, p) for n, p in model.named_parameters() if n not in in_sparse]
    assert len(others) == 3 + 2 + 2 * 2 * 2  # embeddings, their LayerNorm, 2 LayerNorms per layer
    for n, p in others:
        assert_close_to_ref(p.grad, dense64_params[n].grad, dense_params[n].grad, n)


def test_gpt2_conv1d_masks_are_out_by_in():
    """GPT-2's Conv1D stores its weight [in, out]; masks and the kept weights are of the logical [out, in] one."""
    torch.manual_seed(8)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=1, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    dense = transformers.GPT2Model(cfg).eval()
    model = copy.deepcopy(dense)
    c_fc = dense.h[0].mlp.c_fc
    mask = torch.rand(256, 64, generator=torch.Generator().manual_seed(8)) < 0.2  # [out, in]
    report = sparse.sparsify(model, "unstructured", masks={"h.0.mlp.c_fc": mask}, **COMMON)
    assert [r.name for r in report.converted] == ["h.0.mlp.c_fc"] and report.converted[0].kind == "Conv1D"
    assert torch.equal(kept_mask(model.h[0].mlp.c_fc), mask)
    assert torch.equal(model.h[0].mlp.c_fc.weight.to_dense(), c_fc.weight.detach().t() * mask)
    sparse.sparsify(model, "unstructured", 0.9, include="h.0.attn.*", **COMMON)
    attn = model.h[0].attn.c_attn
    assert torch.equal(kept_mask(attn), expected_mask(dense.h[0].attn.c_attn.weight.t(), 0.9))
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, SparseLinear):
                ref.get_submodule(name).weight.copy_(m.weight.to_dense().t())
    assert_close_to_ref(hidden(model), hidden(copy.deepcopy(ref).double()), hidden(ref))


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_bert(seed=3)
    sparse.sparsify(model, "unstructured", 0.9, exclude="pooler*", fuse_activations=True, **COMMON)
    sparse.save(model, tmp_path)
    meta = json.loads((tmp_path / "sparse.json").read_text())
    assert len(meta["sparse_modules"]) == 12
    assert all(v["class"] == "BlockSparseLinear" and v["block"] == [1, 1] for v in meta["sparse_modules"].values())
    for target in (tiny_bert(seed=4), None):
        loaded = sparse.load(target, tmp_path).eval()
        sd, ref = loaded.state_dict(), model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        for n, m in model.named_modules():
            if isinstance(m, SparseLinear):
                other = loaded.get_submodule(n)
                assert isinstance(other, BlockSparseLinear) and other.block == (1, 1), n
                assert other.activation == m.activation and other.values.stride() == m.values.stride()
        assert type(loaded.pooler.dense) is nn.Linear
        assert torch.equal(hidden(loaded), hidden(model))


@pytest.mark.slow  # torch.compile, forward and a training step
def test_torch_compile_fullgraph_equals_eager():
    model = tiny_bert(layers=1, seed=5)
    sparse.sparsify(model, "unstructured", 0.75, fuse_activations=True, **COMMON)
    eager = hidden(model)
    explained = torch._dynamo.explain(model)(input_ids=IDS)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).last_hidden_state, eager)

    def loss(out):
        return out.last_hidden_state.square().mean() + out.pooler_output.sum()

    loss(model(input_ids=IDS)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss(compiled(input_ids=IDS)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_auto_takes_unstructured_for_scattered_zeros():
    """A layer with 98% scattered zeros: no block or vector format stores it compactly, balanced banks need the
    fullest bank's count everywhere; unstructured stores it in the fewest bytes, exactly."""
    model = mlp(6)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        model[2].weight.mul_(torch.rand(96, 128, generator=g) < 0.02)
    ref = copy.deepcopy(model)
    report = sparse.sparsify(model, "auto", **COMMON)
    rep = report.layer("2")
    assert rep.status == CONVERTED and rep.pattern == "unstructured", rep
    assert isinstance(model[2], BlockSparseLinear) and model[2].block == (1, 1)
    assert torch.equal(model[2].weight.to_dense(), ref[2].weight.detach())
    assert report.layer("0").status == SKIPPED and "no zero weight" in report.layer("0").reason
    x = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, timed", [(torch.float32, True), (torch.bfloat16, False)])
def test_auto_times_unstructured_only_where_it_saves_bytes(dtype, timed):
    """85% scattered zeros: unstructured stores 16 bytes per kept fp32 weight (2.4 per dense weight, under 85% of
    4) and is timed; in bf16 14 bytes per kept weight (2.1 per dense weight, over 85% of 2) is not."""
    model = mlp(7).to(dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model[2].weight.mul_((torch.rand(96, 128, generator=g) < 0.15).to(dtype))
    report = sparse.sparsify(model, "auto", include=["2"], skip_if_slower=False, sample_tokens=16, repeats=1)
    reason = report.layer("2").reason
    assert "fastest exact format of" in reason, reason
    assert ("unstructured" in reason) is timed, reason


def test_bad_input_names_the_value_and_what_was_expected():
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"sparsity must be in \[0, 1\), got {bad}"):
            sparse.sparsify(mlp(), "unstructured", bad, **COMMON)
    with pytest.raises(ValueError, match=r"layer '2': pattern='unstructured' needs a bool mask of the weight's shape "
                                         r"\(out, in\) = \(96, 128\), got torch.bool \(128, 96\)"):
        sparse.sparsify(mlp(), "unstructured", masks={"2": torch.ones(128, 96, dtype=torch.bool)}, **COMMON)
    with pytest.raises(ValueError, match=r"layer '0': .*bool mask.*\(128, 64\), got torch.float32 \(128, 64\)"):
        sparse.sparsify(mlp(), "unstructured", masks={"0": torch.ones(128, 64)}, **COMMON)
    with pytest.raises(ValueError, match="masks name layers that are not Linear layers of the model: \\['9'\\]"):
        sparse.sparsify(mlp(), "unstructured", masks={"9": torch.ones(1, 1, dtype=torch.bool)}, **COMMON)
    with pytest.raises(ValueError, match="keep=4 is for pattern='balanced'"):
        sparse.sparsify(mlp(), "unstructured", 0.5, keep=4, **COMMON)
    model = tiny_bert(layers=1)
    with pytest.raises(ValueError, match=r"layer 'encoder.layer.0.attention.self.query': .*\(64, 64\), got "
                                         r"torch.bool \(64, 65\)"):
        sparse.sparsify(model, "unstructured", masks={"encoder.layer.0.attention.self.query":
                                                      torch.ones(64, 65, dtype=torch.bool)}, **COMMON)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # failed calls changed nothing
