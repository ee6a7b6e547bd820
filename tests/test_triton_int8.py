"""The Triton int8 forward (kernels/bsr_int8.py) against the float64 reference of the same integers
(sparse.reference.int8_linear with qmax 127), and every configuration of it compiled for sm_80 and sm_90.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors; with one, on CUDA.
The quantization is checked to be exact (the same integers and scales as the reference); the forward, whose
int32 sums are exact, to the rounding of its float32 output stage: error <= 2 x that of dense float32 torch on
the same quantized operands + KERNEL_FLOOR (tests/helpers.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import List

import pytest
import torch

from sparse import reference
from sparse.formats import BlockSparseWeight
from sparse.quant import QuantizedBlockSparseLinear, QuantizedBlockSparseWeight
from tests.helpers import KERNEL_FLOOR, assert_close_to_ref, make_bsr, slow_except

triton = pytest.importorskip("triton")

from sparse import triton_backend  # noqa: E402,F401  (registers torch.ops.sparsekern.triton_*)
from sparse.kernels import bsr_int8  # noqa: E402
from tests.test_triton import _interpreter_bf16  # noqa: E402,F401  (autouse: the interpreter's bf16 casts)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = torch.ops.sparsekern.triton_bsr_linear_int8
# (out, in, block): divisible; ragged out and in; 16x16; 64x64 ragged; rectangular; a block under tl.dot's minimum.
CASES = [(64, 96, (32, 32)), (70, 75, (32, 32)), (50, 41, (16, 16)), (130, 140, (64, 64)), (100, 90, (48, 16)),
         (45, 39, (5, 7))]
FAST = CASES[1:4]
# The interpreter runs the kernels' arithmetic in numpy, which warns on the special tokens' 127 / 0 and Inf * 0.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _qweight(out: int, inn: int, block, seed: int = 0, mask=None) -> QuantizedBlockSparseWeight:
    if mask is None:
        w = make_bsr(out, inn, block, sparsity=0.4, seed=seed)
    else:
        w = make_bsr(out, inn, block, mask=mask, seed=seed)
    return QuantizedBlockSparseWeight.from_float(w)


def _x(T: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, n, generator=g) * 2).to(dtype)


def _run(x, qw, bias=None, act="none", clip=0.0):
    """The registered op on DEVICE; the result back on the CPU."""
    d = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    y = OP(d(x), d(qw.qvalues), d(qw.w_scale), d(qw.w_sum), d(qw.row_offsets), d(qw.col_indices), qw.shape[0],
           qw.block[1], d(bias), act, clip)
    return y.cpu()


def _dense_same_integers(x, qw, bias, act, clip=0.0):
    """Dense float32 torch on the same quantized operands, rounded to x's dtype: the error yardstick."""
    q, s = reference.quantize_activations(x, 127, clip)
    y = (q.float() * s[:, None]) @ qw.to_dense().t()
    if bias is not None:
        y = y + bias.float()
    return reference.activation(y, act).to(x.dtype)


def _check(x, qw, bias, act, clip=0.0, what=""):
    ours = _run(x, qw, bias, act, clip)
    ref = reference.int8_linear(x, qw, bias, act, 127, clip)
    assert_close_to_ref(ours, ref, _dense_same_integers(x, qw, bias, act, clip), what, k=x.shape[1],
                        floor=KERNEL_FLOOR)
    return ours


# ---- quantization: exactly the reference's integers and scales ----------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("clip", (0.0, 1.5))
def test_quantize_equals_reference(dtype, clip):
    # 9 tokens (not a multiple of the interpreter's 4) x 70 features (three 32-wide steps, the last ragged),
    # with the special tokens: NaN, +Inf, -Inf, all zero, subnormal-small, one value exactly on a .5 boundary.
    x = _x(9, 70, torch.float32, seed=3)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0] = float("-inf")
    x[4] = 0.0
    x[5] = 1e-39
    x[6] = 0.1
    x[6, :4] = torch.tensor([127.0, 2.5, 3.5, -0.5])  # per token: a scale of 1, ties round to even
    x = x.to(dtype)
    q, s = bsr_int8.quantize_activations(x.to(DEVICE), clip)
    rq, rs = reference.quantize_activations(x, 127, clip)
    assert q.dtype == torch.int8 and q.shape == x.shape and q.stride(0) % 16 == 0
    torch.testing.assert_close(q.cpu().double(), rq, rtol=0, atol=0)
    torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0, equal_nan=True)
    if clip:
        assert int(q[2].max()) == 127 and int(q[3].min()) == -127, "a static clip saturates +-Inf"
    else:
        assert q[6, :4].tolist() == [127, 2, 4, 0], "ties round half to even"


# ---- the forward ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", slow_except(CASES, FAST), ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_forward_matches_reference(dtype, case):
    out, inn, block = case
    qw = _qweight(out, inn, block, seed=out + inn)
    for T, bias_on in ((1, True), (19, False)):  # 19: a partial token tile of the interpreter's 16
        bias = torch.randn(out, generator=torch.Generator().manual_seed(T)).to(dtype) if bias_on else None
        _check(_x(T, inn, dtype, seed=T), qw, bias, "none", what=f"{dtype} T={T} bias={bias_on}")


_TILES = sorted({c.kwargs["BLOCK_T"] for cfgs in bsr_int8.CONFIGS["fwd"].values() for c in cfgs})


@pytest.mark.parametrize("block_t", _TILES)
def test_every_tile_shape_of_the_configs(block_t):
    """The GPU configurations' token tiles (and the quantize's 1024-wide steps), run by the interpreter."""
    qw = _qweight(70, 75, (32, 32), seed=block_t)
    x = _x(block_t + 3, 75, torch.float32, seed=block_t)  # one full tile and a ragged one
    bias = torch.randn(70, generator=torch.Generator().manual_seed(0))
    q, s = bsr_int8.quantize_activations(x.to(DEVICE), config=bsr_int8.CONFIGS["quantize"][80][0])
    rq, rs = reference.quantize_activations(x, 127)
    torch.testing.assert_close(q.cpu().double(), rq, rtol=0, atol=0)
    torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0)
    config = triton.Config({"BLOCK_T": block_t}, num_warps=4)
    y = bsr_int8.bsr_linear_int8(x.to(DEVICE), *(t.to(DEVICE) for t in (qw.qvalues, qw.w_scale, qw.row_offsets,
                                                                         qw.col_indices)), 70, 32, bias.to(DEVICE),
                                 "silu", config=config).cpu()
    assert_close_to_ref(y, reference.int8_linear(x, qw, bias, "silu", 127),
                        _dense_same_integers(x, qw, bias, "silu"), f"BLOCK_T={block_t}", k=75, floor=KERNEL_FLOOR)


@pytest.mark.parametrize("act", ("none", "relu", "gelu", "gelu_tanh", "silu", "quick_gelu"))
def test_each_activation(act):
    qw = _qweight(40, 48, (16, 16), seed=7)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(8))
    _check(_x(5, 48, torch.float32, seed=9), qw, bias, act, what=act)


def test_float16_out_and_strided_input():
    qw = _qweight(48, 64, (32, 32), seed=11)
    x = _x(6, 70, torch.float16, seed=12)[:, 3:67]  # a row stride of 70
    bias = torch.randn(48, generator=torch.Generator().manual_seed(13)).half()
    y = _check(x, qw, bias, "gelu", what="float16")
    assert y.dtype == torch.float16


def test_static_clip_saturates():
    qw = _qweight(64, 96, (32, 32), seed=3)
    x = _x(7, 96, torch.float32, seed=4)
    x[2, 5], x[4, 0] = 50.0, -float("inf")
    y = _check(x, qw, None, "none", clip=1.5, what="static clip")
    # Everything beyond the clip saturates: the same result as the input clamped to it.
    torch.testing.assert_close(y, _run(x.clamp(-1.5, 1.5), qw, clip=1.5), rtol=0, atol=0)


def test_special_tokens():
    qw = _qweight(48, 64, (16, 16), seed=5)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(6))
    x = _x(5, 64, torch.float32, seed=6)
    x[1, 3], x[2, 9], x[3] = float("nan"), -float("inf"), 0.0
    y = _run(x, qw, bias)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), "a token with NaN / Inf gives NaN outputs"
    torch.testing.assert_close(y[3], bias, rtol=0, atol=0)  # an all-zero token: exactly the bias
    torch.testing.assert_close(y[[0, 4]], _run(x[[0, 4]], qw, bias), rtol=0, atol=0)


def test_empty_block_row_gives_the_bias():
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False  # block row 1 (outputs 32..63) has no blocks; the last one (64..69) is ragged
    qw = _qweight(70, 120, (32, 32), seed=2, mask=mask)
    assert int(qw.row_offsets[2] - qw.row_offsets[1]) == 0
    bias = torch.randn(70, generator=torch.Generator().manual_seed(1))
    x = _x(3, 120, torch.float32, seed=1)
    y = _check(x, qw, bias, "none", what="empty row")
    torch.testing.assert_close(y[:, 32:64], bias[32:64].expand(3, 32), rtol=0, atol=0)
    y = _run(x, qw, None, "relu")
    assert bool((y[:, 32:64] == 0).all())


def test_empty_input_and_empty_weight():
    qw = _qweight(40, 48, (16, 16), seed=1)
    assert _run(torch.zeros(0, 48), qw).shape == (0, 40)
    empty = QuantizedBlockSparseWeight.from_float(
        BlockSparseWeight.from_dense(torch.randn(40, 48), 16, mask=torch.zeros(3, 3, dtype=torch.bool)))
    assert empty.col_indices.numel() == 0
    bias = torch.randn(40)
    torch.testing.assert_close(_run(_x(3, 48, torch.float32, 0), empty, bias), bias.expand(3, 40), rtol=0, atol=0)


# ---- bad input --------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_error():
    qw = _qweight(40, 48, (16, 16), seed=1)
    x = _x(3, 48, torch.float32, 0)
    args = (qw.qvalues, qw.w_scale, qw.row_offsets, qw.col_indices, 40, 16)
    f = bsr_int8.bsr_linear_int8
    with pytest.raises(TypeError, match="float64"):
        f(x.double(), *args)
    with pytest.raises(TypeError, match="qvalues must be a 4-D int8"):
        f(x, qw.qvalues.float(), *args[1:])
    with pytest.raises(TypeError, match="qvalues .* on meta"):
        f(x.to("meta"), *args)
    with pytest.raises(TypeError, match="w_scale must be a 1-D torch.float32"):
        f(x, qw.qvalues, qw.w_scale.double(), *args[2:])
    with pytest.raises(ValueError, match="in_block"):
        f(x, *args[:5], 33)
    with pytest.raises(ValueError, match="w_scale must have 70 entries, row_offsets 6, col_indices 6; got 40, 4, 6"):
        f(x, *args[:4], 70, 16)
    with pytest.raises(TypeError, match="bias must be a 1-D torch.float32"):
        f(x, *args, bias=torch.zeros(40, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="activation must be one of"):
        f(x, *args, activation="tanh")
    with pytest.raises(ValueError, match="clip must be a finite float"):
        f(x, *args, clip=-1.0)
    big = bsr_int8.MAX_K + 1
    with pytest.raises(ValueError, match=f"{big} input features.*K <= {bsr_int8.MAX_K}"):
        f(torch.empty(1, big, device="meta"), *(t.to("meta") for t in args[:4]), 40, 16)


def test_module_refuses_a_device_it_cannot_run_on():
    layer = QuantizedBlockSparseLinear(_qweight(40, 48, (16, 16)))
    with pytest.raises(ValueError, match="run on the CPU, or on CUDA through Triton; got an input on meta"):
        layer(torch.empty(2, 48, device="meta"))


def test_op_schema():
    """opcheck's eager schema check (inference only: no autograd); its fake-tensor checks need a GPU (the
    interpreter would launch on fake tensors) and run in test_layer_on_cuda below."""
    qw = _qweight(40, 48, (16, 16), seed=1)
    args = (_x(3, 48, torch.float32, 0), qw.qvalues, qw.w_scale, qw.w_sum, qw.row_offsets, qw.col_indices, 40, 16,
            torch.randn(40), "gelu", 0.0)
    torch.library.opcheck(OP, args, test_utils=("test_schema",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("clip", (None, 1.5))
def test_layer_on_cuda(clip):
    """The module path: an int8 layer moved to the GPU runs the Triton op, eager and under torch.compile."""
    qw = _qweight(130, 140, (64, 64), seed=4)
    bias = torch.randn(130, generator=torch.Generator().manual_seed(5))
    layer = QuantizedBlockSparseLinear(qw, bias, activation="gelu", clip=clip).to("cuda")
    x = _x(37, 140, torch.float32, seed=6)
    with torch.no_grad():
        y = layer(x.cuda())
        compiled = torch.compile(layer, fullgraph=True)(x.cuda())
    c = 0.0 if clip is None else layer._clip
    ref = reference.int8_linear(x, qw, bias, "gelu", 127, c)
    assert_close_to_ref(y.cpu(), ref, _dense_same_integers(x, qw, bias, "gelu", c), "cuda layer", k=140,
                        floor=KERNEL_FLOOR)
    torch.testing.assert_close(compiled, y, rtol=1e-6, atol=1e-6)
    d = lambda t: t.cuda()  # noqa: E731
    torch.library.opcheck(OP, (x.cuda(), d(qw.qvalues), d(qw.w_scale), d(qw.w_sum), d(qw.row_offsets),
                               d(qw.col_indices), 130, 64, bias.cuda(), "gelu", c))


# ---- compile for sm_80 and sm_90 --------------------------------------------------------------------------
# Every forward config x output dtype x block 16 / 32 / 64, and the quantize kernel per input dtype, at the
# shapes of tests/test_triton_compile.py (T=4096, 4096x4096, half the blocks kept), with its machinery.
COMPILE_BLOCKS = (16, 32, 64)
COMPILE_DTYPES = ("float16", "bfloat16", "float32")


def _capture_launches(arch: int) -> List[dict]:
    from tests import test_triton_compile as tc

    launches: List[dict] = []

    class _Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def call(*args, **meta):
                launches.append({"kernel": self.kernel, "args": args, "meta": meta})
            return call

    torch.library.wrap_triton, saved = _Capture, torch.library.wrap_triton
    try:
        T, N, K = tc.T, tc.N, tc.K
        i32 = dict(device="meta", dtype=torch.int32)
        for name in COMPILE_DTYPES:
            dtype = getattr(torch, name)
            x, bias = torch.empty(T, K, device="meta", dtype=dtype), torch.empty(N, device="meta", dtype=dtype)
            bsr_int8.quantize_activations(x, config=bsr_int8.CONFIGS["quantize"][arch][0])
            launches[-1].update(op="quantize", config=0, dtype=name, block=0,
                                config_kwargs=bsr_int8.CONFIGS["quantize"][arch][0].kwargs)
            for block in COMPILE_BLOCKS:
                nnz = (N // block) * (K // block) // 2
                qv = torch.empty(nnz, block // 4, block, 4, device="meta", dtype=torch.int8)
                ws, ro, ci = torch.empty(N, device="meta"), torch.empty(N // block + 1, **i32), torch.empty(nnz, **i32)
                for i, config in enumerate(bsr_int8.CONFIGS["fwd"][arch]):
                    bsr_int8.bsr_linear_int8(x, qv, ws, ro, ci, N, block, bias, "gelu", config=config)
                    launches[-1].update(op="fwd", config=i, dtype=name, block=block, config_kwargs=config.kwargs)
    finally:
        torch.library.wrap_triton = saved
    return [launch for launch in launches if "op" in launch]


# The int8 tensor-core instructions (PTX): sm_90's warpgroup mma, sm_80's (and sm_90's fallback) mma.sync.
_INT8_MMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8"
                       r"|mma\.sync\.aligned\.m16n8k32\.row\.col(?:\.satfinite)?\.s32\.s8\.s8\.s32")


def compile_all(arch: int, workdir: str) -> List[dict]:
    from triton.backends.compiler import GPUTarget

    from tests import test_triton_compile as tc

    rows = []
    for launch in _capture_launches(arch):
        meta = launch["meta"]
        options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
        compiled = triton.compile(tc._source(launch), target=GPUTarget("cuda", arch, 32), options=options)
        res = tc._resources(compiled.asm["cubin"], os.path.join(workdir, "kernel.cubin"))
        ptx = compiled.asm["ptx"]
        rows.append({
            "op": launch["op"], "config": launch["config"], "dtype": launch["dtype"], "block": launch["block"],
            "tile": launch["config_kwargs"], **options, "regs": res["REG"],
            "spill_bytes": res.get("LOCAL", 0) + res.get("STACK", 0),
            "shared": compiled.metadata.shared + res.get("SHARED", 0),
            "mma": "".join(_INT8_MMA.findall(ptx)[:1]),
            "ieee_div": "div.rn.f32" in ptx,
            # The quantize's round-half-to-even, +-1.5 * 2^23, kept as two adds (not folded away).
            "round_adds": "0f4B400000" in ptx and "0fCB400000" in ptx,
        })
    return rows


@pytest.mark.slow  # ptxas and MLIR for every config, block and dtype of both archs
@pytest.mark.parametrize("arch", (80, 90))
def test_every_config_compiles_within_limits(arch: int, tmp_path) -> None:
    from tests.test_triton_compile import SMEM_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(arch), str(tmp_path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    n_fwd = len(bsr_int8.CONFIGS["fwd"][arch]) * len(COMPILE_BLOCKS) * len(COMPILE_DTYPES)
    assert len(rows) == n_fwd + len(COMPILE_DTYPES)
    print(f"\nsm_{arch}: int8, shared limit {SMEM_LIMIT[arch]} B")
    print(f"{'op':<10}{'cfg':>4} {'dtype':<10}{'block':>6} {'tile':<24}{'warps':>6}{'stages':>7}{'regs':>6}"
          f"{'spill B':>8}{'shared B':>10}  mma")
    for r in rows:
        tile = ",".join(f"{k}={v}" for k, v in r["tile"].items())
        print(f"{r['op']:<10}{r['config']:>4} {r['dtype']:<10}{r['block']:>6} {tile:<24}{r['num_warps']:>6}"
              f"{r['num_stages']:>7}{r['regs']:>6}{r['spill_bytes']:>8}{r['shared']:>10}  {r['mma'].split('.')[0]}")
    assert not [r for r in rows if r["spill_bytes"]], f"register spills on sm_{arch}"
    assert not [r for r in rows if r["shared"] > SMEM_LIMIT[arch]], f"shared memory over the limit on sm_{arch}"
    assert all(r["mma"] for r in rows if r["op"] == "fwd"), "the forward's dot is not an int8 tensor-core mma"
    assert all(r["ieee_div"] and r["round_adds"] for r in rows if r["op"] == "quantize"), \
        "the quantize needs IEEE division and its rounding adds, or it differs from the reference"


if __name__ == "__main__":  # the child process of the test above: python tests/test_triton_int8.py ARCH WORKDIR
    print(json.dumps(compile_all(int(sys.argv[1]), sys.argv[2])))
