"""INT8 balanced-sparse layers (sparse.quant): the op on every CPU code path against the float64 reference of the
same integers (sparse.reference.int8_linear), the weight quantization and its layout, the defined results for bad
values, the module (bf16, threads, torch.compile, state dicts), sparsify(pattern="balanced", quantize="int8") on a
tiny BERT with save/load, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse
from sparse import reference
from sparse.quant import QuantizedBalancedSparseLinear, QuantizedBalancedSparseWeight, activation_qmax
from tests.helpers import KERNEL_FLOOR, assert_close_to_ref

OP = torch.ops.sparsekern.balanced_linear_int8

# (out, in, bank, keep): the BERT-like bank 32 with keep 3 and 8; ragged last banks (75 = 2 x 32 + 11, 41, 45);
# banks of one window each (48, 64: the AVX-512 kernel's whole register, 4 AVX2 tables); a bank wider than a
# window (128: each row's entries per window vary, padded to the largest count); small banks several to a window
# (4: 2:4-like, 7); outputs that are not a multiple of 16 (the row groups' padding).
CASES = [
    (96, 128, 32, 3),
    (70, 75, 32, 8),
    (50, 41, 16, 2),
    (40, 110, 48, 5),
    (33, 192, 64, 9),
    (21, 300, 128, 10),
    (37, 84, 4, 2),
    (20, 45, 7, 3),
]


def _weight(out, inn, bank, keep, seed):
    g = torch.Generator().manual_seed(seed)
    return sparse.BalancedSparseWeight.from_dense(torch.randn(out, inn, generator=g), bank=bank, keep=keep)


def _x(T, n, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:
        return (torch.randn(T, n + 6, generator=g) * 2).to(dtype)[:, 3 : n + 3]
    return (torch.randn(T, n, generator=g) * 2).to(dtype)


def _run(x, qw, bias=None, act="none", clip=0.0):
    return OP(x, qw.qvalues, qw.indices, qw.w_scale, qw.w_sum, qw.shape[0], qw.window, bias, act, clip)


def _dense_same_integers(x, qw, bias, act, qmax, clip=0.0):
    """Dense torch on the same quantized operands, in float32 (rounded to x's dtype): the error yardstick."""
    q, s = reference.quantize_activations(x, qmax, clip)
    y = (q.float() * s[:, None]) @ qw.to_dense().t()
    if bias is not None:
        y = y + bias.float()
    return reference.activation(y, act).to(x.dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-bank{c[2]}-keep{c[3]}")
def test_op_matches_reference(isa, dtype, case):
    out, inn, bank, keep = case
    qw = QuantizedBalancedSparseWeight.from_float(_weight(out, inn, bank, keep, seed=out + inn))
    qmax = activation_qmax()
    assert qmax == (63 if isa == "avx2" else 127) or (isa == "avx512" and qmax == 63)
    for i, T in enumerate((1, 7, 13, 40)):  # T = 1, and token counts that leave every tile remainder
        act = ("none", "gelu", "relu", "silu")[i]
        x = _x(T, inn, dtype, seed=i, strided=i == 2)
        bias = torch.randn(out, generator=torch.Generator().manual_seed(i)).to(dtype) if i % 2 else None
        ours = _run(x, qw, bias, act)
        assert ours.dtype == dtype and ours.shape == (T, out)
        ref = reference.int8_linear(x, qw, bias, act, qmax)
        dense = _dense_same_integers(x, qw, bias, act, qmax)
        assert_close_to_ref(ours, ref, dense, f"{isa} {dtype} T={T} {act}", k=inn, floor=KERNEL_FLOOR)


@pytest.mark.skipif(os.environ.get("SPARSEKERN_NO_VBMI") == "1", reason="already the kernel without VBMI")
def test_avx512_without_vbmi():
    """The AVX-512 VNNI kernel of CPUs without VBMI (vpshufb tables instead of vpermb), as SPARSEKERN_NO_VBMI=1
    makes this CPU one: the op tests above on the avx512 path, in a child process (the variable is read once)."""
    c = sparse._ext.require()
    if c.best_isa() != "avx512" or not c.cpu_features()["avx512vnni"]:
        pytest.skip("no AVX-512 VNNI path on this CPU (or under SPARSEKERN_ISA)")
    env = {**os.environ, "SPARSEKERN_NO_VBMI": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "avx512 and (matches_reference or exact or clip or non_finite)"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_integer_sums_are_exact(isa):
    """No activation, a bias of 0 and scales of 1: the op returns the integer dot products themselves, exactly."""
    qw = QuantizedBalancedSparseWeight.from_float(_weight(40, 96, 32, 5, seed=1))
    qw.w_scale = torch.ones(40)
    qmax = activation_qmax()
    g = torch.Generator().manual_seed(2)
    xq = torch.randint(-qmax, qmax + 1, (9, 96), generator=g).float()
    xq[:, 0] = qmax  # so that each token's scale is exactly 1
    ours = _run(xq, qw)
    exact = xq.double() @ qw.int_dense().double().t()
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=0)


def test_empty_inputs():
    qw = QuantizedBalancedSparseWeight.from_float(_weight(20, 45, 7, 3, seed=8))
    y = _run(torch.randn(0, 45), qw)
    assert y.shape == (0, 20) and y.dtype == torch.float32
    q = sparse.BalancedSparseLinear(45, 20, bank=7, keep=3).quantize()
    with torch.no_grad():
        assert q(torch.randn(2, 0, 45, dtype=torch.bfloat16)).shape == (2, 0, 20)


def test_static_clip_saturates(isa):
    qw = QuantizedBalancedSparseWeight.from_float(_weight(64, 96, 32, 8, seed=3))
    qmax = activation_qmax()
    x = _x(9, 96, torch.float32, seed=4)
    x[2, 5] = 50.0  # beyond the clip: saturates to +clip
    x[3, 7] = float("inf")  # saturates too, with a static clip
    ours = _run(x, qw, clip=1.5)
    ref = reference.int8_linear(x, qw, None, "none", qmax, clip=1.5)
    assert torch.isfinite(ours).all()
    assert_close_to_ref(ours, ref, _dense_same_integers(x, qw, None, "none", qmax, 1.5), "static clip", k=96,
                        floor=KERNEL_FLOOR)
    x2 = x.clone()
    x2[2, 5], x2[3, 7] = 1.5, 1.5
    torch.testing.assert_close(ours, _run(x2, qw, clip=1.5), rtol=0, atol=0)


def test_non_finite_and_zero_tokens(isa):
    qw = QuantizedBalancedSparseWeight.from_float(_weight(48, 64, 16, 4, seed=5))
    bias = torch.randn(48)
    x = _x(5, 64, torch.float32, seed=6)
    x[1, 3] = float("nan")
    x[2, 9] = float("-inf")
    x[3] = 0.0
    y = _run(x, qw, bias, "gelu")
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), "a token with NaN / Inf gives NaN outputs"
    torch.testing.assert_close(_run(x, qw, bias)[3], bias, rtol=0, atol=0)  # exactly the bias
    for t in (0, 4):  # the other tokens are untouched
        torch.testing.assert_close(y[t:t + 1], _run(x[t:t + 1], qw, bias, "gelu"), rtol=0, atol=0)


def test_weight_quantization_and_layout():
    torch.manual_seed(0)
    W = torch.randn(70, 75)
    W[5] = 0.0  # an all-zero row: scale 0, integers 0
    w = sparse.BalancedSparseWeight.from_dense(W, bank=32, keep=8)
    qw = QuantizedBalancedSparseWeight.from_float(w)
    dense = w.to_dense()
    scale = dense.abs().amax(dim=1) / 127
    torch.testing.assert_close(qw.w_scale, scale)
    assert qw.w_scale[5] == 0
    err = (qw.to_dense() - dense).abs()  # round to nearest: within half a step, and zero where pruned
    assert (err <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    ints = torch.round(dense / torch.where(scale > 0, scale, torch.ones(()))[:, None])
    torch.testing.assert_close(qw.int_dense(), ints.long())
    torch.testing.assert_close(qw.w_sum, ints.sum(dim=1).to(torch.int32))
    assert int(qw.qvalues.abs().max()) == 127 and int(qw.qvalues.min()) >= -127
    # Layout: one bank per window of 32 columns, 8 entries = 2 groups of 4, rows in groups of 16.
    assert qw.window == 32 and tuple(qw.qvalues.shape) == (5, 3, 2, 16, 4) and qw.indices.shape == qw.qvalues.shape
    assert qw.nbytes < 0.6 * w.nbytes  # 2 bytes per entry instead of 5, and 70 rows padded to 80
    b = torch.randn(70)
    torch.testing.assert_close(_run(torch.randn(3, 75), qw, b)[:, 5], b[5].expand(3), rtol=0, atol=0)
    # Small banks share a window; a wide bank is cut into windows of 64, padded to the largest count.
    assert QuantizedBalancedSparseWeight.from_float(_weight(16, 64, 4, 2, 1)).qvalues.shape[1:3] == (2, 4)
    q128 = QuantizedBalancedSparseWeight.from_float(_weight(16, 256, 128, 10, 1))
    assert q128.window == 64 and q128.qvalues.shape[1] == 4


def test_weight_bad_values():
    W = torch.randn(40, 64)
    W[17, 3] = float("nan")
    with pytest.raises(ValueError, match="output row 17"):
        QuantizedBalancedSparseWeight.from_float(sparse.BalancedSparseWeight.from_dense(W, bank=16, keep=16))
    W[17, 3] = float("inf")
    with pytest.raises(ValueError, match="output row 17"):
        QuantizedBalancedSparseWeight.from_float(sparse.BalancedSparseWeight.from_dense(W, bank=16, keep=16))
    qw = QuantizedBalancedSparseWeight.from_float(_weight(40, 64, 16, 4, seed=1))
    parts = lambda **kw: {**dict(qvalues=qw.qvalues, indices=qw.indices, w_scale=qw.w_scale, w_sum=qw.w_sum,  # noqa
                                 shape=qw.shape, window=qw.window, bank=qw.bank, keep=qw.keep), **kw}
    bad = qw.qvalues.clone()
    bad.view(-1)[0] = -128
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        QuantizedBalancedSparseWeight(**parts(qvalues=bad))
    with pytest.raises(ValueError, match="w_scale must have dtype torch.float32, got torch.float64"):
        QuantizedBalancedSparseWeight(**parts(w_scale=qw.w_scale.double()))
    bad = qw.indices.clone()
    bad.view(-1)[5] = 32
    with pytest.raises(ValueError, match=r"indices.flatten\(\)\[5\] = 32 is out of range \[0, window=32\)"):
        QuantizedBalancedSparseWeight(**parts(indices=bad))
    with pytest.raises(ValueError, match=r"w_sum\[0\] = .* is not the sum of row 0's integers"):
        QuantizedBalancedSparseWeight(**parts(w_sum=qw.w_sum + 1))
    with pytest.raises(ValueError, match=r"qvalues must have shape \(3, 2, G, 16, 4\)"):
        QuantizedBalancedSparseWeight(**parts(qvalues=qw.qvalues[:2], indices=qw.indices[:2]))
    with pytest.raises(TypeError, match="BalancedSparseWeight"):
        QuantizedBalancedSparseWeight.from_float(W)


def test_op_bad_input():
    qw = QuantizedBalancedSparseWeight.from_float(_weight(32, 64, 32, 4, seed=2))
    x = torch.randn(4, 64)
    q, i, s, ws = qw.qvalues, qw.indices, qw.w_scale, qw.w_sum
    with pytest.raises(ValueError, match="w_scale must be float32, got Double"):
        OP(x, q, i, s.double(), ws, 32, 32)
    with pytest.raises(ValueError, match="w_sum must be int32, got Long"):
        OP(x, q, i, s, ws.long(), 32, 32)
    with pytest.raises(ValueError, match="qvalues must be int8, got Float"):
        OP(x, q.float(), i, s, ws, 32, 32)
    with pytest.raises(ValueError, match="indices must be uint8, got Short"):
        OP(x, q, i.short(), s, ws, 32, 32)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        OP(x.half(), q, i, s, ws, 32, 32)
    with pytest.raises(RuntimeError, match=r"qvalues must have shape \[ceil\(out / 16\) = 2, ceil\(in / window\) = 4"):
        OP(x, q, i, s, ws, 32, 16)  # a window that does not match the layout
    with pytest.raises(RuntimeError, match="qvalues must have shape"):
        OP(torch.randn(4, 100), q, i, s, ws, 32, 32)  # x with other features than the weight
    with pytest.raises(RuntimeError, match=r"window must be in \[1, 64\], got 65"):
        OP(x, q, i, s, ws, 32, 65)
    with pytest.raises(RuntimeError, match=r"w_scale must be a contiguous \[32\] tensor"):
        OP(x, q, i, s[:16], ws, 32, 32)
    with pytest.raises(RuntimeError, match="indices must have the shape of qvalues"):
        OP(x, q, i[:, :1], s, ws, 32, 32)
    with pytest.raises(RuntimeError, match="clip must be finite and >= 0"):
        OP(x, q, i, s, ws, 32, 32, None, "none", -1.0)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        OP(x, q, i, s, ws, 32, 32, None, "tanh")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[32\]"):
        OP(x, q, i, s, ws, 32, 32, torch.zeros(31))
    bad = i.clone()
    bad.view(-1)[7] = 40
    with pytest.raises(RuntimeError, match=r"indices.flatten\(\)\[7\] = 40 is out of range \[0, window=32\)"):
        OP(x, q, bad, s, ws, 32, 32)


def test_module(isa):
    lin = sparse.BalancedSparseLinear(96, 80, bank=32, keep=8, activation="gelu")
    q = lin.quantize("int8")
    assert isinstance(q, QuantizedBalancedSparseLinear) and q.activation == "gelu"
    assert "bank=32, keep=8, int8" in repr(q)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        y = q(x)
        yf = lin(x)
    assert y.shape == (2, 5, 80)
    assert F.cosine_similarity(y.flatten(), yf.flatten(), dim=0) > 0.999
    ref = reference.int8_linear(x.reshape(10, 96), q.weight_format, lin.bias.detach(), "gelu", activation_qmax())
    torch.testing.assert_close(y.reshape(10, 80).double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        yb = q(x.bfloat16())  # bf16 in, bf16 out (the float32 bias is cast)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=0.05, atol=0.05)
    with pytest.raises(RuntimeError, match="inference only"):
        q(x.requires_grad_())
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        q(torch.randn(3, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match="end in 96 features"):
        q(torch.randn(3, 95))
    with pytest.raises(ValueError, match="clip must be a finite float > 0"):
        q.set_clip(0.0)
    with pytest.raises(TypeError, match="takes a BalancedSparseLinear"):
        QuantizedBalancedSparseLinear.from_sparse(nn.Linear(4, 4))


def test_threads_give_identical_results():
    q = sparse.BalancedSparseLinear(256, 200, bank=32, keep=3).quantize()
    x = torch.randn(37, 256)
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


def test_state_dict_round_trip():
    a = sparse.BalancedSparseLinear(64, 48, bank=32, keep=8).quantize()
    a.set_clip(3.0)
    b = sparse.BalancedSparseLinear(64, 48, bank=32, keep=8).quantize()  # another pattern, same shape
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = sparse.BalancedSparseLinear(64, 48, bank=16, keep=4).quantize()
    with pytest.raises(RuntimeError, match="pattern_info"):
        c.load_state_dict(a.state_dict())


def test_compile():
    model = nn.Sequential(sparse.BalancedSparseLinear(64, 96, bank=32, keep=8, activation="relu").quantize(),
                          nn.LayerNorm(96), sparse.BalancedSparseLinear(96, 32, bank=16, keep=3).quantize())
    x = torch.randn(9, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_opcheck():
    qw = QuantizedBalancedSparseWeight.from_float(_weight(40, 64, 32, 4, seed=7))
    x = torch.randn(5, 64)
    torch.library.opcheck(OP, (x, qw.qvalues, qw.indices, qw.w_scale, qw.w_sum, 40, qw.window, torch.randn(40),
                               "silu", 0.0), test_utils=("test_schema", "test_faketensor"))


transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def test_sparsify_quantize_and_save_load(tmp_path):
    kw = dict(skip_if_slower=False, sample_tokens=0, fuse_activations=True, bank=32, keep=8)
    float_model = tiny_bert()
    sparse.sparsify(float_model, "balanced", **kw)
    model = tiny_bert()
    rep = sparse.sparsify(model, "balanced", quantize="int8", **kw)
    q = [m for m in model.modules() if isinstance(m, QuantizedBalancedSparseLinear)]
    assert len(q) == len(rep.converted) == 13  # 2 x 6 encoder Linears and the pooler
    assert all(r.quantized == "int8" for r in rep.converted)
    assert sum(r.bytes_after for r in rep.converted) == sum(m.nbytes for m in q)
    with torch.no_grad():
        yf = float_model(IDS).last_hidden_state
        yq = model(IDS).last_hidden_state
    cos = F.cosine_similarity(yf.flatten(1), yq.flatten(1), dim=1)
    assert (cos > 0.99).all(), cos
    sparse.save(model, tmp_path)
    loaded = sparse.load(tiny_bert(seed=1), tmp_path)
    assert sum(isinstance(m, QuantizedBalancedSparseLinear) for m in loaded.modules()) == 13
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).last_hidden_state, yq, rtol=0, atol=0)


def test_quantize_and_calibrate_mixed_model():
    """sparse.quant.quantize converts block and balanced layers alike; calibrate sets both kinds' clips."""
    model = nn.Sequential(sparse.BlockSparseLinear(64, 96, block=16, sparsity=0.5, activation="relu"),
                          sparse.BalancedSparseLinear(96, 32, bank=32, keep=8))
    x = torch.randn(7, 64)
    with torch.no_grad():
        yf = model(x)
    report = sparse.quant.quantize(model)
    assert set(report) == {"0", "1"} and isinstance(model[1], QuantizedBalancedSparseLinear)
    clips = sparse.quant.calibrate(model, [x], percentile=100)
    assert set(clips) == {"0", "1"} and model[1]._clip == pytest.approx(clips["1"], rel=1e-6)
    with torch.no_grad():
        assert F.cosine_similarity(model(x).flatten(), yf.flatten(), dim=0) > 0.99
