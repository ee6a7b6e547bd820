"""Attention implementations raced per model (sparse.evaluate.pick_attention): transformers' sdpa and eager, and
torch SDPA with its math or flash CPU backend forced inside the model's forward."""

import pytest
import torch

from sparse import evaluate

from .helpers import tiny_bert_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("tiny-bert")))


def _inputs():
    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0  # padding: the mask reaches every implementation
    return ids, mask


def _ops(model, ids, mask):
    from torch.profiler import profile

    with torch.inference_mode(), profile() as prof:
        model(input_ids=ids, attention_mask=mask)
    return {e.key for e in prof.key_averages()}


def test_pick_attention_races_the_sdpa_backends_and_keeps_the_outputs(bert_dir):
    ids, mask = _inputs()
    default = transformers.BertModel.from_pretrained(bert_dir).eval()
    with torch.inference_mode():
        ref = default(input_ids=ids, attention_mask=mask).last_hidden_state
    model = transformers.BertModel.from_pretrained(bert_dir).eval()
    assert evaluate.attention_candidates(model) == ("sdpa", "eager", "sdpa_math", "sdpa_flash", "sparsekern")
    with torch.inference_mode():
        winner, secs = evaluate.pick_attention(model, lambda: model(input_ids=ids, attention_mask=mask))
    assert winner in evaluate.ATTENTION_IMPLEMENTATIONS and winner == min(secs, key=secs.get)
    assert set(secs) == set(evaluate.ATTENTION_IMPLEMENTATIONS) and all(s > 0 for s in secs.values())
    assert evaluate.attention_of(model) == winner
    kernels = {"sdpa_math": "aten::_scaled_dot_product_attention_math",
               "sdpa_flash": "aten::_scaled_dot_product_flash_attention_for_cpu", "sparsekern": "sparsekern::attention"}
    for impl in evaluate.ATTENTION_IMPLEMENTATIONS:
        assert evaluate.set_attention(model, impl) and evaluate.attention_of(model) == impl
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=impl)
        if impl in kernels:  # the forced backend is the one that ran, and only it
            ops = _ops(model, ids, mask)
            assert kernels[impl] in ops and not (set(kernels.values()) - {kernels[impl]}) & ops, (impl, ops)


def test_a_backend_that_cannot_run_the_case_is_left_out(bert_dir):
    """A training step with attention dropout: SDPA's CPU flash kernel refuses it ("No available kernel")."""
    model = transformers.BertModel.from_pretrained(bert_dir).train()
    ids, mask = _inputs()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()

    winner, secs = evaluate.pick_attention(model, step)
    # ours hands a training step to transformers' SDPA function: it runs, as sdpa does
    assert set(secs) == {"sdpa", "eager", "sdpa_math", "sparsekern"} and winner == min(secs, key=secs.get)
    assert evaluate.attention_of(model) == winner


def test_models_without_transformers_attention_are_left_alone():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert evaluate.attention_candidates(m) == () and evaluate.attention_of(m) is None
    assert evaluate.set_attention(m, "sdpa_math") is False
    assert evaluate.pick_attention(m, lambda: m(torch.ones(1, 4))) == (None, {})

    class OwnAttention(torch.nn.Module):  # a transformers-like switch, but not transformers' attention functions
        def set_attn_implementation(self, impl):
            self.impl = impl

    own = OwnAttention()
    assert evaluate.attention_candidates(own) == ("sdpa", "eager")
    with pytest.raises(ValueError, match="cannot run 'sdpa_flash'"):
        evaluate.set_attention(own, "sdpa_flash")


@pytest.mark.slow  # Inductor compiles the model (~20 s)
@pytest.mark.parametrize("impl", ["sdpa_math", "sparsekern"])
def test_a_forced_backend_applies_inside_torch_compile(bert_dir, impl):
    ids, mask = _inputs()
    model = transformers.BertModel.from_pretrained(bert_dir).eval()
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    evaluate.set_attention(model, impl)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
