"""sparse.sparsify as a drop-in across Hugging Face architectures (tiny random configs): an encoder (BERT), a
decoder with ``generate()`` (GPT-2, Llama), an encoder-decoder with ``generate()`` (T5, whose feed-forward block
reads ``wo.weight.dtype``) and a vision encoder (ViT). Each sparsified model computes what the dense model with
the same pruned weights computes, and greedy generation gives the same tokens. Also the ``weight`` that sparse
modules answer for callers that read an ``nn.Linear``'s."""

import copy

import pytest
import torch
from torch import nn

import sparse
from sparse.nn import SparseLinear, SparseWeightView
from tests.helpers import assert_close_to_ref
from tests.test_patcher import masked_dense

transformers = pytest.importorskip("transformers")

IDS = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _t5():
    cfg = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    return transformers.ViTModel(cfg)


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _encode(model):
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _seq2seq_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, decoder_input_ids=IDS[:, :5]).logits


def _vision(model):
    with torch.no_grad():
        return model(pixel_values=PIXELS).last_hidden_state


def _generate(model):
    with torch.no_grad():
        return model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, num_beams=1)


ARCHS = {
    "bert (encoder)": (_bert, [_encode]),
    "gpt2 (decoder)": (_gpt2, [_logits, _generate]),
    "llama (decoder)": (_llama, [_logits, _generate]),
    "t5 (encoder-decoder)": (_t5, [_seq2seq_logits, _generate]),
    "vit (vision)": (_vit, [_vision]),
}


@pytest.mark.parametrize("pattern", ["block", "balanced"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparsified_architecture_matches_masked_dense(arch, pattern):
    build, runs = ARCHS[arch]
    torch.manual_seed(0)
    dense = build().eval()
    model = copy.deepcopy(dense)
    kw = dict(sparsity=0.5, block=16) if pattern == "block" else dict(sparsity=0.75, bank=16)
    report = sparse.sparsify(model, pattern, skip_if_slower=False, sample_tokens=0, **kw)
    converted = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert converted and len(converted) == len(report.converted), report.to_markdown()
    ref = masked_dense(dense, model)
    for run in runs:
        if run is _generate:
            assert torch.equal(run(model), run(ref)), f"{arch}: greedy generation differs from the masked dense model"
        else:
            assert_close_to_ref(run(model), run(copy.deepcopy(ref).double()), run(ref))


def test_weight_view_answers_like_a_linear_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m = sparse.BlockSparseLinear.from_linear(lin, block=16, sparsity=0.5)
    w = m.weight
    assert isinstance(w, SparseWeightView) and not isinstance(w, torch.Tensor)
    assert (w.dtype, w.device, w.shape, w.size(), w.size(0), w.size(-1)) == (
        torch.float32, torch.device("cpu"), torch.Size([48, 64]), torch.Size([48, 64]), 48, 64)
    assert (w.ndim, w.dim(), w.numel(), w.requires_grad, w.is_cuda) == (2, 2, 48 * 64, True, False)
    torch.testing.assert_close(w.to_dense(), m.weight_format.to_dense())
    assert w.to_dense() is not w.to_dense(), "the dense copy is built on demand, never kept"
    assert "weight" not in dict(m.named_parameters()) and "weight" not in m.state_dict()
    m.to(torch.float64)
    assert m.weight.dtype == torch.float64  # follows the module
    with pytest.raises(TypeError, match=r"weight of a sparse layer, which is not a tensor; use module\(x\)"):
        torch.nn.functional.linear(torch.randn(2, 64), m.weight)


# ---- layer dropping (sparse.prune.drop_layers) ----------------------------------------------------------------
def _fresh_with(model):
    """A model built from ``model``'s (updated) config, loaded with ``model``'s weights: proves the config and
    the kept layers agree (strict load) and gives an independent model to compare outputs with."""
    fresh = type(model)(copy.deepcopy(model.config)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


DROP = {  # arch -> (keep, the stacks it must find, a stack's expected kept indices)
    "bert (encoder)": (1, {"encoder.layer": [0]}),
    "gpt2 (decoder)": ([1], {"transformer.h": [1]}),
    "llama (decoder)": ([1], {"model.layers": [1]}),
    "t5 (encoder-decoder)": (1, {"encoder.block": [0], "decoder.block": [0]}),
    "vit (vision)": ([0], {"layers": [0]}),  # transformers 5: ViTModel.layers
}


@pytest.mark.parametrize("arch", list(DROP))
def test_drop_layers_keeps_a_consistent_shallower_model(arch):
    from sparse.prune import drop_layers

    build, runs = ARCHS[arch]
    keep, expected = DROP[arch]
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model)
    plan = drop_layers(model, keep)
    assert plan == expected
    fresh = _fresh_with(model)
    for name, idx in plan.items():
        stack = model.get_submodule(name)
        assert len(stack) == len(idx)
        for j, i in enumerate(idx):  # the kept layers are the original ones, in order, renumbered for the cache
            orig = original.get_submodule(name)[i]
            assert all(torch.equal(a, b) for a, b in zip(stack[j].state_dict().values(), orig.state_dict().values()))
            assert all(m.layer_idx == j for m in stack[j].modules() if isinstance(getattr(m, "layer_idx", None), int))
    for run in runs:
        if run is _generate:
            assert torch.equal(run(model), run(fresh))
        else:
            torch.testing.assert_close(run(model), run(fresh))
    # and the shallower model sparsifies like any other
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    for run in runs:
        run(model)


def test_teacher_hidden_states_match_each_kept_layer_to_the_last_layer_it_stands_for():
    from sparse.prune import every_other, teacher_hidden_states

    # hidden state 0 is the embeddings, i the output of layer i - 1: kept layer j replaces layers kept[j] up to
    # the next kept one, so its output stands for the full model's before that layer, the last one for its output
    assert teacher_hidden_states([0, 2, 4], 6) == [0, 2, 4, 6]
    assert teacher_hidden_states(every_other(6, 2), 6) == [0, 3, 6]
    assert teacher_hidden_states([0], 6) == [0, 6]
    assert teacher_hidden_states(list(range(4)), 4) == [0, 1, 2, 3, 4]  # nothing dropped: the identity
    with pytest.raises(ValueError, match=r"indices \[6\] are out of range \[0, 6\)"):
        teacher_hidden_states([0, 6], 6)
    with pytest.raises(ValueError, match="must be increasing and without repeats"):
        teacher_hidden_states([2, 0], 6)


def test_drop_layers_refuses_bad_keep():
    from sparse.prune import drop_layers, every_other

    assert every_other(12, 6) == [0, 2, 4, 6, 8, 10] and every_other(12, 12) == list(range(12))
    with pytest.raises(ValueError, match=r"keep must be an int in \[1, 2\]"):
        drop_layers(_bert(), 3)
    with pytest.raises(ValueError, match=r"indices \[5\] are out of range \[0, 2\)"):
        drop_layers(_bert(), [0, 5])
    with pytest.raises(ValueError, match="must be increasing and without repeats"):
        drop_layers(_bert(), [1, 0])
    with pytest.raises(ValueError, match=r"keep names \['decoder.layer'\], which are not layer stacks"):
        drop_layers(_bert(), {"decoder.layer": 1})
    with pytest.raises(ValueError, match="layer 0 holds the relative position bias"):
        drop_layers(_t5(), [1])
    with pytest.raises(ValueError, match="has no stack of Transformer layers"):
        drop_layers(nn.Sequential(nn.Linear(4, 4)), 1)
