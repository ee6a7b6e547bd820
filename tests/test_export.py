"""Leaving the package: densify (sparse layers back to equal dense ones), export_onnx (run by ONNX Runtime where
installed), torch.export of a sparsified model, and an AOTInductor package loaded in a fresh process that imports
only torch and sparse."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import sparse
from sparse.nn import SparseLinear

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _bert(pattern="block"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    kw = dict(sparsity=0.5, block=16) if pattern == "block" else dict(sparsity=0.75, bank=16)
    sparse.sparsify(model, pattern, skip_if_slower=False, sample_tokens=0, fuse_activations=True, **kw)
    return model


class LastHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


@pytest.mark.parametrize("pattern", ["block", "balanced"])
def test_densify_computes_the_same_with_dense_layers(pattern):
    model = _bert(pattern)
    dense = sparse.densify(model)
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    assert any(isinstance(m, SparseLinear) for m in model.modules()), "the model itself is left as it was"
    with torch.no_grad():
        torch.testing.assert_close(LastHidden(dense)(IDS), LastHidden(model)(IDS), rtol=1e-5, atol=1e-5)
    layer = next(m for m in model.modules() if isinstance(m, SparseLinear) and m.activation != "none")
    single = sparse.densify(layer)  # one layer with a fused GELU: Linear then GELU
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(single(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        sparse.densify(3)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="export_onnx needs the optional onnx package")
def test_export_onnx_runs_in_onnxruntime_with_equal_outputs(tmp_path):
    model = _bert()
    path = sparse.export_onnx(LastHidden(model), str(tmp_path / "m.onnx"), IDS, input_names=["input_ids"],
                              output_names=["out"], dynamic_axes={"input_ids": {0: "b"}}, ir_version=8)
    import onnx

    proto = onnx.load(path)
    assert proto.ir_version == 8
    init = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.dims and len(t.dims) == 2]
    assert any((w == 0).mean() >= 0.5 for w in init), "the pruned weights are zeros of dense initializers"
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime (optional) not installed: the file is checked, not run")
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = torch.cat([IDS, IDS.flip(0)])  # another batch size: the batch axis is dynamic
    (got,) = sess.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), LastHidden(model)(ids), rtol=1e-4, atol=1e-4)


def test_export_onnx_refuses_bad_inputs(tmp_path):
    if importlib.util.find_spec("onnx") is None:
        with pytest.raises(ImportError, match="needs the onnx package"):
            sparse.export_onnx(nn.Linear(2, 2), str(tmp_path / "m.onnx"), torch.zeros(1, 2))
        return
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple of tensors, got list"):
        sparse.export_onnx(nn.Linear(2, 2), str(tmp_path / "m.onnx"), [torch.zeros(1, 2)])


@pytest.mark.slow  # torch.export
def test_torch_export_keeps_the_sparse_ops():
    model = LastHidden(_bert())
    ep = torch.export.export(model, (IDS,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("sparsekern" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(IDS), model(IDS))


@pytest.mark.slow  # AOTInductor compiles C++ (a minute on 2 cores)
def test_aoti_package_runs_in_a_fresh_process(tmp_path):
    model = LastHidden(_bert())
    with torch.no_grad():
        expected = model(IDS)
    ep = torch.export.export(model, (IDS,))
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "bert.pt2"))
    torch.save({"ids": IDS, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import sparse  # registers the sparsekern ops the package calls; no transformers, no model code
        io = torch.load({str(tmp_path / "io.pt")!r})
        run = torch._inductor.aoti_load_package({pkg!r})
        torch.testing.assert_close(run(io["ids"]), io["expected"])
        assert "transformers" not in sys.modules
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# Two throwaway ops without a fake kernel, in a namespace of this test: a torch.library.custom_op (torch says "no
# fake impl registered") and an op defined with a CPU kernel only (torch raises UnsupportedOperatorException).
@torch.library.custom_op("sparsekern_test_nofake::scale2", mutates_args=())
def _scale2(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_LIB = torch.library.Library("sparsekern_test_nofake", "DEF")
_LIB.define("scale3(Tensor x) -> Tensor")
_LIB.impl("scale3", lambda x: x * 3, "CPU")


class _Scale(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


class _BlockThenScale(sparse.BlockSparseLinear):
    """A sparse layer whose forward also calls an op without a fake kernel."""

    def forward(self, x):
        return _scale2(super().forward(x))


@pytest.mark.parametrize("op, name", [(_scale2, "sparsekern_test_nofake::scale2"),
                                      (torch.ops.sparsekern_test_nofake.scale3, "sparsekern_test_nofake::scale3")])
def test_export_program_names_the_layer_whose_op_has_no_fake_kernel(op, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), _Scale(op)))
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    x = torch.randn(4, 32)
    with pytest.raises(Exception) as raw:  # torch's own error names the op only
        torch.export.export(model, (x,))
    assert "'2.1'" not in str(raw.value)
    with pytest.raises(ValueError) as err:
        sparse.export_program(model, x)
    assert str(err.value).startswith(f"cannot export: layer '2.1' (_Scale) calls the op {name}, which has no fake "
                                     "(meta) kernel"), str(err.value)
    assert err.value.__cause__ is not None  # torch's error stays attached


def test_export_program_names_the_sparse_layer_calling_such_an_op():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), _BlockThenScale(32, 32, block=16, sparsity=0.5))
    with pytest.raises(ValueError, match=r"^cannot export: layer '2' \(_BlockThenScale\) calls the op "
                                         "sparsekern_test_nofake::scale2, "):
        sparse.export_program(model, x)


def test_export_program_exports_a_sparse_model_and_keeps_other_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    x = torch.randn(4, 32)
    program = sparse.export_program(model, x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("sparsekern" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), model(x))

    class Fails(nn.Module):
        def forward(self, x):
            raise KeyError("not a fake-kernel problem")

    with pytest.raises(KeyError, match="not a fake-kernel problem"):
        sparse.export_program(Fails(), x)
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        sparse.export_program(lambda t: t, x)
