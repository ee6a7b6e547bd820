"""INT8 block-sparse layers (sparse.quant): the op on every CPU code path against the float64 reference of the same
integers (sparse.reference.int8_linear), the weight quantization, the defined results for bad values, the module
(bf16, threads, torch.compile, state dicts), sparsify(quantize="int8") on a tiny BERT with save/load, calibration,
and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse
from sparse import reference
from sparse.quant import QuantizedBlockSparseLinear, QuantizedBlockSparseWeight, activation_qmax
from tests import _reliab as R
from tests.helpers import KERNEL_FLOOR, assert_close_to_ref, make_bsr

OP = torch.ops.sparsekern.bsr_linear_int8


def _levels():
    """conftest's levels plus avxvnni (AVX2 + AVX-VNNI, no AVX-512) after avx2: a level only the int8 kernel tells
    apart, so only this file runs it."""
    levels = R.isa_levels()
    return levels[:2] + ["avxvnni"] + levels[2:] if "avx2" in levels else levels


def _int8_kernel(level):
    """The int8 kernel the `level` cap must select on this CPU (csrc/cpu/bsr_int8.cpp int8_path)."""
    feats = R.require().cpu_features()
    if level == "avx512" and feats["avx512vnni"]:
        return "avx512vnni"
    if level in ("avx512", "avxvnni") and feats["avxvnni"]:
        return "avxvnni"
    return "portable" if level == "portable" else "avx2"


@pytest.fixture(params=_levels())
def isa(request):
    """Every int8 code path this machine (or its SPARSEKERN_ISA cap) can run, forced in turn; overrides conftest's
    `isa` to add avxvnni, which skips on a CPU without AVX-VNNI (or under SPARSEKERN_ISA=avx2)."""
    level = request.param
    if level == "avxvnni" and not R.require().cpu_features()["avxvnni"]:
        pytest.skip("no AVX-VNNI on this CPU (or hidden by SPARSEKERN_ISA): the avxvnni int8 kernel cannot run")
    with R.isa(level):
        assert R.require().int8_kernel() == _int8_kernel(level), (level, R.require().int8_kernel())
        yield level

# (out, in, block): divisible and ragged, square blocks of every vector width of the AVX-512 kernel (16..64
# outputs), thin ones, unstructured (1x1), vectors, and a block taller than the fast kernels take (80: portable).
CASES = [
    (96, 128, (32, 32)),
    (70, 75, (32, 32)),
    (50, 41, (16, 16)),
    (100, 90, (48, 16)),
    (130, 140, (64, 64)),
    (45, 39, (5, 7)),
    (70, 300, (1, 1)),
    (75, 40, (8, 1)),
    (37, 83, (1, 4)),
    (90, 50, (80, 8)),
]


def _x(T, n, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:
        return (torch.randn(T, n + 6, generator=g) * 2).to(dtype)[:, 3 : n + 3]
    return (torch.randn(T, n, generator=g) * 2).to(dtype)


def _run(x, qw, bias=None, act="none", clip=0.0):
    return OP(x, qw.qvalues, qw.w_scale, qw.w_sum, qw.row_offsets, qw.col_indices, qw.shape[0], qw.block[1], bias,
              act, clip)


def _dense_same_integers(x, qw, bias, act, qmax, clip=0.0):
    """Dense torch on the same quantized operands, in float32 (rounded to x's dtype): the error yardstick."""
    q, s = reference.quantize_activations(x, qmax, clip)
    y = (q.float() * s[:, None]) @ qw.to_dense().t()
    if bias is not None:
        y = y + bias.float()
    return reference.activation(y, act).to(x.dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_op_matches_reference(isa, dtype, case):
    out, inn, block = case
    w = make_bsr(out, inn, block, sparsity=0.4, seed=out + inn)
    qw = QuantizedBlockSparseWeight.from_float(w)
    qmax = activation_qmax()
    assert qmax == (63 if R.require().int8_kernel() == "avx2" else 127)
    for i, T in enumerate((1, 7, 13, 40)):
        act = ("none", "gelu", "relu", "silu")[i]
        x = _x(T, inn, dtype, seed=i, strided=i == 2)
        bias = torch.randn(out, generator=torch.Generator().manual_seed(i)).to(dtype) if i % 2 else None
        ours = _run(x, qw, bias, act)
        ref = reference.int8_linear(x, qw, bias, act, qmax)
        dense = _dense_same_integers(x, qw, bias, act, qmax)
        assert_close_to_ref(ours, ref, dense, f"{isa} {dtype} T={T} {act}", k=inn, floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_8bit_kernels_agree_bitwise(dtype):
    """The kernels with 8-bit activations (portable, AVX-VNNI, AVX-512 VNNI) quantize alike, sum the same integers
    exactly in int32 and share the output stage's float operations: for the activations computed without
    approximation (none, relu) their outputs are bitwise equal, whatever the block shape or T."""
    kernels = {_int8_kernel(lv): lv for lv in ("portable", "avxvnni", "avx512") if lv in _levels()}
    kernels.pop("avx2", None)  # 7-bit: other integers
    if len(kernels) < 2:
        pytest.skip(f"only {list(kernels)} of the 8-bit int8 kernels run on this CPU (or under its SPARSEKERN_ISA cap)")
    for out, inn, block in CASES:
        qw = QuantizedBlockSparseWeight.from_float(make_bsr(out, inn, block, sparsity=0.4, seed=out + inn))
        for i, T in enumerate((1, 5, 16, 29)):
            x = _x(T, inn, dtype, seed=10 + i, strided=i == 1)
            bias = torch.randn(out, generator=torch.Generator().manual_seed(i)).to(dtype) if i % 2 else None
            act = ("none", "relu")[i % 2]
            runs = {}
            for name, lv in kernels.items():
                with R.isa(lv):
                    runs[name] = _run(x, qw, bias, act)
            first = next(iter(runs))
            for name, y in runs.items():
                assert torch.equal(y, runs[first]), f"{name} != {first}: {out}x{inn} block {block} T={T} {act}"


def test_set_isa_selects_the_int8_kernel():
    """avx2 hides AVX-VNNI (vpmaddubsw, 7-bit activations, as on a Zen 3); avxvnni keeps it under an AVX2 cap; a
    CPU (or SPARSEKERN_ISA cap) without AVX-VNNI refuses avxvnni with an error that names it."""
    C = R.require()
    if "avx2" not in R.isa_levels():
        pytest.skip("no AVX2 on this CPU (or under its SPARSEKERN_ISA cap)")
    with R.isa("avx2"):
        assert (C.get_isa(), C.int8_kernel(), activation_qmax()) == ("avx2", "avx2", 63)
    if C.cpu_features()["avxvnni"]:
        with R.isa("avxvnni"):
            assert (C.get_isa(), C.int8_kernel(), activation_qmax()) == ("avx2", "avxvnni", 127)
    else:
        before = C.get_isa()
        with pytest.raises(ValueError, match=r"isa 'avxvnni' is not supported by this CPU \(no AVX-VNNI"):
            C.set_isa("avxvnni")
        assert C.get_isa() == before
    with pytest.raises(ValueError, match="'avxvnni'"):  # the list of levels names it
        C.set_isa("avx-vnni")


def test_static_clip_saturates(isa):
    w = make_bsr(64, 96, 32, sparsity=0.5, seed=3)
    qw = QuantizedBlockSparseWeight.from_float(w)
    qmax = activation_qmax()
    x = _x(9, 96, torch.float32, seed=4)
    x[2, 5] = 50.0  # beyond the clip: saturates to +clip
    x[3, 7] = float("inf")  # saturates too, with a static clip
    ours = _run(x, qw, clip=1.5)
    ref = reference.int8_linear(x, qw, None, "none", qmax, clip=1.5)
    assert torch.isfinite(ours).all()
    assert_close_to_ref(ours, ref, _dense_same_integers(x, qw, None, "none", qmax, 1.5), "static clip", k=96,
                        floor=KERNEL_FLOOR)
    # The clip is what a value beyond it contributes: x[2, 5] = 50 acts as 1.5.
    x2 = x.clone()
    x2[2, 5], x2[3, 7] = 1.5, 1.5
    torch.testing.assert_close(ours, _run(x2, qw, clip=1.5), rtol=0, atol=0)


def test_non_finite_and_zero_tokens(isa):
    w = make_bsr(48, 64, 16, sparsity=0.5, seed=5)
    qw = QuantizedBlockSparseWeight.from_float(w)
    bias = torch.randn(48)
    x = _x(5, 64, torch.float32, seed=6)
    x[1, 3] = float("nan")
    x[2, 9] = float("-inf")
    x[3] = 0.0
    y = _run(x, qw, bias, "gelu")
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), "a token with NaN / Inf gives NaN outputs"
    torch.testing.assert_close(y[3], F.gelu(bias), rtol=1e-5, atol=1e-6)  # act(bias), to float32 rounding
    torch.testing.assert_close(_run(x, qw, bias)[3], bias, rtol=0, atol=0)  # exactly the bias
    for t in (0, 4):  # the other tokens are untouched
        torch.testing.assert_close(y[t:t + 1], _run(x[t:t + 1], qw, bias, "gelu"), rtol=0, atol=0)
    # Static clip: NaN still gives NaN; Inf saturates.
    ys = _run(x, qw, bias, "none", clip=2.0)
    assert torch.isnan(ys[1]).all() and torch.isfinite(ys[2]).all()


def test_weight_quantization():
    torch.manual_seed(0)
    W = torch.randn(70, 75)
    W[5] = 0.0  # an all-zero row: scale 0, integers 0
    w = sparse.BlockSparseWeight.from_dense(W, (16, 8), sparsity=0.3)
    qw = QuantizedBlockSparseWeight.from_float(w)
    dense = w.to_dense()
    scale = dense.abs().amax(dim=1) / 127
    torch.testing.assert_close(qw.w_scale, scale)
    assert qw.w_scale[5] == 0
    # Round to nearest: every dequantized weight within half a step of the float one.
    err = (qw.to_dense() - dense).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    ints = torch.round(dense / torch.where(scale > 0, scale, torch.ones(()))[:, None])
    torch.testing.assert_close(qw.w_sum, ints.sum(dim=1).to(torch.int32))
    assert int(qw.qvalues.abs().max()) == 127 and int(qw.qvalues.min()) >= -127
    assert qw.nbytes < w.nbytes / 3  # int8 values: about a quarter of the float32 bytes
    # The all-zero row gives exactly the bias.
    b = torch.randn(70)
    y = _run(torch.randn(3, 75), qw, b)
    torch.testing.assert_close(y[:, 5], b[5].expand(3), rtol=0, atol=0)


def test_weight_bad_values():
    W = torch.randn(40, 64)
    W[17, 3] = float("nan")
    with pytest.raises(ValueError, match="output row 17"):
        QuantizedBlockSparseWeight.from_float(sparse.BlockSparseWeight.from_dense(W, 8, sparsity=0.0))
    W[17, 3] = float("inf")
    with pytest.raises(ValueError, match="output row 17"):
        QuantizedBlockSparseWeight.from_float(sparse.BlockSparseWeight.from_dense(W, 8, sparsity=0.0))
    qw = QuantizedBlockSparseWeight.from_float(make_bsr(40, 64, 8, sparsity=0.5, seed=1))
    bad = qw.qvalues.clone()
    bad.view(-1)[0] = -128
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        QuantizedBlockSparseWeight(bad, qw.w_scale, qw.w_sum, qw.row_offsets, qw.col_indices, qw.shape, qw.block)
    with pytest.raises(ValueError, match="w_scale must have dtype torch.float32"):
        QuantizedBlockSparseWeight(qw.qvalues, qw.w_scale.double(), qw.w_sum, qw.row_offsets, qw.col_indices,
                                   qw.shape, qw.block)


def test_op_bad_input():
    qw = QuantizedBlockSparseWeight.from_float(make_bsr(32, 64, 16, sparsity=0.5, seed=2))
    x = torch.randn(4, 64)
    args = [qw.qvalues, qw.w_scale, qw.w_sum, qw.row_offsets, qw.col_indices, 32, 16]
    with pytest.raises(ValueError, match="w_scale must be float32, got Double"):
        OP(x, args[0], qw.w_scale.double(), *args[2:])
    with pytest.raises(ValueError, match="w_sum must be int32"):
        OP(x, args[0], args[1], qw.w_sum.long(), *args[3:])
    with pytest.raises(ValueError, match="qvalues must be int8"):
        OP(x, qw.qvalues.float(), *args[1:])
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        OP(x.half(), *args)
    with pytest.raises(RuntimeError, match="x must have|64|features|groups of 4"):
        OP(x, *args[:-1], 12)  # block_cols that does not match qvalues
    with pytest.raises(RuntimeError, match="clip must be finite and >= 0"):
        OP(x, *args, None, "none", -1.0)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        OP(x, *args, None, "tanh")
    bad_ci = qw.col_indices.clone()
    bad_ci[0] = 99
    with pytest.raises(RuntimeError, match=r"col_indices\[0\] = 99 is out of range"):
        OP(x, qw.qvalues, qw.w_scale, qw.w_sum, qw.row_offsets, bad_ci, 32, 16)


def test_module(isa):
    lin = sparse.BlockSparseLinear(96, 80, block=16, sparsity=0.5, activation="gelu")
    q = lin.quantize("int8")
    assert isinstance(q, QuantizedBlockSparseLinear) and q.activation == "gelu"
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        y = q(x)
        yf = lin(x)
    assert y.shape == (2, 5, 80)
    assert F.cosine_similarity(y.flatten(), yf.flatten(), dim=0) > 0.999
    qmax = activation_qmax()
    ref = reference.int8_linear(x.reshape(10, 96), q.weight_format, lin.bias.detach(), "gelu", qmax)
    torch.testing.assert_close(y.reshape(10, 80).double(), ref, rtol=1e-5, atol=1e-5)
    # bf16 inputs give bf16 outputs (the float32 bias is cast).
    with torch.no_grad():
        yb = q(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=0.05, atol=0.05)
    # Inference only.
    with pytest.raises(RuntimeError, match="inference only"):
        q(x.requires_grad_())
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        q(torch.randn(3, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match="end in 96 features"):
        q(torch.randn(3, 95))
    with pytest.raises(ValueError, match="clip must be a finite float > 0"):
        q.set_clip(0.0)


@pytest.mark.parametrize("T", [37, 200, 301])  # 37: block rows split; 200, 301: tokens (a small weight, >= 64 each)
def test_threads_give_identical_results(isa, T):
    q = sparse.BlockSparseLinear(256, 192, block=32, sparsity=0.6).quantize()
    x = torch.randn(T, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one = q(x)
        torch.set_num_threads(max(2, threads))
        with torch.no_grad():
            many = q(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    ref = reference.int8_linear(x, q.weight_format, q.bias, q.activation, activation_qmax())
    assert_close_to_ref(many, ref, ref.float(), f"{isa} T={T} split", k=256, floor=KERNEL_FLOOR)


def test_state_dict_round_trip():
    a = sparse.BlockSparseLinear(64, 48, block=16, sparsity=0.5).quantize()
    a.set_clip(3.0)
    b = sparse.BlockSparseLinear(64, 48, block=16, sparsity=0.25).quantize()  # another pattern, same shape
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = sparse.BlockSparseLinear(64, 48, block=8, sparsity=0.5).quantize()
    with pytest.raises(RuntimeError, match="pattern_info"):
        c.load_state_dict(a.state_dict())


def test_compile():
    model = nn.Sequential(sparse.BlockSparseLinear(64, 96, block=16, sparsity=0.5, activation="relu").quantize(),
                          nn.LayerNorm(96), sparse.BlockSparseLinear(96, 32, block=16, sparsity=0.5).quantize())
    x = torch.randn(9, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("pattern,kw", [("block", {"block": 16}), ("unstructured", {})])
def test_sparsify_quantize_and_save_load(tmp_path, pattern, kw):
    float_model = tiny_bert()
    sparse.sparsify(float_model, pattern, 0.5, skip_if_slower=False, sample_tokens=0, fuse_activations=True, **kw)
    model = tiny_bert()
    rep = sparse.sparsify(model, pattern, 0.5, skip_if_slower=False, sample_tokens=0, fuse_activations=True,
                          quantize="int8", **kw)
    q = [m for m in model.modules() if isinstance(m, QuantizedBlockSparseLinear)]
    assert len(q) == len(rep.converted) == 13  # 2 x 6 encoder Linears and the pooler
    assert all(r.quantized == "int8" for r in rep.converted)
    assert rep.settings["quantize"] == "int8" and "int8" in rep.to_markdown()
    assert sum(r.bytes_after for r in rep.converted) == sum(m.nbytes for m in q)
    with torch.no_grad():
        yf = float_model(IDS).last_hidden_state
        yq = model(IDS).last_hidden_state
    cos = F.cosine_similarity(yf.flatten(1), yq.flatten(1), dim=1)
    assert (cos > 0.99).all(), cos
    sparse.save(model, tmp_path)
    loaded = sparse.load(tiny_bert(seed=1), tmp_path)
    assert sum(isinstance(m, QuantizedBlockSparseLinear) for m in loaded.modules()) == 13
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).last_hidden_state, yq, rtol=0, atol=0)


def test_sparsify_quantize_fused_qkv():
    model = tiny_bert()
    rep = sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0, fuse_qkv=True,
                          quantize="int8")
    assert any(f.applied for f in rep.qkv_fusions)
    fused = [m for n, m in model.named_modules() if n.endswith("fused_qkv")]
    assert fused and all(isinstance(m, QuantizedBlockSparseLinear) for m in fused)
    with torch.no_grad():
        model(IDS)


def test_sparsify_quantize_bad_input():
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        sparse.sparsify(tiny_bert(), "block", 0.5, skip_if_slower=False, sample_tokens=0, quantize="int4")
    with pytest.raises(ValueError, match="no BlockSparseLinear layer"):
        sparse.quant.quantize(tiny_bert())


def test_calibrate():
    model = tiny_bert()
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    float_model = copy.deepcopy(model)
    sparse.quant.quantize(model)
    batches = [{"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(s))}
               for s in range(3)]
    clips = sparse.quant.calibrate(model, batches, percentile=99.9)
    assert len(clips) == 13 and all(c > 0 for c in clips.values())
    q = [m for m in model.modules() if isinstance(m, QuantizedBlockSparseLinear)]
    assert all(m._clip == pytest.approx(clips[n], rel=1e-6)
               for n, m in model.named_modules() if isinstance(m, QuantizedBlockSparseLinear))
    assert all(float(m.clip) > 0 for m in q)
    with torch.no_grad():
        cos = F.cosine_similarity(float_model(IDS).last_hidden_state.flatten(1),
                                  model(IDS).last_hidden_state.flatten(1), dim=1)
    assert (cos > 0.98).all(), cos
    with pytest.raises(ValueError, match="percentile must be in"):
        sparse.quant.calibrate(model, batches, percentile=0)
