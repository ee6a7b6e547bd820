"""sparse.prune: masks, movement scores, the cubic schedule, gradual pruning with compaction, and attention-head
importance and pruning on a tiny BERT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse
from sparse import prune
from sparse.nn import BalancedSparseLinear, BlockSparseLinear, SparseLinear


def test_topk_mask_counts_and_ties():
    s = torch.tensor([[3.0, 1.0, 2.0, 1.0], [1.0, 5.0, 1.0, 0.0]])
    m = prune.topk_mask(s, 0.5)  # keep 4: 5, 3, 2 and the first of the tied 1s
    assert m.tolist() == [[True, True, True, False], [False, True, False, False]]
    assert prune.topk_mask(s, 0.0).all()
    torch.manual_seed(0)
    W = torch.randn(37, 53)
    for sp in (0.1, 0.5, 0.9, 0.99):
        m = prune.magnitude_mask(W, sp)
        n_keep = W.numel() - int(sp * W.numel() + 1e-9)
        assert int(m.sum()) == n_keep
        assert W.abs()[m].min() >= W.abs()[~m].max()  # the largest magnitudes are kept
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune.magnitude_mask(W, 1.0)


def test_global_magnitude_masks_use_one_threshold():
    torch.manual_seed(1)
    weights = {"a": torch.randn(16, 32), "b": 3 * torch.randn(8, 8), "c": 0.1 * torch.randn(4, 64)}
    masks = prune.global_magnitude_masks(weights, 0.6)
    kept = torch.cat([w.abs()[masks[n]] for n, w in weights.items()])
    dropped = torch.cat([w.abs()[~masks[n]] for n, w in weights.items()])
    total = sum(w.numel() for w in weights.values())
    assert kept.numel() == total - int(0.6 * total) and kept.min() >= dropped.max()
    # Layers end at different sparsities: the large-valued layer keeps more.
    assert masks["b"].float().mean() > masks["a"].float().mean() > masks["c"].float().mean()
    with pytest.raises(ValueError, match="weights is empty"):
        prune.global_magnitude_masks({}, 0.5)


@pytest.mark.parametrize("block", [16, (8, 32), (8, 1), (32, 1), (1, 4)])  # square, rectangular, vectors
def test_block_mask_matches_the_format(block):
    torch.manual_seed(2)
    W = torch.randn(72, 100)  # ragged edge blocks
    m = prune.block_mask(W, block, 0.6)
    w = sparse.BlockSparseWeight.from_dense(W, block, sparsity=0.6)
    assert torch.equal(m, w.to_dense() != 0)
    assert torch.equal(sparse.BlockSparseWeight.from_dense(W, block, mask=m).to_dense(), w.to_dense())


def test_block_mask_l1_versus_l2():
    W = torch.zeros(2, 4)
    W[0, :2] = torch.tensor([1.0, 1.0])  # block 0: L1 2, L2^2 2
    W[1, 2:] = torch.tensor([1.5, 0.0])  # block 1: L1 1.5, L2^2 2.25
    assert prune.block_mask(W, (2, 2), 0.5, norm="l1")[:, :2].all()
    assert prune.block_mask(W, (2, 2), 0.5, norm="l2")[:, 2:].all()
    with pytest.raises(ValueError, match="norm must be"):
        prune.block_mask(W, 2, 0.5, norm="linf")
    with pytest.raises(ValueError, match="larger than the matrix"):
        prune.block_mask(W, 4, 0.5)


def test_balanced_mask_and_scores():
    torch.manual_seed(3)
    W = torch.randn(24, 70)
    m = prune.balanced_mask(W, 16, 4)
    assert torch.equal(m, sparse.BalancedSparseWeight.from_dense(W, 16, 4).mask())
    counts = F.pad(m, (0, 80 - 70)).reshape(24, 5, 16).sum(-1)
    assert (counts == 4).all()
    scores = torch.randn(24, 70)
    ms = prune.balanced_mask(W, 16, 4, scores=scores)
    for b in range(5):
        cols = slice(16 * b, min(70, 16 * (b + 1)))
        kept, dropped = scores[:, cols][ms[:, cols]].reshape(24, 4), scores[:, cols].masked_fill(ms[:, cols], -1e9)
        assert (kept.min(1).values >= dropped.max(1).values).all()


def test_movement_scores():
    W = torch.tensor([1.0, -1.0, 1.0, 0.5])
    g = torch.tensor([-1.0, -1.0, 1.0, 0.0])  # SGD moves w away from 0, toward 0, toward 0, not at all
    s = prune.movement_scores(W, g)
    assert s.tolist() == [1.0, -1.0, -1.0, -0.0]
    with pytest.raises(ValueError, match="same shape"):
        prune.movement_scores(W, g[:3])


def test_cubic_sparsity():
    f = lambda t: prune.cubic_sparsity(t, 0.0, 0.9, 10, 110)  # noqa: E731
    assert f(0) == 0.0 and f(10) == 0.0 and f(110) == 0.9 and f(500) == 0.9
    assert f(60) == pytest.approx(0.9 + (0.0 - 0.9) * 0.5 ** 3)
    values = [f(t) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="end must be > start"):
        prune.cubic_sparsity(0, 0.0, 0.5, 10, 10)


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize(
    "pattern,method", [("block", "magnitude"), ("balanced", "movement"), ("unstructured", "magnitude")]
)
def test_gradual_pruner_reaches_the_schedule_and_compacts(pattern, method):
    torch.manual_seed(4)
    model = mlp()
    pruner = prune.GradualPruner(model, 0.75, end_step=20, frequency=5, pattern=pattern, block=16, bank=16,
                                 method=method, exclude="4")
    assert sorted(pruner.layers) == ["0", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = []
    for step in range(25):
        opt.zero_grad()
        x = torch.randn(16, 32)
        F.mse_loss(model(x), x[:, :4]).backward()
        opt.step()
        pruner.step()
        seen.append(pruner.sparsity)
        for n, m in pruner.layers.items():
            assert not m.weight[~pruner.masks[n]].any()  # pruned weights stay zero despite the momentum
    assert seen[3] == 0.0 and seen[4] == pytest.approx(prune.cubic_sparsity(5, 0, 0.75, 0, 20))
    assert seen[-1] == 0.75 and all(b >= a for a, b in zip(seen, seen[1:]))
    for n, m in pruner.masks.items():
        assert abs(m.float().mean().item() - 0.25) < 1e-6
    dense = copy.deepcopy(model)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    report = pruner.compact(model, skip_if_slower=False, sample_tokens=0)
    assert [r.name for r in report.converted] == ["0", "2"]
    assert {r.pattern for r in report.converted} == {pattern}
    cls = BalancedSparseLinear if pattern == "balanced" else BlockSparseLinear
    assert isinstance(model[0], cls) and isinstance(model[2], cls) and type(model[4]) is nn.Linear
    for n in ("0", "2"):
        assert torch.equal(model.get_submodule(n).weight_format.to_dense(), dense.get_submodule(n).weight)
    if pattern == "unstructured":  # 1x1 blocks storing exactly the masked-in weights
        for n in ("0", "2"):
            m = model.get_submodule(n)
            assert m.block == (1, 1) and m.values.shape[0] == int(masks[n].sum())
            stored = torch.zeros_like(masks[n])
            counts = (m.row_offsets[1:] - m.row_offsets[:-1]).long()
            stored[torch.repeat_interleave(torch.arange(m.out_features), counts), m.col_indices.long()] = True
            assert torch.equal(stored, masks[n]), n
    x = torch.randn(7, 32)
    torch.testing.assert_close(model(x), dense(x))


def test_gradual_pruner_global_scope_and_errors():
    torch.manual_seed(5)
    model = mlp()
    pruner = prune.GradualPruner(model, 0.5, end_step=1, frequency=1, scope="global")
    pruner.step()
    total = sum(m.numel() for m in pruner.masks.values())
    assert sum(int(m.sum()) for m in pruner.masks.values()) == total - total // 2
    # one threshold across layers: each layer at its own sparsity, compacted into exactly its mask
    kept = {n: int(m.sum()) for n, m in pruner.masks.items()}
    assert len({round(kept[n] / pruner.masks[n].numel(), 3) for n in kept}) > 1, kept
    dense = copy.deepcopy(model)
    report = pruner.compact(model, skip_if_slower=False, sample_tokens=0)
    assert [r.name for r in report.converted] == ["0", "2", "4"] and {r.pattern for r in report.converted} == {
        "unstructured"}
    x = torch.randn(6, 32)
    for n in ("0", "2", "4"):
        m = model.get_submodule(n)
        assert isinstance(m, BlockSparseLinear) and m.block == (1, 1) and m.values.shape[0] == kept[n], n
        assert torch.equal(m.weight.to_dense(), dense.get_submodule(n).weight)
    torch.testing.assert_close(model(x), dense(x))
    model = mlp()
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        prune.GradualPruner(model, 0.5, end_step=10, scope="global", pattern="block")
    with pytest.raises(ValueError, match="pattern must be one of"):
        prune.GradualPruner(model, 0.5, end_step=10, pattern="2:4")
    with pytest.raises(ValueError, match="end must be > start"):
        prune.GradualPruner(model, 0.5, end_step=0)
    with pytest.raises(ValueError, match="include pattern 'x' matches no Linear layer"):
        prune.GradualPruner(model, 0.5, end_step=10, include="x")
    block_pruner = prune.GradualPruner(model, 0.5, end_step=1, pattern="block", block=4)
    with pytest.raises(ValueError, match="compact\\(model\\) needs the model this pruner was built on"):
        block_pruner.compact(mlp())


transformers = pytest.importorskip("transformers")


def tiny_classifier():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (4, 10), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def gate_heads_by_zeroing(model, heads):
    """Reference for head removal: zero the value rows of the heads (their context is then 0, so the output
    projection gets nothing from them), leaving every shape as it was."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, hs in heads.items():
            att = ref.bert.encoder.layer[layer].attention.self
            for h in hs:
                rows = slice(h * att.attention_head_size, (h + 1) * att.attention_head_size)
                att.value.weight[rows] = 0
                att.value.bias[rows] = 0
    return ref


def test_prune_heads_shrinks_projections_and_matches_zeroed_heads():
    torch.manual_seed(6)
    model = tiny_classifier()
    ref = gate_heads_by_zeroing(model, {0: [1, 3], 1: [0]})
    done = prune.prune_heads(model, {0: [1, 3], 1: [0]})
    assert done == {0: [1, 3], 1: [0]}
    att0 = model.bert.encoder.layer[0].attention
    assert att0.self.query.weight.shape == (32, 64) and att0.self.num_attention_heads == 2
    assert att0.output.dense.weight.shape == (64, 32)
    assert model.bert.encoder.layer[1].attention.self.value.weight.shape == (48, 64)
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    # Heads keep their original numbers: pruning head 2 of layer 0 now removes the third original head.
    prune.prune_heads(model, {0: [2, 1]})
    assert model.bert.encoder.layer[0].attention.self.pruned_heads == {1, 2, 3}
    assert prune.recorded_pruned_heads(model) == {"0": [1, 2, 3], "1": [0]}
    with pytest.raises(ValueError, match="cannot prune every head of layer 0"):
        prune.prune_heads(model, {0: [0]})
    with pytest.raises(ValueError, match="layer 1 has heads 0..3, got \\[7\\]"):
        prune.prune_heads(model, {1: [7]})


def test_head_importance_and_fraction_pruning(tmp_path):
    torch.manual_seed(7)
    model = tiny_classifier()
    imp = prune.head_importance(model, batches())
    assert imp.shape == (2, 4) and torch.isfinite(imp).all() and (imp >= 0).all()
    assert torch.allclose(imp.norm(dim=1), torch.ones(2))
    # The score is |dL/dgate|; check one entry against a finite difference of the loss in the gate.
    m64 = copy.deepcopy(model).double()
    raw = prune.head_importance(m64, batches(1), normalize=False)
    att = m64.bert.encoder.layer[1].attention
    batch = batches(1)[0]

    def loss_with_gate(g):
        gate = torch.ones(4, dtype=torch.float64)
        gate[2] = g
        h = att.output.dense.register_forward_pre_hook(lambda m, a: (a[0] * gate.to(a[0].dtype).repeat_interleave(16),))
        try:
            with torch.no_grad():
                return m64(**batch).loss.item()
        finally:
            h.remove()

    fd = (loss_with_gate(1 + 1e-4) - loss_with_gate(1 - 1e-4)) / 2e-4
    assert raw[1, 2].item() == pytest.approx(abs(fd), rel=1e-3)

    done = prune.prune_heads(model, 0.5, importance=imp)
    assert sum(len(v) for v in done.values()) == 4 and all(len(v) < 4 for v in done.values())
    lowest = sorted((imp[layer, h].item(), layer, h) for layer in range(2) for h in range(4))
    assert all(h in done.get(layer, []) for _, layer, h in lowest[:2])  # the two least important heads go first
    after = prune.head_importance(model, batches(1))
    assert all(torch.isnan(after[layer, h]) for layer, hs in done.items() for h in hs)
    with pytest.raises(ValueError, match="needs importance="):
        prune.prune_heads(model, 0.5)

    # Pruned heads + sparse layers survive save/load onto a fresh dense model.
    sparse.sparsify(model, "balanced", keep=4, bank=16, skip_if_slower=False, sample_tokens=0, fuse_activations=True)
    with pytest.raises(TypeError, match="prune heads before sparsify"):
        prune.prune_heads(model, {0: [0]})
    sparse.save(model, tmp_path)
    loaded = sparse.load(tiny_classifier(), tmp_path)
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query, SparseLinear)


def test_head_pruning_needs_bert_style_attention():
    with pytest.raises(ValueError, match="no BERT-style attention"):
        prune.prune_heads(mlp(), {0: [0]})
    with pytest.raises(ValueError, match="no .loss"):
        model = tiny_classifier()
        prune.head_importance(model, [{"input_ids": torch.randint(0, 100, (2, 5))}])


def test_gradual_pruner_on_gpt2_conv1d():
    torch.manual_seed(8)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=1, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    pruner = prune.GradualPruner(model, 0.5, end_step=2, frequency=1, pattern="block", block=16, method="movement")
    assert pruner.skipped == {"lm_head": "weight is tied to transformer.wte.weight"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        pruner.step()
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.shape == (64, 256) and pruner.masks["transformer.h.0.mlp.c_fc"].shape == (256, 64)
    assert not c_fc.weight.t()[~pruner.masks["transformer.h.0.mlp.c_fc"]].any()
    model.eval()
    dense = copy.deepcopy(model)
    report = pruner.compact(model, skip_if_slower=False, sample_tokens=0)
    assert len(report.converted) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits)
